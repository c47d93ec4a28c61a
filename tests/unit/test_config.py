"""Trigger metadata parsing: defaults, every rejection names its key, arbitrary maps never crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.access import AccessRules
from adapter.config import FROM_ENV_SUFFIX, KNOWN_KEYS, METADATA_KEYS, MetadataError, parse_metadata
from adapter.policy import PolicySpec

BASE = {"prometheusAddress": "http://prometheus.monitoring:9090"}


def parse(**extra):
    return parse_metadata({**BASE, **extra})


def test_defaults_match_the_documented_table():
    spec = parse()
    policy = spec.policy
    assert spec.prometheus_address == "http://prometheus.monitoring:9090"
    assert (spec.window, spec.refresh_s, spec.stale_after_s, spec.query_timeout_s) == ("1m", 5, 60, 2)
    assert spec.metric_name == "composite"
    assert policy.signals == ("queue", "gpu")  # latency is off without targetP95Seconds
    assert (policy.target_queue_per_replica, policy.target_gpu_util_percent) == (8, 75)
    assert (policy.scale_up_window_s, policy.scale_down_window_s, policy.burst_factor) == (0, 300, 2)
    assert policy.min_busy_replicas == 2
    assert (policy.combine, policy.min_replicas, policy.max_replicas, policy.activation_queue) == ("max", None, None, 0)


# --- the table: every row's default, bounds and accepted text are what the parser applies ----

DEFAULTED = [key for key in METADATA_KEYS if key.default is not None]
BOUNDED = [key for key in METADATA_KEYS if (key.above, key.at_least, key.at_most) != (None, None, None)]
# Room for refreshSeconds' upper bound: staleAfterSeconds must be at least refreshSeconds.
ROOMY = {**BASE, "staleAfterSeconds": "86400"}


def field_value(spec, key):
    return getattr(spec.policy if key.owner is PolicySpec else spec, key.field)


def test_the_table_is_every_known_key_once():
    names = [key.name for key in METADATA_KEYS]
    assert len(names) == len(set(names)) and set(names) == KNOWN_KEYS


@pytest.mark.parametrize("key", DEFAULTED, ids=lambda key: key.name)
def test_an_empty_trigger_gets_each_tables_default(key):
    assert field_value(parse(), key) == key.default


@pytest.mark.parametrize("suffix", ["", FROM_ENV_SUFFIX])
@pytest.mark.parametrize("key", BOUNDED, ids=lambda key: key.name)
def test_each_bounded_key_rejects_a_non_number_naming_itself(key, suffix):
    with pytest.raises(MetadataError) as raised:
        parse_metadata({**BASE, key.name + suffix: "eight"})
    assert raised.value.key == key.name and "'eight'" in str(raised.value)


def edges(key):
    """(text, "accepted" or "rejected") at and just past each of the key's bounds."""
    def step(bound):
        return 1 if float(bound).is_integer() else 0.01

    if key.above is not None:
        yield f"{key.above:g}", "rejected"
    if key.at_least is not None:
        yield f"{key.at_least:g}", "accepted"
        yield f"{key.at_least - step(key.at_least):g}", "rejected"
    if key.at_most is not None:
        yield f"{key.at_most:g}", "accepted"
        yield f"{key.at_most + step(key.at_most):g}", "rejected"


