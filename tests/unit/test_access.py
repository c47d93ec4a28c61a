"""The rules for what a ScaledObject's metadata may reach (adapter/access.py), attacked one by one
at the parser; tests/integration/test_tenancy.py attacks them over gRPC with real servers."""

from __future__ import annotations

import pytest

from adapter import promql
from adapter.access import (
    AccessRules, Confinement, Denied, Endpoint, check_query, check_resolved, check_stream, confine_selector, denied,
    excerpt, parse_networks,
)  # fmt: skip
from adapter.config import METADATA_KEYS, MetadataError, parse_metadata
from contract.jobqueue import namespaced_stream, stream_namespace

RULES = AccessRules()  # the defaults: confined, the default denied networks
OPERATOR = AccessRules(prometheus_address="http://prometheus.monitoring:9090", redis_address="redis://redis.ml:6379")
QUERY_KEYS = [k.name for k in METADATA_KEYS if k.name.endswith("Query")]


def parse(metadata: dict[str, str], rules: AccessRules = OPERATOR, namespace: str = "tenant-b"):
    return parse_metadata({"prometheusAddress": "http://prometheus.monitoring:9090", **metadata}, rules,
                          namespace=namespace)


# -- addresses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "http://169.254.169.254", "http://169.254.169.254:80/latest/meta-data", "http://[fe80::1]:9090",
    "http://[fd00:ec2::254]", "http://100.100.100.200", "http://127.0.0.1:9102", "http://[::1]:9090",
    "http://0.0.0.0:9090", "http://[::ffff:169.254.169.254]",
])  # fmt: skip
def test_a_metadata_address_in_a_denied_network_is_refused_naming_the_key(address):
    with pytest.raises(MetadataError) as raised:
        parse({"prometheusAddress": address})
    assert raised.value.key == "prometheusAddress" and "--denied-networks" in str(raised.value)
    with pytest.raises(MetadataError) as raised:
        parse({"redisAddress": address.replace("http://", "redis://"), "stream": "diffusion:tenant-b:w"})
    assert raised.value.key == "redisAddress"


def test_the_operators_own_addresses_are_exempt_from_the_denied_networks():
    local = AccessRules(prometheus_address="http://127.0.0.1:9090", redis_address="redis://127.0.0.1:6379")
    assert parse({"prometheusAddress": "http://127.0.0.1:9090"}, local).prometheus_address == "http://127.0.0.1:9090"
    assert parse({"prometheusAddress": "http://127.0.0.1:9090", "redisAddress": "redis://127.0.0.1:6379/0",
                  "stream": "diffusion:tenant-b:w"}, local).redis_address == "redis://127.0.0.1:6379/0"
    with pytest.raises(MetadataError):  # another port of the same host is not the operator's
        parse({"prometheusAddress": "http://127.0.0.1:9091"}, local)


@pytest.mark.parametrize("address", ["ftp://prometheus:21", "file:///etc/passwd", "gopher://x:70", "unix:///run/x"])
def test_only_http_and_https_addresses(address):
    with pytest.raises(MetadataError) as raised:
        parse({"prometheusAddress": address})
    assert raised.value.key == "prometheusAddress"


def test_without_prometheus_address_metadata_reads_the_operators():
    assert parse_metadata({}, OPERATOR, namespace="ml").prometheus_address == "http://prometheus.monitoring:9090"
    with pytest.raises(MetadataError) as raised:
        parse_metadata({}, RULES, namespace="ml")
    assert raised.value.key == "prometheusAddress" and "--prometheus-address" in str(raised.value)


def test_endpoints_compare_as_origins_not_as_text():
    home = Endpoint.of("http://prometheus.monitoring:9090")
    assert Endpoint.of("HTTP://Prometheus.Monitoring:9090/").same_as(home)
    assert Endpoint.of("http://prometheus.monitoring:80").same_server(Endpoint.of("http://prometheus.monitoring"))
    for other in ("http://prometheus.monitoring.evil.example:9090", "http://prometheus.monitoring:9091",
                  "https://prometheus.monitoring:9090", "http://evil@prometheus.monitoring.evil:9090",
                  "http://prometheus.monitoring:9090/other"):
        assert not Endpoint.of(other).same_as(home), other
    assert Endpoint.of("http://p:9090/a/b").within(Endpoint.of("http://p:9090/a"))
    assert not Endpoint.of("http://p:9090/ab").within(Endpoint.of("http://p:9090/a"))


def test_denied_reads_mapped_and_scoped_addresses_and_ignores_names():
    networks = parse_networks(["169.254.0.0/16", "fe80::/10"])
    assert str(denied("::ffff:169.254.169.254", networks)) == "169.254.0.0/16"
    assert str(denied("fe80::1%eth0", networks)) == "fe80::/10"
    assert denied("10.0.0.1", networks) is None and denied("metadata.google.internal", networks) is None
    with pytest.raises(ValueError, match="not a CIDR block"):
        parse_networks(["169.254.0.0/33"])


def test_a_name_resolving_into_a_denied_network_is_refused_even_beside_an_allowed_address():
    networks = parse_networks(["169.254.0.0/16"])
    check_resolved("prometheus", ["10.0.0.5"], networks)
    with pytest.raises(Denied, match="169.254.169.254"):
        check_resolved("rebinding.example", ["10.0.0.5", "169.254.169.254"], networks)


