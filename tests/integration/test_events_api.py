"""Kubernetes Events on ScaledObjects through the real `kubernetes` client, against the fake API
server at the HTTP boundary (tests/unit/test_kube.py): what an Event holds, a repeat patching
its count, the rate limit, and the scaler unharmed by a 403 or an unreachable API. README's
`kubectl describe scaledobject` example is rendered here from what the code writes."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from adapter import recorder
from adapter.config import parse_metadata
from adapter.events import EventCorrelator, EventDraft
from adapter.kubeevents import KubernetesEventSink
from adapter.reading import QueryOutcome, to_reading
from adapter.recorder import EventRecorder
from adapter.server import EVENT_COMPONENT
from adapter.targets import Target
from contract import names
from lab.synthetic import PodLoad
from tests.unit.test_kube import FakeApiServer, down_configuration
from tests.unit.test_readme import readme_scaled_object

from .conftest import eventually, ref, require_prometheus
from .test_faults import assert_value, value_of
from .test_kube_api import start_kube_scaler  # noqa: F401 - a fixture
from .test_scaler_with_prometheus import sample

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the scenario's wall clock starts here


class Clock:
    """The wall clock the recorder stamps Events with, moved by the scenario."""

    def __init__(self, at: float = START):
        self.at = at

    def __call__(self) -> float:
        return self.at


def recorder_on(api: FakeApiServer, clock: Clock, **kwargs) -> tuple[EventRecorder, KubernetesEventSink]:
    sink = KubernetesEventSink(api.configuration(), timeout_s=1.0)
    return EventRecorder(sink, component=EVENT_COMPONENT, instance="diffusion-scaler-7c9f5-x2x8q",
                         wall_clock=clock, **kwargs), sink


def reading(queue: float, ready: float, gpu: float | None = None, p95: float | None = None, error: str | None = None):
    return to_reading((QueryOutcome(names.QUEUE, 0.01, queue, error=error),
                       QueryOutcome(names.READY_REPLICAS, 0.01, ready),
                       QueryOutcome(names.GPU, 0.01, gpu), QueryOutcome(names.LATENCY, 0.01, p95)), ())


def test_an_event_names_the_scaledobject_by_uid_and_says_from_to_why():
    clock = Clock()
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "signals": "queue", "queueSmoothingSeconds": "0"})
    target = Target(("ml", "sd-worker", ()), "ml", "sd-worker", spec, now=0)
    with FakeApiServer() as api:
        rec, sink = recorder_on(api, clock)
        for now, queue in ((0, 16), (5, 16), (10, 40), (15, 40)):
            target.apply(reading(queue, 2), now)
            rec.observe(target, now)
        assert rec.flush()
        rec.close()
        sink.close()
    [event] = api.events.values()
    assert event["involvedObject"] == {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "namespace": "ml",
                                       "name": "sd-worker", "uid": FakeApiServer.uid("sd-worker")}
    assert event["metadata"]["namespace"] == "ml" and event["metadata"]["name"].startswith("sd-worker.")
    assert (event["type"], event["reason"]) == ("Normal", "ScaleUpRecommended")
    assert event["message"] == ("New size: 5 (was 2); reason: queue proposes 5: 40 requests in flight, target 8 per "
                                "replica; a burst: the queue skipped the scale-up window")
    assert event["source"] == {"component": "diffusion-scaler", "host": "diffusion-scaler-7c9f5-x2x8q"}
    assert (event["count"], event["firstTimestamp"], event["lastTimestamp"]) == (1, "2026-01-01T00:00:00Z",
                                                                                   "2026-01-01T00:00:00Z")
    assert [(m, p) for m, p, _ in api.requests] == [
        ("GET", "/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/sd-worker"),
        ("POST", "/api/v1/namespaces/ml/events")]


def draft(message: str, key: tuple = ("Normal", "ScaleUpRecommended", 2, 5)) -> EventDraft:
    return EventDraft("ml", "sd-worker", "Normal", "ScaleUpRecommended", message, key)


def test_a_repeat_patches_count_and_last_timestamp_with_a_strategic_merge_patch():
    clock = Clock()
    with FakeApiServer() as api:
        rec, sink = recorder_on(api, clock)
        rec.enqueue(draft("New size: 5 (was 2); 40 requests"), now=0)
        rec.flush()
        clock.at += 90
        rec.enqueue(draft("New size: 5 (was 2); 44 requests"), now=90)
        rec.flush()
        rec.close()
        sink.close()
    [event] = api.events.values()
    assert (event["count"], event["firstTimestamp"], event["lastTimestamp"]) == (2, "2026-01-01T00:00:00Z",
                                                                                   "2026-01-01T00:01:30Z")
    assert event["message"] == "New size: 5 (was 2); 44 requests"
    [patch] = [r for r in api.requests if r[0] == "PATCH"]
    assert patch[1] == f"/api/v1/namespaces/ml/events/{event['metadata']['name']}"
    assert patch[2] == "application/strategic-merge-patch+json"
    assert len([r for r in api.requests if r[0] == "GET"]) == 1  # the uid is cached


def test_beyond_the_burst_events_are_dropped_and_counted_not_written():
    counted: list[tuple[str, str]] = []
    with FakeApiServer() as api:
        rec, sink = recorder_on(api, Clock(), on_result=lambda reason, result: counted.append((reason, result)),
                                correlator=EventCorrelator(burst=5))
        for i in range(12):
            rec.enqueue(draft(f"New size: {i}", key=(i,)), now=i)
        rec.flush()
        rec.close()
        sink.close()
    assert len(api.events) == 5
    assert counted.count(("ScaleUpRecommended", "created")) == 5
    assert counted.count(("ScaleUpRecommended", "rate_limited")) == 7


@pytest.mark.parametrize("broken", ["forbidden", "down"])
def test_a_403_or_an_unreachable_api_fails_the_write_and_is_logged_once(broken, caplog):
    counted: list[tuple[str, str]] = []
    with FakeApiServer() as api, caplog.at_level(logging.WARNING, logger=recorder.__name__):
        api.event_status = 403
        configuration = api.configuration() if broken == "forbidden" else down_configuration()
        sink = KubernetesEventSink(configuration, timeout_s=0.5)
        rec = EventRecorder(sink, component=EVENT_COMPONENT, on_result=lambda r, s: counted.append((r, s)))
        for i in range(4):
            rec.enqueue(draft("New size: 5 (was 2)", key=(i,)), now=i)
        assert rec.flush(timeout_s=10)
        rec.close()
        sink.close()
    assert counted == [("ScaleUpRecommended", "failed")] * 4
    [said] = [r.getMessage() for r in caplog.records if r.name == recorder.__name__]
    if broken == "forbidden":
        assert "forbidden: creating an Event in ml: HTTP 403 Forbidden" in said
    else:
        assert "unreachable: reading ScaledObject ml/sd-worker" in said
    assert api.events == {}


# --- the scaler, end to end ----------------------------------------------------------------------


def events_total(scaler, result: str, reason: str = "ScaleUpRecommended") -> float:
    return sample(scaler, names.SCALER_KUBERNETES_EVENTS + "_total", reason=reason, result=result)


def test_the_scaler_records_a_change_of_size_once_and_nothing_while_it_stays(
    fleet, prometheus, start_kube_scaler, deployment
):
    require_prometheus()
    with FakeApiServer(replicas=1, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration())
        fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=24))
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="60")
        eventually(lambda: assert_value(scaler, so, 3.0), timeout_s=30)
        fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=40))
        eventually(lambda: assert_value(scaler, so, 5.0), timeout_s=30)
        eventually(lambda: assert_count(api, 1), timeout_s=5)
        time.sleep(3)  # six refreshes at 0.5 s, the size unchanged
        [event] = api.events.values()
        assert event["count"] == 1 and event["reason"] == "ScaleUpRecommended"
        assert event["message"].startswith("New size: 5 (was 3); reason: queue proposes 5: 40 requests in flight, "
                                           "target 8 per replica")
        assert event["involvedObject"]["name"] == deployment
        assert event["involvedObject"]["uid"] == FakeApiServer.uid(deployment)
        assert events_total(scaler, "created") == 1
    fleet.remove_pod("ml", deployment, f"{deployment}-0")


def test_with_events_off_the_scaler_writes_none(fleet, prometheus, start_kube_scaler, deployment):
    require_prometheus()
    with FakeApiServer(replicas=1, scale_target_ref={"name": deployment}) as api:
        scaler = start_kube_scaler(api.configuration(), events="off")
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="60")
        for queue, value in ((24, 3.0), (40, 5.0)):
            fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=queue))
            eventually(lambda: assert_value(scaler, so, value), timeout_s=30)
        time.sleep(1.5)
        assert api.events == {} and not [r for r in api.requests if r[0] != "GET"]
        assert f"/apis/apps/v1/namespaces/ml/deployments/{deployment}" in api.paths  # the API is still read
    fleet.remove_pod("ml", deployment, f"{deployment}-0")


def assert_count(api: FakeApiServer, n: int) -> None:
    assert len(api.events) == n


@pytest.mark.parametrize("broken", ["forbidden", "down"])
def test_the_scaler_keeps_scaling_right_without_events_and_says_so_once(
    broken, fleet, prometheus, start_kube_scaler, deployment, caplog
):
    require_prometheus()
    with FakeApiServer(replicas=1, scale_target_ref={"name": deployment}) as api, \
            caplog.at_level(logging.WARNING, logger=recorder.__name__):
        api.event_status = 403  # the RBAC of before: get, no create
        scaler = start_kube_scaler(api.configuration() if broken == "forbidden" else down_configuration())
        so = ref(deployment, prometheus.url, signals="queue", targetQueuePerReplica="8", staleAfterSeconds="60")
        # (without the API, a first empty answer may be believed as 0: count from a served 3)
        def failed() -> float:
            return sum(events_total(scaler, "failed", r) for r in ("ScaleUpRecommended", "ScaleDownRecommended"))

        def failed_since(base: float, n: int) -> None:
            assert failed() - base == n

        for changes, (queue, value) in enumerate(((24, 3.0), (40, 5.0), (8, 2.0), (40, 5.0))):
            fleet.set_pod("ml", deployment, f"{deployment}-0", PodLoad(queue=queue))
            eventually(lambda: assert_value(scaler, so, value), timeout_s=30)
            time.sleep(1.5)  # three refreshes: the size settles, and its Event is tried
            started = time.perf_counter()
            assert value_of(scaler, so) == value and scaler.stub.IsActive(so).result is True
            assert time.perf_counter() - started < 0.25  # no RPC waits on the API
            if changes == 0:
                base = failed()
            eventually(lambda: failed_since(base, changes), timeout_s=5)  # each change tried once, and failed
        said = [r.getMessage() for r in caplog.records if r.name == recorder.__name__]
        assert len(said) == 1 and "scaling carries on" in said[0]
        assert ("HTTP 403" if broken == "forbidden" else "unreachable") in said[0]
        assert api.events == {}
    fleet.remove_pod("ml", deployment, f"{deployment}-0")


# --- README's example ----------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's duration.HumanDuration, up to 8 hours: what kubectl shows as an age."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"


def describe_events(events: list[dict], now: float) -> str:
    """The Events section of `kubectl describe` (its DescribeEvents: sorted by lastTimestamp,
    a tabwriter with padding 2, the age as `x<count> over` for a repeat, From the source's component)."""
    def since(stamp: str) -> str:
        return human_duration(now - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp())

    rows = [["  Type", "Reason", "Age", "From", "Message"], ["  ----", "------", "----", "----", "-------"]]
    for e in sorted(events, key=lambda e: e["lastTimestamp"]):
        age = since(e["firstTimestamp"])
        if e["count"] > 1:
            age = f"{since(e['lastTimestamp'])} (x{e['count']} over {age})"
        rows.append(["  " + e["type"], e["reason"], age, e["source"]["component"], e["message"].strip()])
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(4)]
    return "Events:\n" + "\n".join("".join(c.ljust(w) for c, w in zip(row, widths)) + row[4] for row in rows)


