"""Fault injection: Prometheus stopped, hung, unreachable; bad metadata over the wire."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK
from adapter.config import KNOWN_KEYS
from contract import names
from lab.localprom import free_port
from lab.synthetic import PodLoad

from .conftest import eventually, eventually_fails, metrics_request, ref, require_prometheus, scaler_labels
from .test_scaler_with_prometheus import sample

pytestmark = pytest.mark.integration


def value_of(scaler, so) -> float:
    return scaler.stub.GetMetrics(metrics_request(so)).metricValues[0].metricValueFloat


def assert_value(scaler, so, expected):
    assert value_of(scaler, so) == expected


def test_prometheus_stopped_serves_the_last_good_value_then_unavailable_then_recovers(
    own_prometheus, fleet, scaler, deployment
):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=24))
    so = ref(deployment, own_prometheus.url, staleAfterSeconds="4")
    eventually(lambda: assert_value(scaler, so, 3.0))

    own_prometheus.stop()
    stopped_at = time.monotonic()
    # Served from the cache while fresh enough, and fast: no RPC waits on the dead server.
    started = time.perf_counter()
    assert value_of(scaler, so) == 3.0
    assert scaler.stub.IsActive(so).result is True
    assert time.perf_counter() - started < 0.5

    error = eventually_fails(lambda: value_of(scaler, so), timeout_s=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - stopped_at >= 3.0  # not before staleAfterSeconds (4 s from the last good read)
    assert "queue, ready, gpu, demand, arrivals, capacity, startup queries: request to" in error.details()
    assert "Connect call failed" in error.details()
    is_active_error = eventually_fails(lambda: scaler.stub.IsActive(so), timeout_s=1)
    assert is_active_error.code() == grpc.StatusCode.UNAVAILABLE
    labels = scaler_labels(deployment)
    assert sample(scaler, names.SCALER_STALE, **labels) == 1
    assert sample(scaler, names.SCALER_REFRESHES + "_total", result="error", **labels) >= 1

    own_prometheus.start()
    eventually(lambda: assert_value(scaler, so, 3.0), timeout_s=20)
    assert sample(scaler, names.SCALER_STALE, **labels) == 0


def test_a_hung_prometheus_times_out_without_slowing_rpcs(own_prometheus, fleet, scaler, deployment):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=8))  # 1 by the queue; minBusyReplicas makes it 2
    so = ref(deployment, own_prometheus.url, staleAfterSeconds="5", queryTimeoutSeconds="0.3")
    eventually(lambda: assert_value(scaler, so, 2.0))

    own_prometheus.pause()
    try:
        labels = scaler_labels(deployment)

        def timed_out():
            assert sample(scaler, names.SCALER_QUERY_FAILURES + "_total", query=names.QUEUE, **labels) >= 1

        eventually(timed_out, timeout_s=5)
        started = time.perf_counter()
        assert value_of(scaler, so) == 2.0
        assert time.perf_counter() - started < 0.5
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "no answer within 0.3s" in error.details()
    finally:
        own_prometheus.resume()
    eventually(lambda: assert_value(scaler, so, 2.0), timeout_s=20)


def test_a_first_call_to_a_hung_prometheus_fails_within_the_query_timeout(own_prometheus, scaler, deployment):
    own_prometheus.pause()
    try:
        so = ref(deployment, own_prometheus.url, queryTimeoutSeconds="0.5")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            scaler.stub.GetMetrics(metrics_request(so), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3.0
        assert "no value yet" in raised.value.details()
    finally:
        own_prometheus.resume()


def test_a_first_call_to_an_unreachable_prometheus_is_unavailable(scaler, deployment):
    so = ref(deployment, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.IsActive(so, timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queue, ready, gpu, demand, arrivals, capacity, startup queries: request to http://127.0.0.1:" in raised.value.details()
    assert "Connect call failed" in raised.value.details()


@pytest.mark.parametrize("method", ["IsActive", "GetMetricSpec", "GetMetrics", "StreamIsActive", "StreamMetricSpec"])
def test_bad_metadata_is_invalid_argument_on_every_rpc(scaler, method):
    so = ref("sd", "http://127.0.0.1:9090", combine="median")
    request = metrics_request(so) if method == "GetMetrics" else so
    call = getattr(scaler.stub, method)
    with pytest.raises(grpc.RpcError) as raised:
        answer = call(request, timeout=5)
        if method.startswith("Stream"):
            next(answer)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "trigger metadata combine: 'median' is not valid; accepted: max or weighted"
    assert sample(scaler, names.SCALER_GRPC_REQUESTS + "_total", method=method, code="INVALID_ARGUMENT") == 1


def test_a_full_registry_is_resource_exhausted(start_scaler):
    scaler = start_scaler(max_scaled_objects=1)
    scaler.stub.GetMetricSpec(ref("a", "http://127.0.0.1:9"))
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.GetMetricSpec(ref("b", "http://127.0.0.1:9"))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def shared_scaler():
    from .conftest import RunningScaler
    from adapter.server import ServerConfig

    scaler = RunningScaler(ServerConfig(listen_address="127.0.0.1", grpc_port=0, http_port=0, kubernetes_api="off",
                                        denied_networks=DENIED_NETWORKS_BUT_LOOPBACK))
    yield scaler
    scaler.close()


METADATA = st.dictionaries(
    st.one_of(st.sampled_from(sorted(KNOWN_KEYS)), st.text(max_size=10)),
    st.one_of(
        st.text(max_size=16),
        st.sampled_from(["0", "-3", "2.5", "nan", "1e999", "1m", "weighted", "latency", "queue=1", 'a="b"']),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata=METADATA, with_address=st.booleans())
def test_arbitrary_metadata_over_grpc_is_accepted_or_invalid_argument(shared_scaler, metadata, with_address):
    if with_address:
        # a closed port: registered targets refresh against nothing, harmlessly
        metadata = {**metadata, "prometheusAddress": "http://127.0.0.1:9"}
    so = ref("sd", "unused", **{})
    so.scalerMetadata.clear()
    so.scalerMetadata.update(metadata)
    try:
        shared_scaler.stub.GetMetricSpec(so, timeout=5)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    # the server is still healthy after every example
    assert shared_scaler.server.health()[0]


def test_series_that_vanish_from_a_serving_fleet_are_missing_data_not_zero(fleet, deployment, scaler, tmp_path):
    """Issue 12's case: 4 ready pods with 10 in flight each (5 replicas at 8 per replica), then the
    pods drop out of Prometheus' discovery while they keep serving, so every query answers an
    empty vector. The scaler serves 5 until staleAfterSeconds, then UNAVAILABLE (KEDA's fallback),
    with scaler_stale 1; never 0 and never inactive."""
    import json

    from lab.localprom import LocalPrometheus

    require_prometheus()
    for i in range(4):
        fleet.set_pod("ml", deployment, f"{deployment}-{i}", PodLoad(queue=10))
    discovery = tmp_path / "pods.json"
    discovery.write_text(json.dumps([{"targets": [fleet.address]}]))
    config = json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pods", "scrape_timeout": "1s",
                            "file_sd_configs": [{"files": [str(discovery)], "refresh_interval": "1s"}]}],
    })
    with LocalPrometheus([], config_text=config) as prometheus:
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", scaleDownWindowSeconds="5",
                 staleAfterSeconds="12")
        eventually(lambda: assert_value(scaler, so, 5.0), timeout_s=30)
        discovery.write_text("[]")  # the pods leave discovery; they keep serving
        emptied = time.monotonic()
        while time.monotonic() - emptied < 8:  # within staleAfterSeconds: the last good value
            assert value_of(scaler, so) == 5.0
            assert scaler.stub.IsActive(so).result is True
            time.sleep(0.5)
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=15)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "missing data, not zero" in error.details()
        assert sample(scaler, names.SCALER_STALE, **scaler_labels(deployment)) == 1
    for i in range(4):
        fleet.remove_pod("ml", deployment, f"{deployment}-{i}")