@pytest.mark.parametrize(
    "key, text, outcome",
    [(key, text, outcome) for key in BOUNDED for text, outcome in edges(key)],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_each_bound_in_the_table_holds_at_its_edge(key, text, outcome):
    metadata = {**ROOMY, key.name: text}
    if outcome == "accepted":
        assert field_value(parse_metadata(metadata), key) == float(text)
        return
    with pytest.raises(MetadataError) as raised:
        parse_metadata(metadata)
    assert raised.value.key == key.name and raised.value.value == text
    assert str(raised.value).endswith(key.accepted)


def test_replica_counts_go_up_to_a_million():
    assert parse(maxReplicas="1000000").policy.max_replicas == 1_000_000


def test_latency_is_enabled_by_its_objective():
    assert parse(targetP95Seconds="12").policy.signals == ("queue", "gpu", "latency")


def test_builtin_queries_use_the_selector_and_window():
    spec = parse(selector='namespace="ml",deployment="sd-worker"', window="30s")
    sel = '{namespace="ml",deployment="sd-worker"}'
    assert spec.queries.queue == f"sum(diffusion_requests_in_flight{sel})"
    assert spec.queries.gpu == f"avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{sel}[30s]))"
    assert spec.queries.latency == (
        f"histogram_quantile(0.95, sum by (le) (rate(diffusion_request_duration_seconds_bucket{sel}[30s])))"
    )
    assert spec.queries.ready == f"sum(diffusion_ready{sel})"


def test_query_overrides_replace_the_builtins():
    spec = parse(queueQuery="sum(my_queue)", readyReplicasQuery="count(up)")
    assert (spec.queries.queue, spec.queries.ready) == ("sum(my_queue)", "count(up)")


def test_from_env_keys_resolved_by_keda_are_accepted():
    spec = parse_metadata({"prometheusAddressFromEnv": "http://p:9090", "minReplicasFromEnv": "2"})
    assert spec.prometheus_address == "http://p:9090" and spec.policy.min_replicas == 2
    assert spec.unknown_keys == ()


def test_kedas_own_keys_are_not_reported_as_unknown_but_others_are():
    spec = parse(scalerAddress="scaler:6000", enableTLS="true", unsafeSsl="false", targetQueue="3")
    assert spec.unknown_keys == ("targetQueue",)


def test_weights_parse_in_weighted_mode():
    spec = parse(combine="weighted", weights="queue=2, gpu=0.5", targetP95Seconds="5")
    assert dict(spec.policy.weights) == {"queue": 2.0, "gpu": 0.5, "latency": 1.0, "capacity": 1.0}


def test_allowed_urls_restrict_the_prometheus_address_at_a_host_and_path_boundary():
    allowed = AccessRules(allowed_prometheus_urls=("http://prometheus.monitoring:9090",))
    parse_metadata(BASE, allowed, namespace="ml")
    parse_metadata({**BASE, "prometheusAddress": "http://prometheus.monitoring:9090/sub"}, allowed, namespace="ml")
    # A prefix is a server and a path, not a string: these would start with the allowed text.
    for address in ("http://evil:9090", "http://prometheus.monitoring:9090.evil.example", "http://prometheus.monitoring:90901",
                    "https://prometheus.monitoring:9090", "http://prometheus.monitoring:9090x/"):
        with pytest.raises(MetadataError) as raised:
            parse_metadata({**BASE, "prometheusAddress": address}, allowed, namespace="ml")
        assert raised.value.key == "prometheusAddress"


@pytest.mark.parametrize(
    "metadata, key, says",
    [
        ({}, "prometheusAddress", "required"),
        ({"prometheusAddress": "prometheus:9090"}, "prometheusAddress", "base URL"),
        ({**BASE, "combine": "sum"}, "combine", "max or weighted"),
        ({**BASE, "targetQueuePerReplica": "eight"}, "targetQueuePerReplica", "above 0"),
        ({**BASE, "targetQueuePerReplica": "0"}, "targetQueuePerReplica", "above 0"),
        ({**BASE, "targetQueuePerReplica": "nan"}, "targetQueuePerReplica", "above 0"),
        ({**BASE, "targetGpuUtilization": "101"}, "targetGpuUtilization", "0 < x <= 100"),
        ({**BASE, "targetGpuUtilization": "-5"}, "targetGpuUtilization", "0 < x <= 100"),
        ({**BASE, "targetP95Seconds": "inf"}, "targetP95Seconds", "above 0"),
        ({**BASE, "window": "1 minute"}, "window", "PromQL duration"),
        ({**BASE, "window": "0s"}, "window", "PromQL duration"),
        ({**BASE, "signals": "queue,memory"}, "signals", "queue, gpu, latency"),
        ({**BASE, "signals": "latency"}, "signals", "targetP95Seconds"),
        ({**BASE, "weights": "queue=2"}, "weights", "combine=weighted"),
        ({**BASE, "combine": "weighted", "weights": "queue=x"}, "weights", "queue=2"),
        ({**BASE, "combine": "weighted", "weights": "queue=0,gpu=0"}, "weights", "above 0"),
        ({**BASE, "minReplicas": "1.5"}, "minReplicas", "whole number"),
        ({**BASE, "minBusyReplicas": "0"}, "minBusyReplicas", "1 turns it off"),
        ({**BASE, "minBusyReplicas": "two"}, "minBusyReplicas", "whole number"),
        ({**BASE, "minReplicas": "5", "maxReplicas": "2"}, "minReplicas", "maxReplicas"),
        ({**BASE, "scaleDownWindowSeconds": "-1"}, "scaleDownWindowSeconds", "0 to 3600"),
        ({**BASE, "scaleUpWindowSeconds": "3601"}, "scaleUpWindowSeconds", "0 to 3600"),
        ({**BASE, "burstFactor": "0"}, "burstFactor", "above 0"),
        ({**BASE, "activationQueue": "-1"}, "activationQueue", ">= 0"),
        ({**BASE, "maxReplicas": "1000001"}, "maxReplicas", "0 to 1000000"),
        ({**BASE, "refreshSeconds": "0.05"}, "refreshSeconds", "0.1 to 3600"),
        ({**BASE, "refreshSeconds": "3601"}, "refreshSeconds", "0.1 to 3600"),
        ({**BASE, "staleAfterSeconds": "86401"}, "staleAfterSeconds", "above 0"),
        ({**BASE, "queryTimeoutSeconds": "301"}, "queryTimeoutSeconds", "above 0 to 300"),
        ({**BASE, "refreshSeconds": "10", "staleAfterSeconds": "5"}, "staleAfterSeconds", "refreshSeconds"),
        ({**BASE, "selector": "namespace=ml"}, "selector", "label matchers"),
        ({**BASE, "selector": 'a="b"} or vector(1'}, "selector", "label matchers"),
        ({**BASE, "metricName": "has space"}, "metricName", "letters"),
    ],
)
def test_bad_metadata_names_the_key_the_value_and_what_is_accepted(metadata, key, says):
    with pytest.raises(MetadataError) as raised:
        parse_metadata(metadata)
    assert raised.value.key == key
    assert key in str(raised.value) and says in str(raised.value)
    if raised.value.value is not None:
        assert repr(raised.value.value) in str(raised.value)


@pytest.mark.parametrize(
    "selector",
    ['namespace="ml"', 'namespace="ml", deployment=~"sd-.*",', "pod!='x'", 'a!~"b\\"c"', ""],
)
def test_valid_selectors_are_accepted(selector):
    assert parse(selector=selector).selector == selector


# --- property-based: arbitrary maps never crash, every rejection is a MetadataError ----

KEYS = st.one_of(st.sampled_from(sorted(KNOWN_KEYS)), st.text(max_size=12))
NEAR_VALID = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1", "8", "75", "100", "1e309", "nan", "inf", "1m", "5s", "max", "weighted"]),
    st.sampled_from(["queue", "gpu,latency", "queue=2,gpu=1", 'namespace="ml"', "http://127.0.0.1:1",
                     "redis://127.0.0.1:1/0", "redis://:pw@h", "jobs:a"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers().map(str),
)
MAPS = st.dictionaries(KEYS, NEAR_VALID, max_size=12)


@settings(max_examples=500, deadline=None)
@given(MAPS, st.booleans())
def test_arbitrary_metadata_either_parses_or_raises_metadata_error(metadata, with_address):
    if with_address:
        metadata = {**metadata, "prometheusAddress": "http://127.0.0.1:1"}
    try:
        spec = parse_metadata(metadata)
    except MetadataError as e:
        assert e.key in KNOWN_KEYS
        return
    policy = spec.policy
    assert policy.signals and set(policy.signals) <= {"queue", "gpu", "latency"}
    assert policy.target_queue_per_replica > 0 and 0 < policy.target_gpu_util_percent <= 100
    assert spec.stale_after_s >= spec.refresh_s > 0


def test_scrape_targets_file_is_confined_to_the_scalers_directory(tmp_path):
    base = {"selector": 'deployment="sd"', "scrapeTargetsFile": "workers.json"}
    with pytest.raises(MetadataError, match="start it with --scrape-targets-dir"):
        parse_metadata(base)
    spec = parse_metadata(base, scrape_targets_dir=str(tmp_path))
    assert spec.scrape_targets_file == str(tmp_path / "workers.json") and spec.prometheus_address == ""
    for outside in ("../../etc/passwd", "workers\x00.json"):  # a NUL byte is no file of ours either
        with pytest.raises(MetadataError, match="inside --scrape-targets-dir"):
            parse_metadata({**base, "scrapeTargetsFile": outside}, scrape_targets_dir=str(tmp_path))
    with pytest.raises(MetadataError, match="not both"):
        parse_metadata({**base, "prometheusAddress": "http://p:9090"}, scrape_targets_dir=str(tmp_path))
    with pytest.raises(MetadataError, match="query overrides need prometheusAddress"):
        parse_metadata({**base, "queueQuery": "sum(x)"}, scrape_targets_dir=str(tmp_path))


def test_each_keys_own_check_comes_before_the_rules_between_keys():
    """With several faults, the first reported is a key that is wrong on its own (the table's
    parse step), not a rule between keys (the validate step): here latency without its
    objective is the rule, burstFactor=0 the key."""
    with pytest.raises(MetadataError) as caught:
        parse(signals="latency", burstFactor="0")
    assert caught.value.key == "burstFactor"


@pytest.mark.parametrize("source", ["prometheus", "direct"])
def test_a_selector_one_source_could_not_use_is_refused_for_both(source, tmp_path):
    """Whatever the parser accepts, both sources must be able to use: single quotes are PromQL
    and the direct scrape reads them too; a regular expression that does not compile is refused
    up front (INVALID_ARGUMENT) instead of failing every refresh."""
    base = ({**BASE} if source == "prometheus" else {"scrapeTargetsFile": "w.json"})
    parse_metadata({**base, "selector": "namespace='ml',deployment=~'sd-.*'"}, scrape_targets_dir=str(tmp_path))
    with pytest.raises(MetadataError, match="selector"):
        parse_metadata({**base, "selector": 'deployment=~"sd-("'}, scrape_targets_dir=str(tmp_path))


# --- the Redis source: the queue from a stream's backlog ------------------------------------------

REDIS = {**BASE, "redisAddress": "redis://redis.queue:6379/0"}


@pytest.mark.parametrize("address", ["redis://redis.queue:6379/0", "redis://127.0.0.1", "rediss://r.example:6380/3",
                                     "redis://[::1]:6379/", "redis://redis.queue:6379"])
def test_redis_address_takes_a_redis_url_with_an_optional_db(address):
    spec = parse(redisAddress=address)
    assert spec.redis_address == address and spec.stream == "diffusion:jobs"
    assert spec.prometheus_address == BASE["prometheusAddress"]  # the other signals stay with Prometheus


def test_the_stream_is_named_by_its_key():
    assert parse_metadata({**REDIS, "stream": "sd:jobs"}).stream == "sd:jobs"
    assert parse_metadata({**REDIS, "streamFromEnv": "sd:env"}).stream == "sd:env"


@pytest.mark.parametrize(
    "address",
    ["redis.queue:6379", "http://redis.queue:6379", "redis://", "redis://h:99999", "redis://h/db0", "redis://h/0/1",
     "redis://h/0?ssl_cert_reqs=none", "redis://h/0#x", "unix:///run/redis.sock"],
)
def test_a_redis_address_that_is_not_a_redis_url_is_refused(address):
    with pytest.raises(MetadataError) as raised:
        parse(redisAddress=address)
    assert raised.value.key == "redisAddress" and raised.value.value == address
    assert str(raised.value).endswith("accepted: redis://host:port/db or rediss://host:port/db, without credentials")


@pytest.mark.parametrize("address", ["redis://:s3cret@redis.queue:6379/0", "redis://admin:s3cret@redis.queue/0",
                                     "rediss://s3cret@redis.queue"])
def test_credentials_in_the_redis_address_are_refused_without_repeating_them(address):
    with pytest.raises(MetadataError) as raised:
        parse(redisAddress=address)
    assert raised.value.key == "redisAddress"
    assert "s3cret" not in str(raised.value) and "***@redis.queue" in str(raised.value)
    assert "--redis-password-file or SCALER_REDIS_PASSWORD" in str(raised.value)


@pytest.mark.parametrize("stream", ["has space", "x" * 201])
def test_a_stream_name_redis_keys_cannot_carry_is_refused(stream):
    with pytest.raises(MetadataError) as raised:
        parse_metadata({**REDIS, "stream": stream})
    assert raised.value.key == "stream" and "1 to 200 characters without spaces" in str(raised.value)


def test_a_stream_without_redis_address_is_refused():
    with pytest.raises(MetadataError, match="only with redisAddress") as raised:
        parse(stream="sd:jobs")
    assert raised.value.key == "stream"


def test_queue_query_and_redis_address_conflict():
    with pytest.raises(MetadataError, match="not both") as raised:
        parse_metadata({**REDIS, "queueQuery": "sum(my_queue)"})
    assert raised.value.key == "queueQuery" and raised.value.value == "sum(my_queue)"
    parse_metadata({**REDIS, "readyReplicasQuery": "count(up)"})  # the other overrides still apply


def test_redis_alone_is_refused_because_ready_replicas_need_prometheus_or_direct_scrapes(tmp_path):
    """The policy needs ready replicas (burst, the restart hold, the GPU proposal); Redis has only
    the queue, and an always-empty fleet would let a restarted scaler scale a busy one down."""
    with pytest.raises(MetadataError, match="redisAddress gives only the queue") as raised:
        parse_metadata({"redisAddress": "redis://r:6379/0"})
    assert raised.value.key == "prometheusAddress"
    direct = parse_metadata({"redisAddress": "redis://r:6379/0", "scrapeTargetsFile": "w.json"},
                            scrape_targets_dir=str(tmp_path))
    assert direct.redis_address == "redis://r:6379/0" and direct.scrape_targets_file == str(tmp_path / "w.json")


def test_the_redis_password_is_the_scalers_own_setting_from_a_file_or_else_the_environment(tmp_path, monkeypatch):
    from adapter.__main__ import build_parser, config_from_args

    def config(*flags):
        return config_from_args(build_parser().parse_args(list(flags)))

    monkeypatch.delenv("SCALER_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("SCALER_REDIS_ADDRESS", raising=False)
    assert config().redis_access.password is None
    secret = tmp_path / "password"
    secret.write_text("from-file\n")  # a mounted Secret's trailing newline is not part of it
    with pytest.raises(ValueError, match="--redis-address"):  # a password with nowhere safe to go
        config("--redis-password-file", str(secret))
    monkeypatch.setenv("SCALER_REDIS_ADDRESS", "redis://redis.ml:6379")
    monkeypatch.setenv("SCALER_REDIS_PASSWORD", "from-env")
    assert config().redis_access.password == "from-env"
    loaded = config("--redis-password-file", str(secret))
    assert loaded.redis_access.password == "from-file" and "from-file" not in repr(loaded)