def test_with_an_allow_list_every_other_address_is_refused():
    strict = AccessRules(prometheus_address="http://prometheus.monitoring:9090",
                         allowed_prometheus_urls=("http://prometheus.monitoring:9090",))
    with pytest.raises(MetadataError) as raised:
        parse({"prometheusAddress": "http://attacker.tenant-b:9090"}, strict)
    assert raised.value.key == "prometheusAddress" and "only queries addresses within" in str(raised.value)


def test_excerpts_are_one_bounded_line():
    assert excerpt("x" * 10_000) == "x" * 200 + "..."
    assert excerpt("a\nb\x1b[31mc") == "a b [31mc"


# -- namespaces ----------------------------------------------------------------------------------

def test_the_selector_gets_the_namespace_and_every_builtin_query_carries_it():
    spec = parse({"selector": 'deployment="sd-worker"'})
    assert promql.parse_selector(spec.selector)[0] == ("namespace", "=", "tenant-b")
    for name, query in vars(spec.queries).items():
        check_query(query, "tenant-b")  # raises if a built-in query read outside the namespace
        with pytest.raises(Confinement):
            check_query(query, "tenant-a")
    assert parse({}).selector == 'namespace="tenant-b"'


@pytest.mark.parametrize("selector", [
    'namespace="tenant-a"', 'namespace=~"tenant-.*"', 'namespace!="tenant-b"', 'namespace=~"tenant-b|tenant-a"',
    'deployment="x",namespace="tenant-a"',
])  # fmt: skip
def test_a_selector_naming_another_namespace_is_refused(selector):
    with pytest.raises(MetadataError) as raised:
        parse({"selector": selector})
    assert raised.value.key == "selector" and "--allow-cross-namespace" in str(raised.value)


def test_the_selector_may_name_its_own_namespace():
    assert confine_selector((("namespace", "=", "ml"), ("a", "=", "b")), "ml") == (("namespace", "=", "ml"), ("a", "=", "b"))


@pytest.mark.parametrize("query", [
    'sum(diffusion_requests_in_flight{namespace="tenant-a"})',
    "sum(diffusion_requests_in_flight)",
    'sum(diffusion_requests_in_flight{namespace=~"tenant-b"})',
    'sum(x{namespace="tenant-b"}) + sum(y{namespace="tenant-a"})',
    'sum(x{namespace="tenant-b" or job="w"})',
    'max_over_time(x{namespace="tenant-b"}[5m:1m]) / count(up)',
    'label_replace(up, "namespace", "tenant-b", "", "")',
    'sum(rate(x{namespace="tenant-b"}[1m]',  # does not parse: refused, not waved through
])  # fmt: skip
@pytest.mark.parametrize("key", QUERY_KEYS)
def test_a_query_override_reading_outside_its_namespace_is_refused(key, query):
    with pytest.raises(MetadataError) as raised:
        parse({key: query})
    assert raised.value.key == key


def test_a_query_override_inside_its_namespace_is_taken():
    query = 'sum(rate(x{namespace="tenant-b",job="w"}[1m])) / sum(y{namespace="tenant-b"}) or vector(0)'
    assert parse({"queueQuery": query}).queries.queue == query


def test_cross_namespace_reads_are_the_operators_choice():
    trusted = AccessRules(prometheus_address="http://prometheus.monitoring:9090", cross_namespace=True)
    spec = parse({"selector": 'namespace="tenant-a"', "gpuUtilizationQuery": "avg(x)", "redisAddress": "redis://r:6379",
                  "stream": "diffusion:jobs"}, trusted)
    assert spec.selector == 'namespace="tenant-a"' and spec.queries.gpu == "avg(x)"


@pytest.mark.parametrize("stream", ["diffusion:tenant-a:sd-worker", "diffusion:jobs", "tenant-b:jobs",
                                    "diffusion:tenant-b", "x:diffusion:tenant-b:w"])
def test_a_stream_of_another_namespace_or_of_none_is_refused(stream):
    with pytest.raises(MetadataError) as raised:
        parse({"redisAddress": "redis://redis.ml:6379", "stream": stream})
    assert raised.value.key == "stream"
    with pytest.raises(MetadataError) as raised:  # unset: the local default belongs to no namespace
        parse({"redisAddress": "redis://redis.ml:6379"})
    assert raised.value.key == "stream" and "diffusion:tenant-b:<name>" in str(raised.value)


def test_a_stream_of_its_own_namespace_is_taken():
    stream = namespaced_stream("tenant-b", "sd-worker")
    assert stream_namespace(stream) == "tenant-b"
    assert parse({"redisAddress": "redis://redis.ml:6379", "stream": stream}).stream == stream
    check_stream("diffusion:tenant-b:a:b", "tenant-b")


def test_without_rules_nothing_is_confined():
    """The simulator and the library parse with no rules: nothing here is a tenant's."""
    spec = parse_metadata({"prometheusAddress": "http://127.0.0.1:9090", "selector": 'namespace="a"'})
    assert spec.selector == 'namespace="a"'
