"""Trigger metadata (a ScaledObject's `triggers[].metadata`) parsed once into a frozen ScalerSpec.

The keys live in one table, `METADATA_KEYS`: each key once, with the spec field it sets, its
parser, its bounds and the accepted-values text its rejection shows; its default is that
field's default in `PolicySpec` or `ScalerSpec`. Parsing has three steps, as knative's
autoscaler config does: start from the defaults, parse each key that is set, then `_validate`
the rules between keys and the scaler's own flags.

Every rejection is a MetadataError naming the key, the value and what is accepted; the gRPC
layer turns it into INVALID_ARGUMENT. Keys that KEDA itself reads are accepted silently;
other unknown keys are kept in `ScalerSpec.unknown_keys` so the caller can warn once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from adapter import promql
from adapter.policy import COMBINE_MODES, PolicySpec
from adapter.promql import Queries
from contract.jobqueue import CARRIES_PASSWORD, DEFAULT_STREAM, QueueKeys, redis_url_problem
from contract.names import LATENCY, SIGNALS

# Keys KEDA's external scaler reads for itself and forwards to us as part of the metadata.
KEDA_KEYS = frozenset(
    {"scalerAddress", "enableTLS", "unsafeSsl", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey"}
)

# KEDA resolves `<key>FromEnv` from the target container's environment and forwards the
# resolved value under the `...FromEnv` key; we accept it wherever `<key>` is absent.
FROM_ENV_SUFFIX = "FromEnv"

_DURATION = re.compile(r"^(?:[0-9]+(?:ms|s|m|h|d|w|y))+$")
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_METRIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_MAX_REPLICAS = 1_000_000
_REPLICAS = "accepted: a whole number of replicas >= 0"
_QUERY = "accepted: PromQL returning one series or a scalar"


class MetadataError(ValueError):
    """A metadata value that cannot be used: names the key, the value and what is accepted.

    `key` is a metadata key (one of KNOWN_KEYS), `value` its text (None when it is missing)
    and `accepted` the sentence that says what would do; str() reads
    `trigger metadata <key>: <value!r> is not valid; <accepted>`.
    """

    def __init__(self, key: str, value: str | None, accepted: str):
        self.key = key
        self.value = value
        self.accepted = accepted
        shown = "missing" if value is None else repr(value)
        super().__init__(f"trigger metadata {key}: {shown} is not valid; {accepted}")


@dataclass(frozen=True)
class ScalerSpec:
    """One trigger's validated settings: where to read signals, and the policy to apply.

    Exactly one source is set: `prometheus_address` (a base URL without a trailing slash), or
    `scrape_targets_file` (an absolute path inside the scaler's --scrape-targets-dir), in which
    case `prometheus_address` is "". With `redis_address` (a URL without credentials) the queue
    signal is `stream`'s backlog in Redis. Times are in seconds; `window` a PromQL duration.
    """

    prometheus_address: str
    queries: Queries
    policy: PolicySpec
    window: str = "1m"  # PromQL range for rates and averages
    selector: str = ""  # PromQL label matchers, without braces
    refresh_s: float = 5.0  # background refresh period
    stale_after_s: float = 60.0  # serve the last good value this long after failures
    query_timeout_s: float = 2.0  # per Prometheus request
    metric_name: str = "composite"  # the name GetMetricSpec returns
    unknown_keys: tuple[str, ...] = ()  # metadata keys neither ours nor KEDA's, sorted
    # Set instead of prometheus_address: scrape the pods in this file_sd file directly.
    scrape_targets_file: str | None = None
    redis_address: str | None = None  # set: the queue is `stream`'s backlog (adapter/redisqueue.py)
    stream: str = DEFAULT_STREAM  # the job stream's name (contract/jobqueue.py)


def parse_duration_seconds(text: str) -> float:
    """Seconds in a PromQL duration such as `1m` or `1h30m`; raises ValueError otherwise."""
    if not _DURATION.match(text):
        raise ValueError(text)
    return sum(int(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


@dataclass(frozen=True)
class MetadataKey:
    """One row of the metadata table: a key, the field it sets, how its text is read.

    `parse(key, text)` turns the key's stripped, non-empty text into the field's value, or
    raises MetadataError(key.name, text, ...). `above` is an exclusive lower bound, `at_least`
    and `at_most` inclusive ones, for the number and replica-count parsers. `accepted` is what a
    rejection of this key says is accepted.
    """

    name: str
    owner: type  # PolicySpec, ScalerSpec or Queries
    field: str
    parse: Callable[[MetadataKey, str], Any]
    accepted: str
    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None

    @property
    def default(self) -> Any:
        """The field's default in `owner`; None where it has none (a required key, a query)."""
        [spec_field] = [f for f in dataclasses.fields(self.owner) if f.name == self.field]
        if spec_field.default is not dataclasses.MISSING:
            return spec_field.default
        if spec_field.default_factory is not dataclasses.MISSING:
            return spec_field.default_factory()
        return None


# -- parsers: (key, stripped text) -> value, or MetadataError naming the key ----------------------


def _text(key: MetadataKey, raw: str) -> str:
    return raw


def _url(key: MetadataKey, raw: str) -> str:
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise MetadataError(key.name, raw, key.accepted)
    return raw.rstrip("/")


def _redis_url(key: MetadataKey, raw: str) -> str:
    problem = redis_url_problem(raw, ("redis", "rediss"))
    if problem == CARRIES_PASSWORD:  # shown without what precedes the @ or the query: never logged
        parts = urllib.parse.urlsplit(raw)
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2], query="").geturl()
        raise MetadataError(key.name, shown, "credentials never go in metadata; the scaler reads the password "
                            "from --redis-password-file or SCALER_REDIS_PASSWORD")
    if problem is not None:
        raise MetadataError(key.name, raw, key.accepted)
    parts = urllib.parse.urlsplit(raw)
    if (parts.query or parts.fragment
            or not re.fullmatch(r"/?|/[0-9]{1,5}", parts.path)):
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def _stream(key: MetadataKey, raw: str) -> str:
    try:
        QueueKeys(stream=raw)
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    return raw


