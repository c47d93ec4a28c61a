"""Trigger metadata (a ScaledObject's `triggers[].metadata`) parsed once into a frozen ScalerSpec.

Every rejection is a MetadataError naming the key, the value and what is accepted; the gRPC
layer turns it into INVALID_ARGUMENT. Keys that KEDA itself reads are accepted silently;
other unknown keys are kept in `ScalerSpec.unknown_keys` so the caller can warn once.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from adapter import promql
from adapter.promql import Queries

SIGNALS = ("queue", "gpu", "latency")
COMBINE_MODES = ("max", "weighted")

# Keys KEDA's external scaler reads for itself and forwards to us as part of the metadata.
KEDA_KEYS = frozenset(
    {"scalerAddress", "enableTLS", "unsafeSsl", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey"}
)

# The keys this scaler reads (README's metadata table).
KNOWN_KEYS = frozenset(
    {
        "prometheusAddress", "selector", "queueQuery", "gpuUtilizationQuery", "latencyQuery",
        "readyReplicasQuery", "window", "targetQueuePerReplica", "targetGpuUtilization",
        "targetP95Seconds", "signals", "combine", "weights", "scaleUpWindowSeconds",
        "scaleDownWindowSeconds", "burstFactor", "minReplicas", "maxReplicas", "activationQueue",
        "refreshSeconds", "staleAfterSeconds", "queryTimeoutSeconds", "metricName", "scrapeTargetsFile",
        "minBusyReplicas",
    }
)  # fmt: skip

# KEDA resolves `<key>FromEnv` from the target container's environment and forwards the
# resolved value under the `...FromEnv` key; we accept it wherever `<key>` is absent.
FROM_ENV_SUFFIX = "FromEnv"

_DURATION = re.compile(r"^(?:[0-9]+(?:ms|s|m|h|d|w|y))+$")
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_MATCHER = r"""\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*"""
_SELECTOR = re.compile(rf"^(?:{_MATCHER}(?:,{_MATCHER})*,?\s*)?$")
_METRIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


class MetadataError(ValueError):
    """A metadata value that cannot be used: names the key, the value and what is accepted."""

    def __init__(self, key: str, value: str | None, accepted: str):
        self.key = key
        self.value = value
        self.accepted = accepted
        shown = "missing" if value is None else repr(value)
        super().__init__(f"trigger metadata {key}: {shown} is not valid; {accepted}")


@dataclass(frozen=True)
class PolicySpec:
    """Everything the pure decision core needs; all times in seconds, utilization in percent."""

    signals: tuple[str, ...] = ("queue", "gpu")
    target_queue_per_replica: float = 8.0
    target_gpu_util_percent: float = 75.0
    target_p95_seconds: float | None = None
    combine: str = "max"
    weights: Mapping[str, float] = field(default_factory=lambda: {s: 1.0 for s in SIGNALS})
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    burst_factor: float = 2.0
    min_busy_replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    activation_queue: float = 0.0


@dataclass(frozen=True)
class ScalerSpec:
    """One trigger's validated settings: where to read signals, and the policy to apply."""

    prometheus_address: str
    queries: Queries
    policy: PolicySpec
    window: str = "1m"
    selector: str = ""
    refresh_s: float = 5.0
    stale_after_s: float = 60.0
    query_timeout_s: float = 2.0
    metric_name: str = "composite"
    unknown_keys: tuple[str, ...] = ()
    # Set instead of prometheus_address: scrape the pods in this file_sd file directly.
    scrape_targets_file: str | None = None


