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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from adapter import metadatavalues as parsers, promql
from adapter.access import AccessRules, Confinement, check_query, check_stream, confine_selector
from adapter.metadatavalues import REPLICAS, MetadataError, MetadataKey  # noqa: F401 - MetadataError is this module's too
from adapter.policy import COMBINE_MODES, PolicySpec
from adapter.promql import Queries, parse_duration_seconds  # noqa: F401 - parse_duration_seconds is this module's too
from contract.jobqueue import DEFAULT_STREAM
from contract.names import LATENCY, SIGNALS

# Keys KEDA's external scaler reads for itself and forwards to us as part of the metadata.
KEDA_KEYS = frozenset(
    {"scalerAddress", "enableTLS", "unsafeSsl", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey"}
)

# KEDA resolves `<key>FromEnv` from the target container's environment and forwards the
# resolved value under the `...FromEnv` key; we accept it wherever `<key>` is absent.
FROM_ENV_SUFFIX = "FromEnv"

_METRIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_QUERY = "accepted: PromQL returning one series or a scalar"


@dataclass(frozen=True)
class ScalerSpec:
    """One trigger's validated settings: where to read signals, and the policy to apply.

    Exactly one source is set: `prometheus_address` (a base URL without a trailing slash), or
    `scrape_targets_file` (an absolute path inside the scaler's --scrape-targets-dir), in which
    case `prometheus_address` is "". With `redis_address` (a URL without credentials) the queue
    signal is `stream`'s backlog in Redis. Times are in seconds; `window` a PromQL duration.
    Parsed for a namespace (`parse_metadata`'s `access` and `namespace`), `selector` carries
    `namespace="<it>"` and every query reads that namespace's series only.
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


# -- the table (README's metadata table, in its order) --------------------------------------------

METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("prometheusAddress", ScalerSpec, "prometheus_address", parsers.url,
                "accepted: the base URL of the Prometheus HTTP API (http or https), e.g. http://prometheus.monitoring:9090"),
    MetadataKey("scrapeTargetsFile", ScalerSpec, "scrape_targets_file", parsers.text,
                "accepted: a Prometheus file_sd JSON file inside the scaler's --scrape-targets-dir"),
    MetadataKey("redisAddress", ScalerSpec, "redis_address", parsers.redis_url,
                "accepted: redis://host:port/db or rediss://host:port/db, without credentials"),
    MetadataKey("stream", ScalerSpec, "stream", parsers.stream, "accepted: a Redis key, 1 to 200 characters without spaces"),
    MetadataKey("selector", ScalerSpec, "selector", parsers.selector,
                'accepted: PromQL label matchers, e.g. namespace="ml",deployment="sd-worker"'),
    *(MetadataKey(name, Queries, query, parsers.text, _QUERY) for name, query in (
        ("queueQuery", "queue"), ("gpuUtilizationQuery", "gpu"), ("latencyQuery", "latency"),
        ("readyReplicasQuery", "ready"), ("demandQuery", "demand"), ("arrivalsQuery", "arrivals"),
        ("capacityQuery", "capacity"), ("startupQuery", "startup"))),
    MetadataKey("window", ScalerSpec, "window", parsers.duration,
                "accepted: a PromQL duration above zero, e.g. 30s, 1m, 1h30m"),
    MetadataKey("targetQueuePerReplica", PolicySpec, "target_queue_per_replica", parsers.number,
                "accepted: a number above 0", above=0),
    MetadataKey("targetGpuUtilization", PolicySpec, "target_gpu_util_percent", parsers.number,
                "accepted: a percentage, 0 < x <= 100", above=0, at_most=100),
    MetadataKey("targetP95Seconds", PolicySpec, "target_p95_seconds", parsers.number,
                "accepted: seconds, a number above 0", above=0),
    MetadataKey("signals", PolicySpec, "signals", parsers.signals,
                "accepted: a comma list of " + ", ".join(SIGNALS)),
    MetadataKey("combine", PolicySpec, "combine", parsers.combine,
                "accepted: " + " or ".join(COMBINE_MODES)),
    MetadataKey("weights", PolicySpec, "weights", parsers.weights,
                f"accepted: e.g. queue=2,gpu=1,latency=1 (signals among {', '.join(SIGNALS)}, weights >= 0)"),
    MetadataKey("scaleUpWindowSeconds", PolicySpec, "scale_up_window_s", parsers.number,
                "accepted: seconds from 0 to 3600", at_least=0, at_most=3600),
    MetadataKey("scaleDownWindowSeconds", PolicySpec, "scale_down_window_s", parsers.number,
                "accepted: seconds from 0 to 3600", at_least=0, at_most=3600),
    MetadataKey("queueSmoothingSeconds", PolicySpec, "queue_smoothing_s", parsers.number,
                "accepted: seconds from 0 to 3600 (0: the instant queue)", at_least=0, at_most=3600),
    MetadataKey("burstFactor", PolicySpec, "burst_factor", parsers.number,
                "accepted: a number above 0", above=0),
    MetadataKey("minBusyReplicas", PolicySpec, "min_busy_replicas", parsers.count,
                "accepted: a whole number of replicas >= 1 (1 turns it off)", at_least=1),
    MetadataKey("minReplicas", PolicySpec, "min_replicas", parsers.count, REPLICAS),
    MetadataKey("maxReplicas", PolicySpec, "max_replicas", parsers.count, REPLICAS),
    MetadataKey("activationQueue", PolicySpec, "activation_queue", parsers.number,
                "accepted: a number >= 0", at_least=0),
    MetadataKey("targetCapacityUtilization", PolicySpec, "target_capacity_utilization", parsers.number,
                "accepted: a share of a replica's capacity, 0 < x <= 1", above=0, at_most=1),
    MetadataKey("spareAboveLoad", PolicySpec, "spare_above_load", parsers.number,
                "accepted: a share of one replica's capacity, >= 0 (0: the spare always holds)", at_least=0),
    MetadataKey("keepWarmQuantile", PolicySpec, "keep_warm_quantile", parsers.number,
                "accepted: a quantile, 0 < x <= 1", above=0, at_most=1),
    MetadataKey("keepWarmMultiple", PolicySpec, "keep_warm_multiple", parsers.number,
                "accepted: a number >= 0", at_least=0, at_most=1000),
    MetadataKey("keepWarmMaxSeconds", PolicySpec, "keep_warm_max_s", parsers.number,
                "accepted: seconds from 0 to 86400 (0 turns the hold off)", at_least=0, at_most=86400),
    MetadataKey("headroomSigmas", PolicySpec, "headroom_sigmas", parsers.number,
                "accepted: standard deviations, 0 to 10", at_least=0, at_most=10),
    MetadataKey("drainSeconds", PolicySpec, "drain_seconds", parsers.number,
                "accepted: seconds, a number above 0", above=0, at_most=3600),
    MetadataKey("trendWindowSeconds", PolicySpec, "trend_window_s", parsers.number,
                "accepted: seconds from 0 to 3600", at_least=0, at_most=3600),
    MetadataKey("refreshSeconds", ScalerSpec, "refresh_s", parsers.number,
                "accepted: seconds from 0.1 to 3600", at_least=0.1, at_most=3600),
    MetadataKey("staleAfterSeconds", ScalerSpec, "stale_after_s", parsers.number,
                "accepted: seconds, above 0", above=0, at_most=86400),
    MetadataKey("queryTimeoutSeconds", ScalerSpec, "query_timeout_s", parsers.number,
                "accepted: seconds from above 0 to 300", above=0, at_most=300),
    MetadataKey("metricName", ScalerSpec, "metric_name", parsers.matching(_METRIC_NAME),
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
    values: Mapping[str, Any], texts: Mapping[str, str], access: AccessRules | None, directory: str | None
) -> None:
    """The rules between keys, and between keys and the scaler's flags; raises MetadataError.

    `values` holds every key's parsed value (its default when unset), `texts` the keys that
    were set, as given; `access` the operator's rules (None: none, as the simulator parses);
    `directory` is --scrape-targets-dir.
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
        why = ("it is required, as the scaler has no --prometheus-address (redisAddress gives only the queue; ready "
               "replicas come from here or scrapeTargetsFile); ")
        raise MetadataError("prometheusAddress", None, why + _BY_NAME["prometheusAddress"].accepted)
    elif access is not None and (problem := access.prometheus_problem(address)) is not None:
        raise MetadataError("prometheusAddress", texts.get("prometheusAddress", address), problem)
    if access is not None and values["redisAddress"] is not None:
        problem = access.redis_problem(values["redisAddress"])
        if problem is not None:
            raise MetadataError("redisAddress", texts["redisAddress"], problem)

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


def _confine(values: dict[str, Any], texts: Mapping[str, str], namespace: str) -> None:
    """Confines the parsed values to `namespace` (in place): the selector gets its matcher, and
    query overrides and the stream must stay inside it; raises MetadataError naming the key."""
    try:
        matchers = confine_selector(promql.parse_selector(values["selector"]), namespace)
    except Confinement as error:
        raise MetadataError("selector", texts.get("selector"), str(error)) from None
    values["selector"] = promql.format_selector(matchers)
    for name in _QUERY_KEYS:
        if values[name] is not None:
            try:
                check_query(values[name], namespace)
            except Confinement as error:
                raise MetadataError(name, texts[name], str(error)) from None
    if values["redisAddress"] is not None:
        try:
            check_stream(values["stream"], namespace)
        except Confinement as error:
            raise MetadataError("stream", texts.get("stream", values["stream"]), str(error)) from None


def _is_known(key: str) -> bool:
    if key in KNOWN_KEYS or key in KEDA_KEYS:
        return True
    return key.endswith(FROM_ENV_SUFFIX) and key[: -len(FROM_ENV_SUFFIX)] in KNOWN_KEYS


def parse_metadata(
    metadata: Mapping[str, str],
    access: AccessRules | None = None,
    scrape_targets_dir: str | None = None,
    namespace: str | None = None,
) -> ScalerSpec:
    """The ScalerSpec a trigger's metadata map (key -> text) describes, for a ScaledObject in
    `namespace`.

    `access` holds the operator's rules (adapter/access.py): where prometheusAddress and
    redisAddress may point (an unset prometheusAddress is its `prometheus_address`), and, unless
    it allows cross-namespace reads, the confinement to `namespace`: the selector gets
    `namespace="<namespace>"` and may name no other, every query override must carry that
    matcher in every selector, and the stream must be one of the namespace's. None (the
    simulator, tests): no rules. `scrape_targets_dir` is the directory scrapeTargetsFile must
    name a file in (None: direct scraping is refused). Raises MetadataError on the first bad key:
    each key's own bounds are checked in METADATA_KEYS' order, then the rules between keys, then
    the namespace's.
    """
    texts = _texts(metadata)
    values = {key.name: key.default for key in METADATA_KEYS}
    for key in METADATA_KEYS:
        if key.name in texts:
            values[key.name] = key.parse(key, texts[key.name])
    if "signals" not in texts and values["targetP95Seconds"] is not None:
        # Unset, the signals are all that are configured, and an objective configures latency.
        values["signals"] = tuple(s for s in SIGNALS if s in values["signals"] or s == LATENCY)
    if (access is not None and access.prometheus_address and values["prometheusAddress"] is None
            and values["scrapeTargetsFile"] is None):
        values["prometheusAddress"] = access.prometheus_address.rstrip("/")
    _validate(values, texts, access, scrape_targets_dir)
    if access is not None and not access.cross_namespace:
        if namespace is None:
            raise ValueError("a namespace is needed to confine a ScaledObject's reads")
        _confine(values, texts, namespace)

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
