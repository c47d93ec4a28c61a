"""Kubernetes Events on ScaledObjects, without an API server: what is said and when
(`adapter.events`, timelines with time as an argument), how often (client-go's spam filter and
aggregation), and the recorder's queue and writer thread against an in-memory sink."""

from __future__ import annotations

import logging
import threading

import pytest

from adapter import events, recorder
from adapter.config import parse_metadata
from adapter.events import EventCorrelator, EventDraft, next_event, observe
from adapter.reading import QueryOutcome, to_reading
from adapter.recorder import EventRecorder, EventWriteError
from adapter.targets import Target
from contract import names

META = {"prometheusAddress": "http://p:9090", "signals": "queue,gpu", "targetQueuePerReplica": "8",
        "targetGpuUtilization": "75", "scaleDownWindowSeconds": "120", "queueSmoothingSeconds": "0",
        "staleAfterSeconds": "30", "keepWarmMaxSeconds": "0"}


def reading(queue: float, ready: float, gpu: float | None = None, error: str | None = None):
    return to_reading((QueryOutcome(names.QUEUE, 0.01, queue, error=error),
                       QueryOutcome(names.READY_REPLICAS, 0.01, ready),
                       QueryOutcome(names.GPU, 0.01, gpu)), ())


class Timeline:
    """One target refreshed at the times given, with the Events it calls for."""

    def __init__(self, **metadata: str):
        self.spec = parse_metadata({**META, **metadata})
        self.target = Target(("ml", "sd-worker", ()), "ml", "sd-worker", self.spec, now=0)
        self.announced = None
        self.drafts: list[EventDraft] = []

    def at(self, now: float, queue: float, ready: float, gpu: float | None = None, error: str | None = None):
        self.target.apply(reading(queue, ready, gpu, error), now)
        draft, self.announced = next_event("ml", "sd-worker", self.spec, self.announced, observe(self.target, now),
                                           now)
        if draft is not None:
            self.drafts.append(draft)
        return draft

    def settled(self, now: float, **reading):
        """A new size, told once the next refresh (5 s later) finds it again."""
        assert self.at(now, **reading) is None
        return self.at(now + 5, **reading)


def test_a_change_of_size_says_from_to_the_limiting_signal_against_its_target():
    timeline = Timeline()
    assert timeline.at(0, queue=16, ready=2) is None  # the first value is the baseline: no "from"
    draft = timeline.settled(5, queue=40, ready=2)
    assert (draft.namespace, draft.name, draft.type) == ("ml", "sd-worker", "Normal")
    assert draft.reason == "ScaleUpRecommended"
    assert draft.message == ("New size: 5 (was 2); reason: queue proposes 5: 40 requests in flight, target 8 per "
                             "replica; a burst: the queue skipped the scale-up window")


def test_the_gpu_signal_is_named_with_its_utilization_against_its_target():
    timeline = Timeline()
    timeline.at(0, queue=0, ready=4, gpu=75)
    draft = timeline.settled(5, queue=0, ready=4, gpu=97.5)
    assert draft.message == ("New size: 6 (was 4); reason: gpu proposes 6: 97.5% GPU utilization over 4 ready "
                             "replicas, target 75%")


def test_a_scale_down_window_that_starts_holding_says_so_once_then_the_drop_names_no_hold():
    timeline = Timeline()
    timeline.at(0, queue=40, ready=5)
    held = timeline.at(10, queue=10, ready=5)
    assert (held.reason, held.message) == ("ScaleDownHeld", "Size held at 5; reason: queue proposes 2: 10 requests "
                                           "in flight, target 8 per replica; held above the composite 2 by the "
                                           "scale-down window (120s)")
    # the hold ends and starts again at the same size (the composite back up, then down): nothing new to say
    assert timeline.at(20, queue=40, ready=5) is None
    assert timeline.at(30, queue=10, ready=5) is None
    dropped = timeline.settled(151, queue=10, ready=5)
    assert (dropped.reason, dropped.message) == ("ScaleDownRecommended", "New size: 2 (was 5); reason: queue "
                                                 "proposes 2: 10 requests in flight, target 8 per replica")