def parse_duration_seconds(text: str) -> float:
    """Seconds in a PromQL duration such as `1m` or `1h30m`; raises ValueError otherwise."""
    if not _DURATION.match(text):
        raise ValueError(text)
    return sum(int(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


class _Reader:
    """Reads typed values out of the raw string map."""

    def __init__(self, metadata: Mapping[str, str]):
        self._raw = metadata

    def text(self, key: str) -> str | None:
        """The stripped value of `key` (or of `<key>FromEnv`); None when absent or empty."""
        assert key in KNOWN_KEYS, key
        for candidate in (key, key + FROM_ENV_SUFFIX):
            if candidate in self._raw:
                value = self._raw[candidate].strip()
                if value:
                    return value
        return None

    def number(
        self,
        key: str,
        default: float | None,
        *,
        above: float | None = None,
        at_least: float | None = None,
        at_most: float | None = None,
        accepted: str,
    ) -> float | None:
        raw = self.text(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise MetadataError(key, raw, accepted) from None
        if not math.isfinite(value):
            raise MetadataError(key, raw, accepted)
        if above is not None and value <= above:
            raise MetadataError(key, raw, accepted)
        if at_least is not None and value < at_least:
            raise MetadataError(key, raw, accepted)
        if at_most is not None and value > at_most:
            raise MetadataError(key, raw, accepted)
        return value

    def count(self, key: str) -> int | None:
        raw = self.text(key)
        if raw is None:
            return None
        accepted = "accepted: a whole number of replicas >= 0"
        if not raw.isascii() or not raw.isdigit():
            raise MetadataError(key, raw, accepted)
        value = int(raw)
        if value > 1_000_000:
            raise MetadataError(key, raw, "accepted: a whole number of replicas from 0 to 1000000")
        return value


def _address(reader: _Reader, allowed_prefixes: tuple[str, ...]) -> str:
    key = "prometheusAddress"
    raw = reader.text(key)
    accepted = "accepted: the base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090"
    if raw is None:
        raise MetadataError(key, None, "it is required; " + accepted)
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise MetadataError(key, raw, accepted) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise MetadataError(key, raw, accepted)
    address = raw.rstrip("/")
    if allowed_prefixes and not any(address.startswith(p.rstrip("/")) for p in allowed_prefixes):
        raise MetadataError(key, raw, "this scaler only queries addresses starting with " + ", ".join(allowed_prefixes))
    return address


def _targets_file(reader: _Reader, directory: str | None) -> str | None:
    """The direct-scrape source's file_sd file, confined to the scaler's --scrape-targets-dir."""
    key = "scrapeTargetsFile"
    raw = reader.text(key)
    if raw is None:
        return None
    if reader.text("prometheusAddress") is not None:
        raise MetadataError(key, raw, "set prometheusAddress or scrapeTargetsFile, not both")
    if directory is None:
        raise MetadataError(key, raw, "this scaler does not scrape pods directly; start it with --scrape-targets-dir")
    # A ScaledObject must not make the scaler read files or scrape hosts it was not given.
    root = Path(directory).resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise MetadataError(key, raw, f"it must name a file inside --scrape-targets-dir ({directory})")
    for override in ("queueQuery", "gpuUtilizationQuery", "latencyQuery", "readyReplicasQuery"):
        if reader.text(override) is not None:
            raise MetadataError(override, reader.text(override),
                                "query overrides need prometheusAddress; scrapeTargetsFile reads the built-in signals")
    return str(path)


def _signals(reader: _Reader, target_p95: float | None) -> tuple[str, ...]:
    raw = reader.text("signals")
    if raw is None:
        return ("queue", "gpu", "latency") if target_p95 is not None else ("queue", "gpu")
    names = [part.strip() for part in raw.split(",") if part.strip()]
    accepted = "accepted: a comma list of " + ", ".join(SIGNALS)
    if not names or any(n not in SIGNALS for n in names):
        raise MetadataError("signals", raw, accepted)
    if "latency" in names and target_p95 is None:
        raise MetadataError("signals", raw, "the latency signal needs targetP95Seconds to be set")
    return tuple(s for s in SIGNALS if s in names)


def _weights(reader: _Reader, combine: str, signals: tuple[str, ...]) -> dict[str, float]:
    weights = {s: 1.0 for s in SIGNALS}
    raw = reader.text("weights")
    if raw is None:
        return weights
    if combine != "weighted":
        raise MetadataError("weights", raw, "weights are only used with combine=weighted")
    accepted = "accepted: e.g. queue=2,gpu=1,latency=1 (signals among " + ", ".join(SIGNALS) + ", weights >= 0)"
    for part in raw.split(","):
        name, sep, number = part.partition("=")
        name = name.strip()
        try:
            value = float(number)
        except ValueError:
            raise MetadataError("weights", raw, accepted) from None
        if not sep or name not in SIGNALS or not math.isfinite(value) or value < 0:
            raise MetadataError("weights", raw, accepted)
        weights[name] = value
    if not any(weights[s] > 0 for s in signals):
        raise MetadataError("weights", raw, "at least one enabled signal needs a weight above 0")
    return weights


def _is_known(key: str) -> bool:
    if key in KNOWN_KEYS or key in KEDA_KEYS:
        return True
    return key.endswith(FROM_ENV_SUFFIX) and key[: -len(FROM_ENV_SUFFIX)] in KNOWN_KEYS


def parse_metadata(
    metadata: Mapping[str, str], allowed_prefixes: tuple[str, ...] = (), scrape_targets_dir: str | None = None
) -> ScalerSpec:
    """Validates a trigger's metadata map; raises MetadataError on the first bad key."""
    reader = _Reader(metadata)
    targets_file = _targets_file(reader, scrape_targets_dir)
    address = "" if targets_file else _address(reader, allowed_prefixes)

    selector = reader.text("selector") or ""
    if not _SELECTOR.match(selector):
        raise MetadataError(
            "selector", selector, 'accepted: PromQL label matchers, e.g. namespace="ml",deployment="sd-worker"'
        )
    window = reader.text("window") or "1m"
    try:
        window_seconds = parse_duration_seconds(window)
    except ValueError:
        window_seconds = 0
    if window_seconds <= 0:
        raise MetadataError("window", window, "accepted: a PromQL duration above zero, e.g. 30s, 1m, 1h30m")

    queue_target = reader.number("targetQueuePerReplica", 8.0, above=0, accepted="accepted: a number above 0")
    gpu_target = reader.number(
        "targetGpuUtilization", 75.0, above=0, at_most=100, accepted="accepted: a percentage, 0 < x <= 100"
    )
    p95_target = reader.number("targetP95Seconds", None, above=0, accepted="accepted: seconds, a number above 0")
    signals = _signals(reader, p95_target)

    combine = reader.text("combine") or "max"
    if combine not in COMBINE_MODES:
        raise MetadataError("combine", combine, "accepted: " + " or ".join(COMBINE_MODES))
    weights = _weights(reader, combine, signals)

    up_window = reader.number("scaleUpWindowSeconds", 0.0, at_least=0, at_most=3600, accepted="accepted: seconds from 0 to 3600")
    down_window = reader.number(
        "scaleDownWindowSeconds", 300.0, at_least=0, at_most=3600, accepted="accepted: seconds from 0 to 3600"
    )
    burst = reader.number("burstFactor", 2.0, above=0, accepted="accepted: a number above 0")
    busy = reader.count("minBusyReplicas")
    if busy == 0:
        raise MetadataError("minBusyReplicas", "0", "accepted: a whole number of replicas >= 1 (1 turns it off)")
    min_replicas = reader.count("minReplicas")
    max_replicas = reader.count("maxReplicas")
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise MetadataError("minReplicas", str(min_replicas), f"it must not exceed maxReplicas ({max_replicas})")
    activation = reader.number("activationQueue", 0.0, at_least=0, accepted="accepted: a number >= 0")

    refresh = reader.number("refreshSeconds", 5.0, at_least=0.1, at_most=3600, accepted="accepted: seconds from 0.1 to 3600")
    stale = reader.number("staleAfterSeconds", 60.0, above=0, at_most=86400, accepted="accepted: seconds, above 0")
    if stale < refresh:
        raise MetadataError(
            "staleAfterSeconds", reader.text("staleAfterSeconds"), f"it must be at least refreshSeconds ({refresh:g})"
        )
    timeout = reader.number("queryTimeoutSeconds", 2.0, above=0, at_most=300, accepted="accepted: seconds from above 0 to 300")

    metric_name = reader.text("metricName") or "composite"
    if not _METRIC_NAME.match(metric_name):
        raise MetadataError("metricName", metric_name, "accepted: letters, digits, '_', '.', '-' (up to 200)")

    builtin = promql.builtin_queries(selector, window)
    queries = Queries(
        queue=reader.text("queueQuery") or builtin.queue,
        gpu=reader.text("gpuUtilizationQuery") or builtin.gpu,
        latency=reader.text("latencyQuery") or builtin.latency,
        ready=reader.text("readyReplicasQuery") or builtin.ready,
    )

    unknown = tuple(sorted(k for k in metadata if not _is_known(k)))
    policy = PolicySpec(
        signals=signals,
        target_queue_per_replica=queue_target,
        target_gpu_util_percent=gpu_target,
        target_p95_seconds=p95_target,
        combine=combine,
        weights=weights,
        scale_up_window_s=up_window,
        scale_down_window_s=down_window,
        burst_factor=burst,
        min_busy_replicas=2 if busy is None else busy,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        activation_queue=activation,
    )
    return ScalerSpec(
        prometheus_address=address,
        queries=queries,
        policy=policy,
        window=window,
        selector=selector,
        refresh_s=refresh,
        stale_after_s=stale,
        query_timeout_s=timeout,
        metric_name=metric_name,
        unknown_keys=unknown,
        scrape_targets_file=targets_file,
    )
