"""Absent is not zero: count series that vanish from a serving target are missing data."""

from __future__ import annotations

import math

import pytest

from adapter.config import parse_metadata
from adapter.policy import Signals
from adapter.reading import QueryOutcome, absent_is_not_zero, needed_queries, outcome, to_reading
from adapter.targets import Target, Unavailable
from contract import names


def reading(queue: float | None, ready: float | None):
    return to_reading((QueryOutcome(names.QUEUE, 0.01, queue), QueryOutcome(names.READY_REPLICAS, 0.01, ready)), ())


@pytest.mark.parametrize(
    ("last_good", "queue", "ready", "believed"),
    [
        (None, None, None, True),  # nothing known yet: an empty target is an empty target
        (Signals(queue=0, ready_replicas=0), None, None, True),  # it had drained to zero ready first
        # scaled to zero by KEDA: idle (IsActive false for the cooldown), the last worker exits at
        # once on SIGTERM and its series go while it still read ready 1
        (Signals(queue=0, ready_replicas=1), None, None, True),
        (Signals(queue=40, ready_replicas=4), 0.0, 0.0, True),  # the series exist and read 0
        (Signals(queue=40, ready_replicas=4), None, None, False),  # the issue's case: they vanished
        (Signals(queue=40, ready_replicas=4), 40.0, None, False),  # ready vanished alone
        (Signals(queue=40, ready_replicas=4), None, 4.0, False),  # queue vanished alone
    ],
)
def test_an_empty_count_is_believed_only_where_the_history_allows(last_good, queue, ready, believed):
    checked = absent_is_not_zero(reading(queue, ready), last_good)
    assert (checked.signals is not None) == believed
    if not believed:
        assert "missing data, not zero" in checked.error


def test_the_issues_case_serves_the_last_value_then_unavailable_never_zero():
    """4 pods, 10 in flight each, target 8 -> 5; then every query answers an empty vector."""
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "signals": "queue", "targetQueuePerReplica": "8",
                           "scaleDownWindowSeconds": "5", "staleAfterSeconds": "20"})
    target = Target(("ml", "sd", ()), "ml", "sd", spec, now=0)
    target.apply(reading(40.0, 4.0), now=0)
    assert target.current(1).decision.value == 5
    for t in range(1, 20):
        target.apply(reading(None, None), now=t)
        assert target.current(t).decision.value == 5  # the last good value, not 0
    assert target.refreshes["error"] == 19 and "missing data, not zero" in target.last_error
    with pytest.raises(Unavailable, match="missing data, not zero"):
        target.current(21)


def test_a_gpu_signal_that_matches_nothing_on_a_serving_fleet_is_named_not_silent():
    """Issue 12, section 4's other place: the GPU query answering no series while replicas are
    ready abstains (no proposal), but the target says so (scaler_signal_silent, a log line);
    with no ready replica, or with GPU series present, it is not flagged."""
    from adapter.reading import silent_signals

    def gpu_reading(ready: float, gpu: float | None):
        outcomes = (QueryOutcome(names.QUEUE, 0.01, 8.0), QueryOutcome(names.READY_REPLICAS, 0.01, ready),
                    QueryOutcome(names.GPU, 0.01, gpu))
        return to_reading(outcomes, ())

    assert silent_signals(gpu_reading(2.0, None)) == (names.GPU,)
    assert silent_signals(gpu_reading(2.0, 55.0)) == ()
    assert silent_signals(gpu_reading(0.0, None)) == ()
    spec = parse_metadata({"prometheusAddress": "http://p:9090"})  # queue and gpu by default
    target = Target(("ml", "sd", ()), "ml", "sd", spec, now=0)
    target.apply(gpu_reading(2.0, None), now=0)
    assert target.silent == (names.GPU,) and names.GPU not in target.snapshot.decision.proposals
    target.apply(gpu_reading(2.0, 55.0), now=1)
    assert target.silent == ()


def redis_reading(backlog: float | None, ready: float | None, error: str | None = None):
    """A refresh of a trigger with redisAddress: the queue from Redis, ready replicas from
    Prometheus, which failed with `error` when given."""
    queue = QueryOutcome(names.QUEUE, 0.01, backlog) if backlog is not None else \
        QueryOutcome(names.QUEUE, 0.01, error="Redis at redis://r:6379/0, stream 's': ConnectionError: refused")
    ready_outcome = QueryOutcome(names.READY_REPLICAS, 0.01, ready, error=error)
    return to_reading((queue, ready_outcome), ())


def test_with_the_queue_from_redis_isactive_follows_a_fresh_backlog_while_prometheus_fails():
    """Zero workers, Prometheus down: a backlog must still wake the fleet (IsActive needs only the
    queue), while GetMetrics keeps the strict rule, last good value then UNAVAILABLE."""
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "redisAddress": "redis://r:6379/0",
                           "signals": "queue", "staleAfterSeconds": "20"})
    target = Target(("ml", "sd", ()), "ml", "sd", spec, now=0)
    target.apply(redis_reading(0.0, 0.0), now=0)
    assert (target.current(0).decision.value, target.is_active(0)) == (0, False)
    down = "Prometheus at http://p:9090: ConnectionError: refused"
    target.apply(redis_reading(0.0, None, error=down), now=10)
    assert target.is_active(10) is False
    target.apply(redis_reading(12.0, None, error=down), now=15)  # jobs arrive while Prometheus is down
    assert target.is_active(15) is True and target.current(15).decision.value == 0  # GetMetrics: the last good value
    for t in range(16, 40):
        target.apply(redis_reading(12.0, None, error=down), now=t)
    assert target.is_active(39) is True  # as long as Redis answers
    with pytest.raises(Unavailable, match="value for ml/sd is 21s old .*ready query: Prometheus at"):
        target.current(21)
    # Redis fails too: the last good backlog until it is stale, then UNAVAILABLE.
    target.apply(redis_reading(None, None, error=down), now=40)
    assert target.is_active(59) is True
    with pytest.raises(Unavailable, match="last good backlog for ml/sd is 21s old"):
        target.is_active(60)


