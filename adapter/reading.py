"""One refresh's reading, whatever its source (Prometheus or direct scrapes, Redis for the
queue): each query's outcome, and the one conversion from those outcomes to the policy's `Signals`.

Interpretation is where "a missing answer never becomes 0" is enforced:

| query   | empty result      | NaN or +-Inf          | negative |
| ------- | ----------------- | --------------------- | -------- |
| queue   | 0 (no worker up)* | failure               | failure  |
| ready   | 0 (no worker up)* | failure               | failure  |
| gpu     | abstains          | abstains              | failure  |
| latency | abstains          | abstains              | failure  |
| demand, arrivals, capacity, startup | abstains (the capacity signal) | abstains | failure |

* unless the target has ready replicas (the Kubernetes API says so, or, where it cannot say, the last
  good reading had ready replicas): `absent_is_not_zero`.

Read from Redis (`redisAddress`, `adapter/redisqueue.py`), the queue is the stream's backlog:
a number, or an error (a stream that does not exist is one: the gateway and the workers create
it, so its absence is a misconfiguration or lost data), never "no series", so
`absent_is_not_zero` never touches it, and an error reading it is a failure like any other.

A latency of NaN is what `histogram_quantile` returns when no request finished inside the
window; +Inf when the p95 lies beyond the histogram's largest finite bucket. A query that
returns more than one series is a failure (aggregate it). A failed query fails the whole
reading: the caller keeps serving the last good value instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from adapter.config import ScalerSpec
from adapter.policy import Signals
from contract.names import ARRIVALS, CAPACITY, CAPACITY_QUERIES, DEMAND, GPU, LATENCY, QUEUE, READY_REPLICAS, STARTUP

_COUNTS = (QUEUE, READY_REPLICAS)  # an empty answer is 0 of these, never a missing signal


@dataclass(frozen=True)
class QueryOutcome:
    """One query of one reading: its raw value (None when empty) or its error."""

    name: str
    duration_s: float
    value: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Reading:
    """The signals of one refresh (None when any needed query failed), with each query's
    outcome and each HTTP request's duration."""

    signals: Signals | None
    outcomes: tuple[QueryOutcome, ...]
    requests: tuple[tuple[str, float], ...] = ()  # ("combined" or a query name, seconds)

    @property
    def error(self) -> str:
        """Each failed query and why; queries that failed alike (one joined request) share a line."""
        failed: dict[str, list[str]] = {}
        for outcome in self.outcomes:
            if outcome.error:
                failed.setdefault(outcome.error, []).append(outcome.name)
        return "; ".join(
            f"{', '.join(names)} {'query' if len(names) == 1 else 'queries'}: {error}" for error, names in failed.items()
        )


def needed_queries(spec: ScalerSpec) -> tuple[str, ...]:
    """What Prometheus or the direct scrapes answer: queue (activity) and ready replicas always,
    GPU and latency when enabled; the queue not when it is read from Redis (`redis_address`)."""
    counts = (READY_REPLICAS,) if spec.redis_address else (QUEUE, READY_REPLICAS)
    capacity = CAPACITY_QUERIES if CAPACITY in spec.policy.signals or spec.policy.spare_above_load > 0 else ()
    return counts + tuple(s for s in (GPU, LATENCY) if s in spec.policy.signals) + capacity


def interpret(name: str, value: float | None) -> float | None:
    """The signal's value from a query's raw answer; raises ValueError when unusable."""
    if value is None:
        return 0.0 if name in _COUNTS else None
    if not math.isfinite(value):
        if name in _COUNTS:
            raise ValueError(f"answered {value}; a count must be a finite number")
        return None
    if value < 0:
        raise ValueError(f"answered {value:g}; it cannot be negative")
    return value


def outcome(name: str, value: float | None, duration_s: float) -> QueryOutcome:
    """A query's outcome from its raw answer (None when empty): an error when `interpret` refuses it."""
    try:
        interpret(name, value)
    except ValueError as e:
        return QueryOutcome(name, duration_s, value=value, error=str(e))
    return QueryOutcome(name, duration_s, value=value)


def to_reading(outcomes: tuple[QueryOutcome, ...], requests: tuple[tuple[str, float], ...]) -> Reading:
    """One refresh's Reading from its query outcomes, the one conversion every source uses:
    the signals when every query answered usably, None when any failed, or while a count is not
    among them yet (the queue read from Redis joins the other source's outcomes afterwards)."""
    if any(o.error for o in outcomes) or not set(_COUNTS) <= {o.name for o in outcomes}:
        return Reading(None, outcomes, requests)
    values = {o.name: interpret(o.name, o.value) for o in outcomes}
    signals = Signals(
        queue=values[QUEUE],
        ready_replicas=values[READY_REPLICAS],
        gpu_util_percent=values.get(GPU),
        p95_seconds=values.get(LATENCY),
        demand=values.get(DEMAND),
        arrivals=values.get(ARRIVALS),
        capacity=values.get(CAPACITY),
        startup_s=values.get(STARTUP),
    )
    return Reading(signals, outcomes, requests)


def absent_is_not_zero(reading: Reading, last_good: Signals | None, api_replicas: int | None = None) -> Reading:
    """`reading` failed where a count query (queue, ready) answered no series at all while the
    target has replicas: series that vanish from a serving target are missing data (a scrape
    or discovery outage, say), not an idle fleet, so the caller keeps its last good value until
    it is stale instead of scaling to the zero an empty answer would read as.

    `api_replicas` is the scale target's ready replicas from the Kubernetes API, None when the
    API cannot say. When it says, it decides: N > 0 makes an empty answer missing data, even
    with no history; 0 makes it believed (a fleet scaled to zero has no series). When it cannot
    say, the history decides: an empty answer is believed as 0 when there is no good reading
    yet, when the last one had no ready replica, or when it had nothing in flight. KEDA takes a
    fleet to zero only after IsActive has been false (an empty queue) for its cooldown, and an
    idle worker exits at once on SIGTERM, so a fleet scaled to zero was idle when its series
    went; series that vanish from a busy fleet are the outage this rule is for.
    """
    if reading.signals is None:
        return reading
    if api_replicas is not None:
        if api_replicas <= 0:
            return reading
        why = f"the Kubernetes API reports {api_replicas} ready replica{'s' if api_replicas != 1 else ''}"
    elif last_good is None or last_good.ready_replicas <= 0 or last_good.queue <= 0:
        return reading
    else:
        why = f"{last_good.ready_replicas:g} replicas were ready with {last_good.queue:g} requests in flight"
    empty = {o.name for o in reading.outcomes if o.name in _COUNTS and o.value is None and o.error is None}
    if not empty:
        return reading
    error = f"returned no series while {why}: missing data, not zero (series vanished from the target)"
    return Reading(None, tuple(replace(o, error=error) if o.name in empty else o for o in reading.outcomes),
                   reading.requests)


def silent_signals(reading: Reading) -> tuple[str, ...]:
    """The enabled GPU signal when it answered no series while replicas are ready. It abstains
    (no evidence, no proposal), but a GPU query that matches nothing on a serving fleet is a
    fault to name, not an idle GPU: no exporter, its series labelled with another pod (a
    shared GPU), or a selector label the exporter does not set."""
    if reading.signals is None or reading.signals.ready_replicas <= 0:
        return ()
    return tuple(o.name for o in reading.outcomes if o.name == GPU and o.value is None and o.error is None)