def _matching(pattern: re.Pattern[str]) -> Callable[[MetadataKey, str], str]:
    def parse(key: MetadataKey, raw: str) -> str:
        if not pattern.match(raw):
            raise MetadataError(key.name, raw, key.accepted)
        return raw

    return parse


def _selector(key: MetadataKey, raw: str) -> str:
    try:
        promql.parse_selector(raw)  # the direct-scrape source reads it with the same parser
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    return raw


def _duration(key: MetadataKey, raw: str) -> str:
    try:
        seconds = parse_duration_seconds(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def _number(key: MetadataKey, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    if (
        not math.isfinite(value)
        or (key.above is not None and value <= key.above)
        or (key.at_least is not None and value < key.at_least)
        or (key.at_most is not None and value > key.at_most)
    ):
        raise MetadataError(key.name, raw, key.accepted)
    return value


def _count(key: MetadataKey, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise MetadataError(key.name, raw, _REPLICAS)
    value = int(raw)
    if value > _MAX_REPLICAS:
        raise MetadataError(key.name, raw, f"accepted: a whole number of replicas from 0 to {_MAX_REPLICAS}")
    if key.at_least is not None and value < key.at_least:
        raise MetadataError(key.name, raw, key.accepted)
    return value


def _combine(key: MetadataKey, raw: str) -> str:
    if raw not in COMBINE_MODES:
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def _signals(key: MetadataKey, raw: str) -> tuple[str, ...]:
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names or any(n not in SIGNALS for n in names):
        raise MetadataError(key.name, raw, key.accepted)
    return tuple(s for s in SIGNALS if s in names)


def _weights(key: MetadataKey, raw: str) -> dict[str, float]:
    weights = dict(key.default)  # a signal the text leaves out keeps its default weight
    for part in raw.split(","):
        name, sep, number = part.partition("=")
        name = name.strip()
        try:
            value = float(number)
        except ValueError:
            raise MetadataError(key.name, raw, key.accepted) from None
        if not sep or name not in SIGNALS or not math.isfinite(value) or value < 0:
            raise MetadataError(key.name, raw, key.accepted)
        weights[name] = value
    return weights


# -- the table (README's metadata table, in its order) --------------------------------------------

METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("prometheusAddress", ScalerSpec, "prometheus_address", _url,
                "accepted: the base URL of the Prometheus HTTP API, e.g. http://prometheus.monitoring:9090"),
    MetadataKey("scrapeTargetsFile", ScalerSpec, "scrape_targets_file", _text,
                "accepted: a Prometheus file_sd JSON file inside the scaler's --scrape-targets-dir"),
    MetadataKey("redisAddress", ScalerSpec, "redis_address", _redis_url,
                "accepted: redis://host:port/db or rediss://host:port/db, without credentials"),
    MetadataKey("stream", ScalerSpec, "stream", _stream, "accepted: a Redis key, 1 to 200 characters without spaces"),
    MetadataKey("selector", ScalerSpec, "selector", _selector,
                'accepted: PromQL label matchers, e.g. namespace="ml",deployment="sd-worker"'),
    MetadataKey("queueQuery", Queries, "queue", _text, _QUERY),
    MetadataKey("gpuUtilizationQuery", Queries, "gpu", _text, _QUERY),
    MetadataKey("latencyQuery", Queries, "latency", _text, _QUERY),
    MetadataKey("readyReplicasQuery", Queries, "ready", _text, _QUERY),
    MetadataKey("window", ScalerSpec, "window", _duration,
                "accepted: a PromQL duration above zero, e.g. 30s, 1m, 1h30m"),
    MetadataKey("targetQueuePerReplica", PolicySpec, "target_queue_per_replica", _number,
                "accepted: a number above 0", above=0),
    MetadataKey("targetGpuUtilization", PolicySpec, "target_gpu_util_percent", _number,
                "accepted: a percentage, 0 < x <= 100", above=0, at_most=100),
    MetadataKey("targetP95Seconds", PolicySpec, "target_p95_seconds", _number,
                "accepted: seconds, a number above 0", above=0),
    MetadataKey("signals", PolicySpec, "signals", _signals,
                "accepted: a comma list of " + ", ".join(SIGNALS)),
    MetadataKey("combine", PolicySpec, "combine", _combine,
                "accepted: " + " or ".join(COMBINE_MODES)),
    MetadataKey("weights", PolicySpec, "weights", _weights,
                f"accepted: e.g. queue=2,gpu=1,latency=1 (signals among {', '.join(SIGNALS)}, weights >= 0)"),
    MetadataKey("scaleUpWindowSeconds", PolicySpec, "scale_up_window_s", _number,
                "accepted: seconds from 0 to 3600", at_least=0, at_most=3600),
    MetadataKey("scaleDownWindowSeconds", PolicySpec, "scale_down_window_s", _number,
                "accepted: seconds from 0 to 3600", at_least=0, at_most=3600),
    MetadataKey("burstFactor", PolicySpec, "burst_factor", _number,
                "accepted: a number above 0", above=0),
    MetadataKey("minBusyReplicas", PolicySpec, "min_busy_replicas", _count,
                "accepted: a whole number of replicas >= 1 (1 turns it off)", at_least=1),
    MetadataKey("minReplicas", PolicySpec, "min_replicas", _count, _REPLICAS),
    MetadataKey("maxReplicas", PolicySpec, "max_replicas", _count, _REPLICAS),
    MetadataKey("activationQueue", PolicySpec, "activation_queue", _number,
                "accepted: a number >= 0", at_least=0),
    MetadataKey("refreshSeconds", ScalerSpec, "refresh_s", _number,
                "accepted: seconds from 0.1 to 3600", at_least=0.1, at_most=3600),
    MetadataKey("staleAfterSeconds", ScalerSpec, "stale_after_s", _number,
                "accepted: seconds, above 0", above=0, at_most=86400),
    MetadataKey("queryTimeoutSeconds", ScalerSpec, "query_timeout_s", _number,
                "accepted: seconds from above 0 to 300", above=0, at_most=300),
    MetadataKey("metricName", ScalerSpec, "metric_name", _matching(_METRIC_NAME),
                "accepted: letters, digits, '_', '.', '-' (up to 200)"),
)  # fmt: skip

# The keys this scaler reads.
KNOWN_KEYS = frozenset(key.name for key in METADATA_KEYS)
_BY_NAME = {key.name: key for key in METADATA_KEYS}
_QUERY_KEYS = tuple(key.name for key in METADATA_KEYS if key.owner is Queries)


def _texts(metadata: Mapping[str, str]) -> dict[str, str]:
    """Each known key's stripped text, from `<key>` or else `<key>FromEnv`; empty counts as unset."""
    texts = {}
    for key in METADATA_KEYS:
        for candidate in (key.name, key.name + FROM_ENV_SUFFIX):
            value = metadata.get(candidate, "").strip()
            if value:
                texts[key.name] = value
                break
    return texts


def _targets_path(directory: str, name: str) -> Path:
    return (Path(directory).resolve() / name).resolve()


def _validate(
    values: Mapping[str, Any], texts: Mapping[str, str], allowed_prefixes: tuple[str, ...], directory: str | None
) -> None:
    """The rules between keys, and between keys and the scaler's flags; raises MetadataError.

    `values` holds every key's parsed value (its default when unset), `texts` the keys that
    were set, as given; `directory` is --scrape-targets-dir.
    """
    targets_file, address = values["scrapeTargetsFile"], values["prometheusAddress"]
    if targets_file is not None:
        key = "scrapeTargetsFile"
        if address is not None:
            raise MetadataError(key, targets_file, "set prometheusAddress or scrapeTargetsFile, not both")
        if directory is None:
            raise MetadataError(key, targets_file,
                                "this scaler does not scrape pods directly; start it with --scrape-targets-dir")
        # A ScaledObject must not make the scaler read files or scrape hosts it was not given.
        try:
            inside = _targets_path(directory, targets_file).is_relative_to(Path(directory).resolve())
        except (ValueError, OSError):  # a NUL byte in the name: no file of ours either
            inside = False
        if not inside:
            raise MetadataError(key, targets_file, f"it must name a file inside --scrape-targets-dir ({directory})")
        for name in _QUERY_KEYS:
            if name in texts:
                accepted = "query overrides need prometheusAddress; scrapeTargetsFile reads the built-in signals"
                raise MetadataError(name, texts[name], accepted)
    elif address is None:
        why = "it is required (redisAddress gives only the queue; ready replicas come from here or scrapeTargetsFile); "
        raise MetadataError("prometheusAddress", None, why + _BY_NAME["prometheusAddress"].accepted)
    elif allowed_prefixes and not any(address.startswith(p.rstrip("/")) for p in allowed_prefixes):
        raise MetadataError("prometheusAddress", texts["prometheusAddress"],
                            "this scaler only queries addresses starting with " + ", ".join(allowed_prefixes))

    if values["redisAddress"] is None and "stream" in texts:
        raise MetadataError("stream", texts["stream"], "the stream is read only with redisAddress")
    if values["redisAddress"] is not None and "queueQuery" in texts:
        raise MetadataError("queueQuery", texts["queueQuery"],
                            "set queueQuery or redisAddress, not both: with redisAddress the queue is its backlog")
    if LATENCY in values["signals"] and values["targetP95Seconds"] is None:
        raise MetadataError("signals", texts["signals"], "the latency signal needs targetP95Seconds to be set")
    if "weights" in texts:
        if values["combine"] != "weighted":
            raise MetadataError("weights", texts["weights"], "weights are only used with combine=weighted")
        if not any(values["weights"][s] > 0 for s in values["signals"]):
            raise MetadataError("weights", texts["weights"], "at least one enabled signal needs a weight above 0")
    low, high = values["minReplicas"], values["maxReplicas"]
    if low is not None and high is not None and low > high:
        raise MetadataError("minReplicas", str(low), f"it must not exceed maxReplicas ({high})")
    if values["staleAfterSeconds"] < values["refreshSeconds"]:
        refresh = values["refreshSeconds"]
        raise MetadataError("staleAfterSeconds", texts.get("staleAfterSeconds"),
                            f"it must be at least refreshSeconds ({refresh:g})")


def _is_known(key: str) -> bool:
    if key in KNOWN_KEYS or key in KEDA_KEYS:
        return True
    return key.endswith(FROM_ENV_SUFFIX) and key[: -len(FROM_ENV_SUFFIX)] in KNOWN_KEYS


def parse_metadata(
    metadata: Mapping[str, str], allowed_prefixes: tuple[str, ...] = (), scrape_targets_dir: str | None = None
) -> ScalerSpec:
    """The ScalerSpec a trigger's metadata map (key -> text) describes.

    `allowed_prefixes` are the URL prefixes prometheusAddress must start with (empty: any);
    `scrape_targets_dir` is the directory scrapeTargetsFile must name a file in (None: direct
    scraping is refused). Raises MetadataError on the first bad key: each key's own bounds are
    checked in METADATA_KEYS' order, then the rules between keys.
    """
    texts = _texts(metadata)
    values = {key.name: key.default for key in METADATA_KEYS}
    for key in METADATA_KEYS:
        if key.name in texts:
            values[key.name] = key.parse(key, texts[key.name])
    if "signals" not in texts and values["targetP95Seconds"] is not None:
        # Unset, the signals are all that are configured, and an objective configures latency.
        values["signals"] = tuple(s for s in SIGNALS if s in values["signals"] or s == LATENCY)
    _validate(values, texts, allowed_prefixes, scrape_targets_dir)

    def fields_of(owner: type) -> dict[str, Any]:
        return {key.field: values[key.name] for key in METADATA_KEYS if key.owner is owner}

    builtin = promql.builtin_queries(values["selector"], values["window"])
    overrides = {name: query for name, query in fields_of(Queries).items() if query is not None}
    source = fields_of(ScalerSpec)
    if source["scrape_targets_file"] is not None:
        assert scrape_targets_dir is not None  # _validate refuses the file without the directory
        source["scrape_targets_file"] = str(_targets_path(scrape_targets_dir, source["scrape_targets_file"]))
        source["prometheus_address"] = ""
    return ScalerSpec(
        **source,
        queries=dataclasses.replace(builtin, **overrides),
        policy=PolicySpec(**fields_of(PolicySpec)),
        unknown_keys=tuple(sorted(k for k in metadata if not _is_known(k))),
    )