def test_a_size_reached_through_the_window_names_the_window_the_composite_and_the_busy_floor():
    timeline = Timeline(scaleDownWindowSeconds="60")
    timeline.at(0, queue=40, ready=5)
    timeline.at(30, queue=24, ready=5)  # the composite 3 is held at 5 (ScaleDownHeld)
    assert timeline.at(40, queue=8, ready=5) is None  # composite 2, still held at 5: the same hold
    draft = timeline.settled(61, queue=8, ready=5)  # t=0 left the window; its highest is now 3 (t=30)
    assert (draft.reason, draft.message) == (
        "ScaleDownRecommended",
        "New size: 3 (was 5); reason: queue proposes 2: 8 requests in flight, target 8 per replica, at least 2 "
        "while requests are in flight (minBusyReplicas); held above the composite 2 by the scale-down window (60s)")


def test_a_bound_is_named_after_the_proposal_it_cut():
    timeline = Timeline(maxReplicas="4")
    timeline.at(0, queue=8, ready=2)
    draft = timeline.settled(5, queue=80, ready=2)
    assert draft.message.startswith("New size: 4 (was 2); reason: queue proposes 10: 80 requests in flight")
    assert draft.message.endswith("; bounded by maxReplicas 4")


def test_no_event_while_the_size_stays_across_many_refreshes():
    timeline = Timeline()
    timeline.at(0, queue=24, ready=3)
    for step in range(1, 500):
        # the measurements move, the size they ask for does not
        assert timeline.at(step * 5, queue=17 + step % 7, ready=3, gpu=40 + step % 30) is None
    assert timeline.drafts == []


def test_stale_data_then_unavailable_then_recovery_each_say_so_once():
    timeline = Timeline()
    timeline.at(0, queue=16, ready=2)
    stale = timeline.at(5, queue=16, ready=2, error="connection refused")
    assert (stale.type, stale.reason) == ("Warning", "RefreshFailed")
    assert stale.message == ("Size held at 2 on stale data; reason: the last refresh failed: queue query: connection "
                             "refused; UNAVAILABLE once the last good reading is older than staleAfterSeconds (30s)")
    assert timeline.at(20, queue=16, ready=2, error="connection refused") is None
    gone = timeline.at(31, queue=16, ready=2, error="connection refused")
    assert (gone.type, gone.reason) == ("Warning", "ValueUnavailable")
    assert "last good value for ml/sd-worker is 31s old (staleAfterSeconds=30)" in gone.message
    assert "KEDA's fallback applies" in gone.message
    assert timeline.at(40, queue=16, ready=2, error="connection refused") is None
    back = timeline.at(45, queue=16, ready=2)
    assert (back.type, back.reason) == ("Normal", "RefreshRecovered")
    assert back.message == ("Refreshes succeed again; size 2; reason: queue proposes 2: 16 requests in flight, "
                            "target 8 per replica")


def test_a_recovery_at_another_size_is_a_change_of_size_from_the_last_one_served():
    timeline = Timeline()
    timeline.at(0, queue=16, ready=2)
    timeline.at(5, queue=16, ready=2, error="timeout")
    timeline.at(40, queue=16, ready=2, error="timeout")  # unavailable
    draft = timeline.at(45, queue=40, ready=2)
    assert draft.reason == "ScaleUpRecommended"
    assert draft.message.startswith("New size: 5 (was 2); refreshes succeed again; reason: queue proposes 5")


def test_a_target_that_never_serves_is_announced_unavailable_after_stale_after_seconds():
    timeline = Timeline()
    assert timeline.at(0, queue=0, ready=0, error="no such host") is None
    assert timeline.at(25, queue=0, ready=0, error="no such host") is None
    draft = timeline.at(30, queue=0, ready=0, error="no such host")
    assert draft.reason == "ValueUnavailable" and "no value yet for ml/sd-worker" in draft.message
    assert timeline.at(60, queue=0, ready=0, error="no such host") is None
    assert timeline.at(65, queue=16, ready=2).reason == "RefreshRecovered"


def test_repeats_of_a_change_share_a_key_whatever_the_numbers_measured():
    timeline = Timeline(scaleDownWindowSeconds="0")
    timeline.at(0, queue=16, ready=2)
    first = timeline.settled(5, queue=33, ready=2)
    timeline.settled(70, queue=16, ready=5)
    second = timeline.settled(135, queue=39, ready=2)
    assert first.message != second.message and first.key == second.key