def readme_example() -> str:
    """The ScaledObject of README's example, through a scripted quarter of an hour: a spike, the
    scale-down window, a second spike, a Prometheus outage; refreshed every 5 s."""
    [trigger] = readme_scaled_object()["spec"]["triggers"]
    spec = parse_metadata(trigger["metadata"])
    target = Target(("ml", "sd-worker", ()), "ml", "sd-worker", spec, now=0)
    clock = Clock()
    with FakeApiServer() as api:
        rec, sink = recorder_on(api, clock)
        ready = 2.0
        for now in range(0, 900, 5):
            clock.at = START + now
            spike = 60 <= now < 180 or 480 <= now < 540
            queue = 140 if spike else 30
            wanted = target.snapshot.decision.value if target.snapshot else ready
            ready = min(wanted, ready + 0.25) if wanted > ready else wanted  # replicas start in ~20 s
            gpu = min(97.0, 45.0 * queue / 30.0 * 2 / max(ready, 1.0))
            error = "request to http://prometheus-operated.monitoring.svc:9090 failed: connection refused" \
                if 700 <= now < 780 else None
            target.apply(reading(queue, int(ready), gpu=gpu, error=error), now)
            rec.observe(target, now)
            rec.flush()
        rec.close()
        sink.close()
    return describe_events(list(api.events.values()), START + 900)


def test_readme_shows_what_the_scaler_writes_in_kubectl_describe():
    rendered = readme_example()
    readme = (ROOT / "README.md").read_text()
    [block] = re.findall(r"\$ kubectl describe scaledobject sd-worker -n ml\n.*?\n(Events:\n.*?)\n```", readme, re.S)
    assert block == rendered, "README's example differs from what the scaler writes now:\n" + rendered