def test_isactive_never_comes_from_a_failed_refresh_without_redis():
    """Without redisAddress the queue comes from Prometheus beside ready replicas: a refresh with
    one failed query is no evidence, so IsActive keeps the snapshot's rule."""
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "signals": "queue", "staleAfterSeconds": "20"})
    target = Target(("ml", "sd", ()), "ml", "sd", spec, now=0)
    target.apply(to_reading((QueryOutcome(names.QUEUE, 0.01, 12.0),
                             QueryOutcome(names.READY_REPLICAS, 0.01, error="refused")), ()), now=0)
    with pytest.raises(Unavailable, match="no value yet"):
        target.is_active(0)
    assert target.activity is None


# --- the capacity signal's measurements (issue 14) -----------------------------------------------

CAPACITY_ANSWERS = {names.DEMAND: 208.0, names.ARRIVALS: 10.4, names.CAPACITY: 130.0, names.STARTUP: 30.0}


def capacity_reading(queue: float = 4.0, ready: float = 2.0, **answers: float | None):
    """A reading of the counts and the capacity signal's four queries; a query given None answered
    no series."""
    raw = {**CAPACITY_ANSWERS, **answers}
    return to_reading((QueryOutcome(names.QUEUE, 0.01, queue), QueryOutcome(names.READY_REPLICAS, 0.01, ready),
                       *(outcome(name, raw[name], 0.01) for name in names.CAPACITY_QUERIES)), ())


@pytest.mark.parametrize(("metadata", "capacity_read"), [
    ({"signals": "queue"}, True),  # the spare's gate (spareAboveLoad 0.2 by default) measures the load
    ({}, True),
    ({"signals": "queue", "spareAboveLoad": "0"}, False),  # nothing uses them
    ({"signals": "queue,capacity"}, True),
    ({"signals": "capacity"}, True),
    ({"spareAboveLoad": "0.2"}, True),  # the spare's gate measures the load without the signal
    ({"spareAboveLoad": "0"}, False),
    ({"signals": "capacity", "redisAddress": "redis://r:6379/0"}, True),
])
def test_the_capacity_queries_are_read_only_where_something_uses_them(metadata, capacity_read):
    spec = parse_metadata({"prometheusAddress": "http://p:9090", **metadata})
    counts = (names.READY_REPLICAS,) if "redisAddress" in metadata else (names.QUEUE, names.READY_REPLICAS)
    gpu = (names.GPU,) if "signals" not in metadata else ()
    assert needed_queries(spec) == counts + gpu + (names.CAPACITY_QUERIES if capacity_read else ())


def test_the_capacity_answers_become_the_signals_fields():
    signals = capacity_reading().signals
    assert (signals.demand, signals.arrivals, signals.capacity, signals.startup_s) == (208.0, 10.4, 130.0, 30.0)


@pytest.mark.parametrize("name", names.CAPACITY_QUERIES)
@pytest.mark.parametrize("raw", [None, math.nan, math.inf])
def test_an_empty_or_not_finite_capacity_answer_is_missing_never_zero(name, raw):
    """No series (a worker that does not export it yet, a selector that misses) or NaN: the field
    is None, the reading still succeeds, and the other signals decide."""
    reading = capacity_reading(**{name: raw})
    assert reading.signals is not None
    fields = dict(zip(names.CAPACITY_QUERIES, (reading.signals.demand, reading.signals.arrivals,
                                               reading.signals.capacity, reading.signals.startup_s)))
    assert fields[name] is None
    assert all(value is not None for other, value in fields.items() if other != name)


@pytest.mark.parametrize("name", names.CAPACITY_QUERIES)
def test_a_negative_capacity_answer_fails_the_reading(name):
    reading = capacity_reading(**{name: -1.0})
    assert reading.signals is None
    assert reading.error == f"{name} query: answered -1; it cannot be negative"


def _capacity_target() -> Target:
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "signals": "queue,capacity",
                           "targetQueuePerReplica": "40"})
    return Target(("ml", "sd", ()), "ml", "sd", spec, now=0)


@pytest.mark.parametrize("name", [
    names.DEMAND,
    names.CAPACITY,
    names.ARRIVALS,
    names.STARTUP,
])
def test_a_missing_capacity_measurement_makes_the_capacity_signal_abstain(name):
    """40 requests in flight, 208 image-steps/s arriving as 10.4 requests/s (20 each), replicas
    of 130/s starting in 30 s: with every measurement the capacity signal asks for
    (208 + 2 sqrt(208 x 20 / 30)) / (130 x 0.8) + 40 x 20 / (130 x 10) = 2.84, so 3, above the
    queue's 2; with one missing it says nothing, and the queue decides alone."""
    target = _capacity_target()
    target.apply(capacity_reading(queue=40.0), now=0)
    assert target.snapshot.decision.proposals == {"queue": 2, "capacity": 3}
    target = _capacity_target()
    target.apply(capacity_reading(queue=40.0, **{name: None}), now=0)
    assert target.snapshot.decision.proposals == {"queue": 2}