def test_a_size_moving_in_steps_is_told_once_it_settles_from_the_size_last_told():
    """A window letting go of one recommendation per refresh moves the size a step at a time."""
    timeline = Timeline(scaleDownWindowSeconds="0")
    timeline.at(0, queue=16, ready=2)
    assert timeline.settled(5, queue=80, ready=2).message.startswith("New size: 10 (was 2)")
    for now, queue in ((15, 72), (20, 64), (25, 56), (30, 48)):
        assert timeline.at(now, queue=queue, ready=10) is None  # 9, 8, 7, 6: still moving
    told = timeline.at(35, queue=48, ready=10)
    assert (told.reason, told.message) == ("ScaleDownRecommended", "New size: 6 (was 10); reason: queue proposes 6: "
                                           "48 requests in flight, target 8 per replica")
    assert timeline.at(40, queue=48, ready=6) is None


def test_a_size_that_keeps_moving_is_told_where_it_is_after_a_minute():
    timeline = Timeline(scaleDownWindowSeconds="0")
    timeline.at(0, queue=320, ready=40)  # 40
    for step in range(1, 13):  # 39, 38, ... 28: a step every refresh, for 55 s
        assert timeline.at(step * 5, queue=320 - 8 * step, ready=40) is None
    told = timeline.at(65, queue=216, ready=40)  # 27, 60 s after the first step
    assert told.message.startswith("New size: 27 (was 40)")


def test_a_move_that_comes_back_before_it_settles_tells_nothing():
    timeline = Timeline(scaleDownWindowSeconds="0")
    timeline.at(0, queue=16, ready=2)
    timeline.settled(5, queue=40, ready=2)  # told: 5
    assert timeline.at(15, queue=64, ready=5) is None  # 8, for one refresh
    assert timeline.at(20, queue=40, ready=5) is None  # 5 again
    assert timeline.at(25, queue=40, ready=5) is None
    assert [d.message[:19] for d in timeline.drafts] == ["New size: 5 (was 2)"]


def test_a_fractional_value_says_it_was_rounded_up():
    timeline = Timeline(combine="weighted", scaleDownWindowSeconds="0")
    timeline.at(0, queue=16, ready=2, gpu=75)
    draft = timeline.settled(5, queue=40, ready=2, gpu=75)
    assert draft.message.startswith("New size: 4 (was 2; the value 3.5 rounded up); reason: queue proposes 5")


def test_a_weighted_composite_names_its_proposals():
    timeline = Timeline(combine="weighted", scaleDownWindowSeconds="0")
    timeline.at(0, queue=16, ready=2, gpu=75)
    draft = timeline.settled(5, queue=48, ready=2, gpu=75)
    assert "; composite 4 (weighted mean of queue 6, gpu 2)" in draft.message
    assert draft.message.startswith("New size: 4 (was 2); reason: queue proposes 6")


def test_a_long_message_is_cut_to_1024_characters():
    timeline = Timeline()
    timeline.at(0, queue=16, ready=2)
    draft = timeline.at(5, queue=16, ready=2, error="x" * 5000)
    assert len(draft.message) == events.MAX_MESSAGE_CHARS and draft.message.endswith("...")


# --- client-go's spam filter and aggregation -----------------------------------------------------


def draft(name: str = "sd-worker", message: str = "New size: 5 (was 2)", key: tuple = ("Normal", "ScaleUp", 2, 5)):
    return EventDraft("ml", name, "Normal", "ScaleUpRecommended", message, key)


def test_client_gos_defaults_a_burst_of_25_then_one_event_per_5_minutes_per_scaledobject():
    correlator = EventCorrelator()
    accepted = [correlator.correlate(draft(key=(i,)), now=0) is not None for i in range(30)]
    assert accepted == [True] * 25 + [False] * 5
    assert correlator.correlate(draft(name="another"), now=0) is not None  # its own bucket
    assert correlator.correlate(draft(key=(31,)), now=299) is None
    assert correlator.correlate(draft(key=(32,)), now=300) is not None
    assert correlator.correlate(draft(key=(33,)), now=301) is None


