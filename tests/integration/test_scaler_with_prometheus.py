"""The scaler against a real Prometheus scraping a synthetic fleet, called over real gRPC."""

from __future__ import annotations

import math
import queue
import threading
import time

import grpc
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from contract import names
from lab.synthetic import PodLoad

from .conftest import eventually, eventually_fails, metrics_request, ref, scaler_labels, wait_until_scraped

pytestmark = pytest.mark.integration


def scrape(scaler) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{scaler.server.http_port}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(scaler, name: str, **labels) -> float:
    wanted = set(labels.items())
    for (sample_name, sample_labels), value in scrape(scaler).items():
        if sample_name == name and wanted <= set(sample_labels):
            return value
    raise AssertionError(f"no sample {name}{labels}")


def p95_in_bucket(latency_s: float, lower: float, upper: float) -> float:
    """Prometheus' linear interpolation when every observation falls in (lower, upper]."""
    assert lower < latency_s <= upper
    return lower + (upper - lower) * 0.95


def test_every_rpc_answers_with_the_composite_of_real_prometheus_signals(prometheus, fleet, scaler, deployment):
    for i in range(3):
        load = PodLoad(queue=12, gpu_util_percent=90, request_duration_s=6.0, requests_per_s=2)
        fleet.set_pod("ml", deployment, f"{deployment}-{i}", load)
    so = ref(deployment, prometheus.url, targetQueuePerReplica="8", targetP95Seconds="4", window="10s")

    spec = scaler.stub.GetMetricSpec(so)
    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [("composite", 1, 1.0)]

    p95 = p95_in_bucket(6.0, 5, 7.5)  # 7.375 s
    # latency may add one replica beyond max(ready, queue's need) = 5: 6, not capped here
    expected = {names.QUEUE: math.ceil(36 / 8), names.GPU: math.ceil(3 * 90 / 75), names.LATENCY: math.ceil(3 * p95 / 4)}
    assert expected == {names.QUEUE: 5, names.GPU: 4, names.LATENCY: 6}

    def composite_is_six():
        answer = scaler.stub.GetMetrics(metrics_request(so))
        [value] = answer.metricValues
        assert (value.metricName, value.metricValueFloat, value.metricValue) == ("composite", 6.0, 6)

    eventually(composite_is_six, timeout_s=20)
    assert scaler.stub.IsActive(so).result is True

    labels = scaler_labels(deployment, "composite")
    for signal, replicas in expected.items():
        assert sample(scaler, names.SCALER_PROPOSAL, signal=signal, **labels) == replicas
    assert sample(scaler, names.SCALER_QUEUE, **labels) == 36
    assert sample(scaler, names.SCALER_READY, **labels) == 3
    assert sample(scaler, names.SCALER_GPU, **labels) == pytest.approx(90)
    assert sample(scaler, names.SCALER_P95, **labels) == pytest.approx(p95)
    assert sample(scaler, names.SCALER_COMPOSITE, **labels) == 6
    assert sample(scaler, names.SCALER_DESIRED, **labels) == 6
    assert sample(scaler, names.SCALER_LIMITING, signal=names.LATENCY, **labels) == 1
    assert sample(scaler, names.SCALER_STALE, **labels) == 0
    assert sample(scaler, names.SCALER_GRPC_REQUESTS + "_total", method="GetMetrics", code="OK") >= 1
    assert sample(scaler, names.SCALER_GRPC_REQUESTS + "_total", method="GetMetricSpec", code="OK") == 1
    # one request per refresh carries all four queries
    assert sample(scaler, names.SCALER_QUERY_DURATION + "_count", query="combined") >= 1
    assert sample(scaler, names.SCALER_QUERY_LAST_DURATION, query=names.LATENCY, **labels) > 0


def test_an_override_returning_a_scalar_falls_back_to_one_request_per_query(prometheus, fleet, scaler, deployment):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=20))
    override = f'scalar(sum({names.REQUESTS_IN_FLIGHT}{{namespace="ml",deployment="{deployment}"}}))'
    so = ref(deployment, prometheus.url, queueQuery=override, signals=names.QUEUE)
    eventually(lambda: _assert_value(scaler, so, 3.0))
    assert sample(scaler, names.SCALER_QUERY_DURATION + "_count", query=names.QUEUE) >= 1


@pytest.mark.parametrize(
    "override, says",
    [
        (names.REQUESTS_IN_FLIGHT + '{{namespace="ml",deployment="{d}"}} or vector(1)', "returned 2 series; aggregate it"),
        # Confined to its namespace, a query that does not parse is refused before it is sent
        # (tests/unit/test_access.py); across namespaces, Prometheus is the one to say so.
        (f"sum(rate({names.REQUESTS_IN_FLIGHT}[1m])", "parse error"),
    ],
)
def test_a_broken_override_fails_the_refresh_and_names_the_query(prometheus, fleet, start_scaler, deployment, override,
                                                                 says):
    scaler = start_scaler(allow_cross_namespace="parse error" in says)
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=20))
    wait_until_scraped(prometheus, deployment)
    so = ref(deployment, prometheus.url, queueQuery=override.format(d=deployment))
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.GetMetrics(metrics_request(so))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queue query: " in raised.value.details() and says in raised.value.details()
    assert "ready query" not in raised.value.details()


