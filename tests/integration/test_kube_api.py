"""The scaler over gRPC with a real Prometheus and a fake Kubernetes API server at the HTTP
boundary: the API's replica count decides whether an empty answer is 0."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from adapter import kube
from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK
from adapter.server import ServerConfig
from contract import names
from lab.synthetic import PodLoad
from tests.unit.test_kube import FakeApiServer, down_configuration

from .conftest import RunningScaler, eventually, eventually_fails, ref, require_prometheus, scaler_labels
from .test_faults import assert_value, value_of
from .test_scaler_with_prometheus import sample

pytestmark = pytest.mark.integration


@pytest.fixture
def start_kube_scaler():
    started: list[RunningScaler] = []

    def start(configuration, **overrides) -> RunningScaler:
        """A scaler whose Kubernetes API is the fake at `configuration`."""
        config = ServerConfig(**{"listen_address": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                                 "kubernetes_api_ttl_s": 0.2, "kubernetes_api_timeout_s": 1.0,
                                 "denied_networks": DENIED_NETWORKS_BUT_LOOPBACK, **overrides})
        scaler = RunningScaler(config, kubernetes_configuration=configuration)
        started.append(scaler)
        return scaler

    yield start
    for scaler in started:
        scaler.close()


def fallback(scaler, reason: str) -> float:
    return sample(scaler, names.SCALER_KUBERNETES_API_FALLBACK, reason=reason)


def test_the_api_saying_4_replicas_makes_an_empty_answer_missing_data_even_on_the_first_reading(
    prometheus, start_kube_scaler, deployment
):
    require_prometheus()
    with FakeApiServer(replicas=4, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration())
        so = ref(deployment, prometheus.url, signals="queue", staleAfterSeconds="3")  # no pod has these labels
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "while the Kubernetes API reports 4 ready replicas: missing data, not zero" in error.details()
        assert eventually_fails(lambda: scaler.stub.IsActive(so), timeout_s=1).code() == grpc.StatusCode.UNAVAILABLE
        for _ in range(5):  # it stays so: never a 0 to serve
            assert eventually_fails(lambda: value_of(scaler, so), timeout_s=1).code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.3)
        assert sample(scaler, names.SCALER_STALE, **scaler_labels(deployment)) == 1
        assert all(fallback(scaler, reason) == 0 for reason in kube.FALLBACK_REASONS)
        assert f"/apis/apps/v1/namespaces/ml/deployments/{deployment}" in api.paths


def test_replicas_the_api_reports_created_but_not_ready_leave_an_empty_answer_0(
    prometheus, start_kube_scaler, deployment
):
    """Replicas still loading their model have no series yet; that is not an outage."""
    require_prometheus()
    with FakeApiServer(replicas=4, ready=0, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration())
        so = ref(deployment, prometheus.url, signals="queue", staleAfterSeconds="3")  # no pod has these labels
        eventually(lambda: assert_value(scaler, so, 0.0), timeout_s=15)
        api.ready = 1  # one became ready, and its series are still missing
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=15)
        assert "while the Kubernetes API reports 1 ready replica: missing data" in error.details()


def test_the_last_good_value_is_served_then_unavailable_while_the_api_says_4(
    fleet, prometheus, start_kube_scaler, deployment
):
    require_prometheus()
    with FakeApiServer(replicas=4, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration())
        fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=40, ready=False))  # ready 0 in Prometheus
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="4")
        eventually(lambda: assert_value(scaler, so, 5.0), timeout_s=30)
        # The history alone would believe this empty answer (the last reading had no ready replica).
        fleet.remove_pod("ml", deployment, f"{deployment}-0")
        emptied = time.monotonic()
        while time.monotonic() - emptied < 2:
            assert value_of(scaler, so) == 5.0
            time.sleep(0.2)
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=15)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "the Kubernetes API reports 4 ready replicas" in error.details()


def test_the_api_saying_0_makes_an_empty_answer_0_and_inactive(fleet, prometheus, start_kube_scaler, deployment):
    require_prometheus()
    with FakeApiServer(replicas=4, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration())
        for i in range(4):
            fleet.set_pod("ml", deployment, f"{deployment}-{i}", PodLoad(queue=10))
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="30")
        eventually(lambda: assert_value(scaler, so, 5.0), timeout_s=30)
        assert scaler.stub.IsActive(so).result is True
        # KEDA scaled the fleet to zero: the API says 0, and its series go. With 4 ready replicas
        # in the last reading, the history alone would call this missing data.
        api.replicas = 0
        for i in range(4):
            fleet.remove_pod("ml", deployment, f"{deployment}-{i}")
        eventually(lambda: assert_value(scaler, so, 0.0), timeout_s=20)
        assert scaler.stub.IsActive(so).result is False
        assert sample(scaler, names.SCALER_STALE, **scaler_labels(deployment)) == 0


@pytest.mark.parametrize("broken", ["forbidden", "down"])
def test_without_the_api_the_history_rule_decides_said_once_in_the_log_and_the_metric(
    broken, fleet, prometheus, start_kube_scaler, deployment, caplog
):
    require_prometheus()
    with FakeApiServer(replicas=4, scale_target_ref={"name": deployment}) as api, \
            caplog.at_level(logging.WARNING, logger=kube.__name__):
        api.status = 403
        scaler = start_kube_scaler(api.configuration() if broken == "forbidden" else down_configuration())
        reason = kube.FORBIDDEN if broken == "forbidden" else kube.UNREACHABLE
        # First reading, empty answer, the API cannot say: the history believes it (scale to zero works).
        empty = ref(deployment, prometheus.url, name=deployment + "-empty", signals="queue")
        eventually(lambda: assert_value(scaler, empty, 0.0), timeout_s=15)
        # A serving fleet whose series vanish is still missing data, by the history rule.
        for i in range(4):
            fleet.set_pod("ml", deployment, f"{deployment}-{i}", PodLoad(queue=10))
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="3")
        eventually(lambda: assert_value(scaler, so, 5.0), timeout_s=30)
        for i in range(4):
            fleet.remove_pod("ml", deployment, f"{deployment}-{i}")
        error = eventually_fails(lambda: value_of(scaler, so), timeout_s=15)
        assert "while 4 replicas were ready with 40 requests in flight: missing data, not zero" in error.details()
        assert fallback(scaler, reason) == 2  # both ScaledObjects
        assert sum(fallback(scaler, r) for r in kube.FALLBACK_REASONS) == 2
        said = [r.getMessage() for r in caplog.records if r.name == kube.__name__ and "history rule" in r.getMessage()]
        # once per ScaledObject, though each is asked every 0.2 s
        assert sorted(m.split(":")[0] for m in said) == [f"ScaledObject ml/{deployment}", f"ScaledObject ml/{deployment}-empty"]
        if broken == "forbidden":
            assert all("HTTP 403" in m for m in said)
            assert len(api.paths) >= 5


def test_rpcs_never_wait_on_a_hung_api(fleet, prometheus, start_kube_scaler, deployment):
    require_prometheus()
    with FakeApiServer(replicas=1, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration(), kubernetes_api_timeout_s=1.0)
        fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=24))
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="60")
        eventually(lambda: assert_value(scaler, so, 3.0), timeout_s=30)
        api.delay_s = 5.0  # every API request now hangs past the timeout
        asked = len(api.paths)
        slowest = 0.0
        until = time.monotonic() + 4
        while time.monotonic() < until:
            started = time.perf_counter()
            assert value_of(scaler, so) == 3.0
            assert scaler.stub.IsActive(so).result is True
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
        assert len(api.paths) > asked  # the refresher kept asking the hung API meanwhile
        assert slowest < 0.25
        assert fallback(scaler, kube.UNREACHABLE) == 1
    fleet.remove_pod("ml", deployment, f"{deployment}-0")