def test_a_repeat_within_the_window_patches_the_series_and_after_it_starts_a_new_one():
    correlator = EventCorrelator(aggregate_window_s=600)
    first = correlator.correlate(draft(), now=0)
    assert first.series is None  # create
    correlator.written(first.draft, events.Series("sd-worker.1", 1, "2025-01-01T00:00:00Z", 0))
    repeat = correlator.correlate(draft(message="New size: 5 (was 2); other numbers"), now=600)
    assert repeat.series == events.Series("sd-worker.1", 1, "2025-01-01T00:00:00Z", 0)
    assert correlator.correlate(draft(key=("other",)), now=600).series is None  # another key: another Event
    correlator.written(repeat.draft, events.Series("sd-worker.1", 2, "2025-01-01T00:00:00Z", 600))
    assert correlator.correlate(draft(), now=1201).series is None  # 601 s since the last one


def test_the_correlator_forgets_the_least_recently_used_beyond_its_size():
    correlator = EventCorrelator(max_cached=2)
    for name in ("a", "b", "c"):
        write = correlator.correlate(draft(name=name), now=0)
        correlator.written(write.draft, events.Series(name + ".1", 1, "t", 0))
    assert correlator.correlate(draft(name="a"), now=1).series is None
    assert correlator.correlate(draft(name="c"), now=1).series is not None


@pytest.mark.parametrize("bad", [{"burst": 0}, {"refill_per_s": -1}, {"aggregate_window_s": -1}, {"max_cached": 0}])
def test_a_correlator_refuses_bounds_that_mean_nothing(bad):
    with pytest.raises(ValueError, match="burst must be >= 1"):
        EventCorrelator(**bad)


# --- the recorder: queue, writer thread, results, the log ----------------------------------------


class MemorySink:
    """An EventSink in memory: Events by name, with a switchable failure and a gate that holds writes."""

    def __init__(self):
        self.events: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.failure: EventWriteError | None = None
        self.gate = threading.Event()
        self.gate.set()

    def involved_object(self, namespace, name):
        self._call("get", name)
        return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "namespace": namespace, "name": name,
                "uid": "uid-" + name}

    def create(self, namespace, body):
        self._call("create", body["metadata"]["name"])
        self.events[body["metadata"]["name"]] = body

    def patch(self, namespace, event_name, body):
        self._call("patch", event_name)
        if event_name not in self.events:
            raise EventWriteError(recorder.NOT_FOUND, "gone")
        self.events[event_name] = {**self.events[event_name], **body}

    def _call(self, verb, name):
        self.gate.wait(10)
        self.calls.append((verb, name))
        if self.failure is not None:
            raise self.failure


class Results:
    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}

    def __call__(self, reason, result):
        self.counts[(reason, result)] = self.counts.get((reason, result), 0) + 1


@pytest.fixture
def recording():
    made = []

    def make(**kwargs):
        sink, results = MemorySink(), Results()
        wall = iter(range(1_700_000_000, 1_800_000_000, 60))
        rec = EventRecorder(sink, component="diffusion-scaler", instance="scaler-0", on_result=results,
                            wall_clock=lambda: float(next(wall)), **kwargs)
        made.append((rec, sink))
        return rec, sink, results

    yield make
    for rec, sink in made:
        sink.gate.set()
        rec.close()


def test_a_repeat_patches_the_count_of_the_event_it_repeats(recording):
    rec, sink, results = recording()
    rec.enqueue(draft(), now=0)
    rec.enqueue(draft(message="New size: 5 (was 2); newer numbers"), now=60)
    assert rec.flush()
    [(name, event)] = sink.events.items()
    assert name.startswith("sd-worker.")
    assert event["count"] == 2 and event["message"] == "New size: 5 (was 2); newer numbers"
    assert (event["firstTimestamp"], event["lastTimestamp"]) == ("2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z")
    assert event["involvedObject"]["uid"] == "uid-sd-worker" and event["source"] == {"component": "diffusion-scaler",
                                                                                       "host": "scaler-0"}
    assert [verb for verb, _ in sink.calls] == ["get", "create", "patch"]
    assert results.counts == {("ScaleUpRecommended", "created"): 1, ("ScaleUpRecommended", "patched"): 1}