def test_metric_names_with_keda_trigger_prefix_are_accepted_and_unknown_ones_are_not_found(
    prometheus, fleet, scaler, deployment
):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=3))
    so = ref(deployment, prometheus.url, metricName="sd-composite")
    assert scaler.stub.GetMetrics(metrics_request(so, "s0-sd-composite")).metricValues[0].metricName == "s0-sd-composite"
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.GetMetrics(metrics_request(so, "queue"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "sd-composite" in raised.value.details()


def test_no_series_at_all_is_zero_queue_not_a_failure(prometheus, scaler, deployment):
    so = ref(deployment, prometheus.url)  # no pod of this deployment exists
    [value] = scaler.stub.GetMetrics(metrics_request(so)).metricValues
    assert (value.metricValueFloat, value.metricValue) == (0.0, 0)
    assert scaler.stub.IsActive(so).result is False


def test_a_gpu_without_series_abstains_and_a_quiet_window_has_no_latency(prometheus, fleet, scaler, deployment):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=20, gpu_util_percent=None, requests_per_s=0))
    so = ref(deployment, prometheus.url, targetP95Seconds="2")

    def only_queue_proposes():
        labels = scaler_labels(deployment)
        assert sample(scaler, names.SCALER_PROPOSAL, signal=names.QUEUE, **labels) == 3
        found = scrape(scaler)
        proposing = {dict(l)["signal"] for (n, l) in found
                     if n == names.SCALER_PROPOSAL and labels.items() <= dict(l).items()}
        assert proposing == {names.QUEUE}

    scaler.stub.GetMetricSpec(so)
    eventually(only_queue_proposes)
    assert scaler.stub.GetMetrics(metrics_request(so)).metricValues[0].metricValueFloat == 3
    # abstaining on a serving fleet is named, not silent (issue 12, section 4)
    assert sample(scaler, names.SCALER_SIGNAL_SILENT, signal=names.GPU, **scaler_labels(deployment)) == 1


def test_a_nan_queue_keeps_the_last_good_value_until_it_is_stale(prometheus, fleet, scaler, deployment):
    pod = f"{deployment}-0"
    fleet.set_pod("ml", deployment, pod, PodLoad(queue=16))
    so = ref(deployment, prometheus.url, staleAfterSeconds="4")
    eventually(lambda: _assert_value(scaler, so, 2.0))

    fleet.set_pod("ml", deployment, pod, PodLoad(queue=math.nan))
    labels = scaler_labels(deployment)
    failures = names.SCALER_QUERY_FAILURES + "_total"
    eventually(lambda: _assert_positive(sample(scaler, failures, query=names.QUEUE, **labels)))
    _assert_value(scaler, so, 2.0)  # the NaN never became a number

    error = eventually_fails(lambda: scaler.stub.GetMetrics(metrics_request(so)), timeout_s=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "staleAfterSeconds=4" in error.details() and "queue query" in error.details()

    fleet.set_pod("ml", deployment, pod, PodLoad(queue=40))
    eventually(lambda: _assert_value(scaler, so, 5.0))


def test_stream_is_active_sends_at_once_then_only_on_change(prometheus, fleet, scaler, deployment):
    pod = f"{deployment}-0"
    fleet.set_pod("ml", deployment, pod, PodLoad(queue=0))
    so = ref(deployment, prometheus.url)
    received: queue.Queue = queue.Queue()
    stream = scaler.stub.StreamIsActive(so)

    def consume():
        try:
            for message in stream:
                received.put((time.monotonic(), message.result))
        except grpc.RpcError:
            pass

    threading.Thread(target=consume, daemon=True).start()
    assert received.get(timeout=10)[1] is False
    fleet.set_pod("ml", deployment, pod, PodLoad(queue=5))
    assert received.get(timeout=10)[1] is True
    time.sleep(3)  # several refreshes with no change: nothing more is sent
    assert received.empty()
    fleet.set_pod("ml", deployment, pod, PodLoad(queue=0))
    assert received.get(timeout=10)[1] is False
    stream.cancel()


def test_stream_metric_spec_sends_the_spec_at_once_and_stays_open(prometheus, scaler, deployment):
    stream = scaler.stub.StreamMetricSpec(ref(deployment, prometheus.url, metricName="images"))
    first = next(stream)
    assert [(s.metricName, s.targetSizeFloat) for s in first.metricSpecs] == [("images", 1.0)]
    # still open: a second read blocks until we cancel it
    box: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: box.put(_next_or_error(stream)), daemon=True).start()
    time.sleep(1.0)
    assert box.empty()
    stream.cancel()
    assert box.get(timeout=5) == grpc.StatusCode.CANCELLED


def test_idle_scaled_objects_are_forgotten(prometheus, start_scaler, deployment):
    scaler = start_scaler(idle_forget_s=1.0)
    scaler.stub.GetMetricSpec(ref(deployment, prometheus.url))
    assert sample(scaler, names.SCALER_SCALEDOBJECTS) == 1
    eventually(lambda: _assert_equal(sample(scaler, names.SCALER_SCALEDOBJECTS), 0), timeout_s=10)


def test_edited_metadata_is_a_new_target_and_the_newest_one_is_exported(prometheus, fleet, scaler, deployment):
    fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=16))
    before = ref(deployment, prometheus.url, targetQueuePerReplica="8")
    after = ref(deployment, prometheus.url, targetQueuePerReplica="4")
    eventually(lambda: _assert_value(scaler, before, 2.0))
    eventually(lambda: _assert_value(scaler, after, 4.0))
    assert sample(scaler, names.SCALER_PROPOSAL, signal=names.QUEUE, **scaler_labels(deployment)) == 4


def _next_or_error(stream):
    try:
        return next(stream)
    except grpc.RpcError as e:
        return e.code()


def _assert_value(scaler, so, expected: float) -> None:
    [value] = scaler.stub.GetMetrics(metrics_request(so)).metricValues
    assert value.metricValueFloat == expected, value


def _assert_positive(x: float) -> None:
    assert x > 0


def _assert_equal(a, b) -> None:
    assert a == b