def test_an_event_expired_from_the_api_is_created_again(recording):
    rec, sink, results = recording()
    rec.enqueue(draft(), now=0)
    rec.flush()
    sink.events.clear()  # the API server's event TTL
    rec.enqueue(draft(), now=10)
    rec.flush()
    [event] = sink.events.values()
    assert event["count"] == 1 and results.counts[("ScaleUpRecommended", "created")] == 2


def test_a_burst_beyond_the_rate_limit_is_dropped_and_counted(recording):
    rec, sink, results = recording()
    for i in range(40):
        rec.enqueue(draft(key=(i,), message=f"New size: {i}"), now=i)
    assert rec.flush()
    assert len(sink.events) == 25
    assert results.counts == {("ScaleUpRecommended", "created"): 25, ("ScaleUpRecommended", "rate_limited"): 15}


def test_a_full_queue_drops_and_counts_without_waiting(recording):
    rec, sink, results = recording(queue_size=3)
    sink.gate.clear()  # the API hangs: the writer holds the first draft
    for i in range(10):
        rec.enqueue(draft(key=(i,)), now=i)
    assert results.counts[("ScaleUpRecommended", "queue_full")] >= 6  # 1 in hand, 3 queued at most
    sink.gate.set()
    assert rec.flush()
    fates = results.counts[("ScaleUpRecommended", "created")] + results.counts[("ScaleUpRecommended", "queue_full")]
    assert fates == 10


def test_a_forbidden_api_is_logged_once_then_again_only_after_a_recovery(recording, caplog):
    rec, sink, results = recording()
    caplog.set_level(logging.INFO, logger=recorder.__name__)
    sink.failure = EventWriteError(recorder.FORBIDDEN, "creating an Event in ml: HTTP 403 Forbidden")
    for i in range(5):
        rec.enqueue(draft(key=(i,)), now=i)
    rec.flush()
    sink.failure = None
    rec.enqueue(draft(key=("ok",)), now=10)
    rec.flush()
    sink.failure = EventWriteError(recorder.UNREACHABLE, "creating an Event in ml: connection refused")
    rec.enqueue(draft(key=("again",)), now=11)
    rec.enqueue(draft(key=("and again",)), now=12)
    rec.flush()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == recorder.__name__]
    assert [level for level, _ in said] == ["WARNING", "INFO", "WARNING"]
    assert "forbidden: creating an Event in ml: HTTP 403 Forbidden" in said[0][1]
    assert "scaling carries on" in said[0][1]
    assert "unreachable" in said[2][1]
    assert results.counts[("ScaleUpRecommended", "failed")] == 7


def test_observe_never_raises_into_the_refresh_that_calls_it(recording, caplog):
    rec, _, _ = recording()

    class Broken:
        namespace, name, spec, snapshot = "ml", "sd", None, None

    caplog.set_level(logging.ERROR, logger=recorder.__name__)
    for now in range(3):
        rec.observe(Broken(), now)  # an AttributeError inside
    assert len([r for r in caplog.records if r.name == recorder.__name__]) == 1


def test_observe_turns_a_targets_refreshes_into_events_on_the_writer(recording):
    rec, sink, results = recording()
    timeline = Timeline()
    for now, queue in ((0, 16), (5, 40), (10, 40), (15, 40)):
        timeline.target.apply(reading(queue, 2), now)
        rec.observe(timeline.target, now)
    rec.flush()
    [event] = sink.events.values()
    assert event["reason"] == "ScaleUpRecommended" and event["message"].startswith("New size: 5 (was 2)")


def test_close_stops_the_writer_even_with_a_full_queue(recording):
    rec, sink, _ = recording(queue_size=2)
    for i in range(5):
        rec.enqueue(draft(key=(i,)), now=i)
    assert rec.close(timeout_s=2)


def test_the_events_flag_reads_its_environment_variable_and_refuses_other_values(monkeypatch):
    from adapter.__main__ import build_parser, config_from_args
    from adapter.server import ServerConfig

    assert config_from_args(build_parser().parse_args([])).events == "auto"
    monkeypatch.setenv("SCALER_EVENTS", "off")
    assert config_from_args(build_parser().parse_args([])).events == "off"
    assert config_from_args(build_parser().parse_args(["--events", "auto"])).events == "auto"
    with pytest.raises(ValueError, match="--events must be one of auto, off, not 'on'"):
        ServerConfig(events="on")
