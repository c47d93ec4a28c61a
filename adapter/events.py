"""What the scaler says in Kubernetes Events, and how often: purely computational, no I/O, no clock.

`next_event` compares what a target serves after a refresh with what was last announced for it,
and drafts an Event only on a change: the size the HPA is asked for (the served value's ceiling,
`metricValue`), a stabilization window or the restart hold starting to hold it, its data going
stale, no value at all, or a recovery. Each draft says what and why, in the HPA's own
`SuccessfulRescale` wording ("New size: 5; reason: ..."): the limiting signal with its measured
value against its target, and what held the size away from the composite (a window, a bound,
stale data). A size that stays put across refreshes drafts nothing, and a size that moves in
steps (a window letting go of one recommendation per refresh) is told once it settles (the same
at two refreshes in a row), from the size last told, or after `SIZE_EVENT_INTERVAL_S` of steps.

`EventCorrelator` then does what client-go's `tools/record` EventCorrelator does for the kubelet
(events_cache.go): a token bucket per involved object (`EventSourceObjectSpamFilter`: a burst of
25, refilled one every 300 s, its `defaultSpamBurst` and `defaultSpamQPS`), spent by every
event, repeats included; and a repeat of the same event patches the existing Event's `count`,
`lastTimestamp` and `message` instead of creating another (its `eventLogger`). Two choices of
ours: "the same" is object, type, reason and the message's key (what it says, without the
numbers it measured), where client-go compares whole messages and folds differing ones only
after ten in ten minutes; and a repeat counts into its Event only within `aggregate_window_s` of
the last one (600 s, client-go's `defaultAggregateIntervalInSeconds`), where client-go's cache
has no time limit, so a size reached again an hour later is a new line in `kubectl describe`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from adapter.config import ScalerSpec
from adapter.policy import Decision, PolicySpec, Signals, ceil_replicas
from adapter.targets import Target, Unavailable
from contract.names import CAPACITY, GPU, LATENCY, QUEUE

NORMAL, WARNING = "Normal", "Warning"  # core/v1 Event types

# Event reasons (CamelCase, as Kubernetes' and KEDA's): each one's meaning is in docs/SCALER.md.
SCALE_UP, SCALE_DOWN = "ScaleUpRecommended", "ScaleDownRecommended"
SCALE_UP_HELD, SCALE_DOWN_HELD = "ScaleUpHeld", "ScaleDownHeld"
REFRESH_FAILED, VALUE_UNAVAILABLE, REFRESH_RECOVERED = "RefreshFailed", "ValueUnavailable", "RefreshRecovered"
REASONS = (SCALE_UP, SCALE_DOWN, SCALE_UP_HELD, SCALE_DOWN_HELD, REFRESH_FAILED, VALUE_UNAVAILABLE, REFRESH_RECOVERED)

# What a target serves: a fresh value; the last good one while refreshes fail; nothing (UNAVAILABLE).
FRESH, STALE, UNAVAILABLE = "fresh", "stale", "unavailable"
# Holds that last for a while and answer "why has it not scaled yet?" (a bound is a steady state).
_TIMED_HOLDS = {"scale_up_window": SCALE_UP_HELD, "scale_down_window": SCALE_DOWN_HELD, "restart_hold": SCALE_DOWN_HELD}

SIZE_EVENT_INTERVAL_S = 60.0  # a size still moving after this long is told where it is
MAX_MESSAGE_CHARS = 1024  # events.k8s.io's limit on a note; core/v1 sets none, kubectl shows it whole

# client-go tools/record defaults (events_cache.go): defaultSpamBurst, defaultSpamQPS,
# defaultAggregateIntervalInSeconds, maxLruCacheEntries.
SPAM_BURST, SPAM_REFILL_PER_S, AGGREGATE_WINDOW_S, MAX_CACHED = 25, 1.0 / 300.0, 600.0, 4096


@dataclass(frozen=True)
class Observed:
    """One target after a refresh, as an Event would describe it."""

    condition: str  # FRESH, STALE or UNAVAILABLE
    replicas: int | None  # the last good value's ceiling (what the HPA is asked for); None: none yet
    decision: Decision | None  # the last good decision, with the signals below
    signals: Signals | None
    error: str  # STALE: the refresh's error; UNAVAILABLE: why nothing is served
    registered_s: float  # seconds since the target was registered


@dataclass(frozen=True)
class Announced:
    """What was last said about a target (its size, its condition, the timed hold told at that
    size), the size seen at the last refresh, and since when the size differs from the one told
    (seconds on the caller's clock; None while it does not)."""

    replicas: int | None
    condition: str
    hold: str = ""
    last_seen: int | None = None
    moving_since: float | None = None


@dataclass(frozen=True)
class EventDraft:
    """An Event to record on a ScaledObject (namespace, name). `key` is what the message says
    without the numbers it measured: a repeat with the same key is the same Event, counted."""

    namespace: str
    name: str
    type: str  # NORMAL or WARNING
    reason: str  # one of REASONS
    message: str
    key: tuple


def observe(target: Target, now: float) -> Observed:
    """Reads what `target` serves at `now` (`Target.current`'s rule for UNAVAILABLE)."""
    snapshot = target.snapshot
    replicas = ceil_replicas(snapshot.decision.value) if snapshot is not None else None
    decision, signals = (snapshot.decision, snapshot.signals) if snapshot is not None else (None, None)
    try:
        target.current(now)
    except Unavailable as e:
        return Observed(UNAVAILABLE, replicas, decision, signals, str(e), now - target.created_at)
    condition = STALE if target.last_error else FRESH
    return Observed(condition, replicas, decision, signals, target.last_error or "", now - target.created_at)


def next_event(namespace: str, name: str, spec: ScalerSpec, previous: Announced | None, seen: Observed, now: float,
               interval_s: float = SIZE_EVENT_INTERVAL_S) -> tuple[EventDraft | None, Announced | None]:
    """The Event (or None) a target's observation at `now` calls for, and what is announced after it.

    The first value a target serves is its baseline and says nothing (there is no "from"); a
    target with no value at all is announced UNAVAILABLE once it has waited `staleAfterSeconds`.
    A change of size is told once the size is the same at two refreshes in a row, or has been
    moving for `interval_s`: steps in between are told as one move."""
    def draft(type_: str, reason: str, message: str, *key) -> EventDraft:
        return EventDraft(namespace, name, type_, reason, _truncate(message), (type_, reason, *key))

    hold = seen.decision.held_by if seen.decision is not None else ""
    if seen.condition == UNAVAILABLE:
        if previous is None and seen.replicas is None and seen.registered_s < spec.stale_after_s:
            return None, None  # the first refreshes may still come good
        if previous is not None and previous.condition == UNAVAILABLE:
            return None, previous
        replicas = previous.replicas if previous is not None else seen.replicas
        message = f"No size to serve; reason: {seen.error}; KEDA's fallback applies after its failureThreshold"
        return draft(WARNING, VALUE_UNAVAILABLE, message), Announced(replicas, UNAVAILABLE)
    assert seen.replicas is not None and seen.decision is not None and seen.signals is not None
    timed_hold = hold if hold in _TIMED_HOLDS else ""
    if previous is None:
        return None, Announced(seen.replicas, seen.condition, timed_hold, seen.replicas)
    if seen.condition == STALE:
        if previous.condition != FRESH:
            return None, previous
        message = (f"Size held at {seen.replicas} on stale data; reason: the last refresh failed: {seen.error}; "
                   "UNAVAILABLE once the last good reading is older than staleAfterSeconds "
                   f"({_n(spec.stale_after_s)}s)")
        return draft(WARNING, REFRESH_FAILED, message, seen.replicas), Announced(
            seen.replicas, STALE, previous.hold, seen.replicas)
    recovered = previous.condition != FRESH
    moved = previous.replicas is not None and seen.replicas != previous.replicas
    moving_since = (previous.moving_since if previous.moving_since is not None else now) if moved else None
    settled = (seen.replicas == previous.last_seen or now - moving_since >= interval_s) if moved else True
    if moved and (settled or recovered):
        reason = SCALE_UP if seen.replicas > previous.replicas else SCALE_DOWN
        fractional = abs(seen.replicas - seen.decision.value) > 1e-9
        value = f"; the value {_n(seen.decision.value)} rounded up" if fractional else ""
        again = "; refreshes succeed again" if recovered else ""
        message = (f"New size: {seen.replicas} (was {previous.replicas}{value}){again}; "
                   f"reason: {explain(spec, seen.signals, seen.decision)}")
        key = (previous.replicas, seen.replicas, seen.decision.limiting, hold, recovered)
        return (draft(NORMAL, reason, message, *key),
                Announced(seen.replicas, FRESH, timed_hold, seen.replicas))
    if recovered:
        message = f"Refreshes succeed again; size {seen.replicas}; reason: {explain(spec, seen.signals, seen.decision)}"
        return (draft(NORMAL, REFRESH_RECOVERED, message, seen.replicas),
                Announced(seen.replicas, FRESH, timed_hold, seen.replicas))
    if not moved and timed_hold and timed_hold != previous.hold:
        message = f"Size held at {seen.replicas}; reason: {explain(spec, seen.signals, seen.decision)}"
        return (draft(NORMAL, _TIMED_HOLDS[hold], message, seen.replicas, hold),
                Announced(seen.replicas, FRESH, timed_hold, seen.replicas))
    # A hold that ends, or starts again, at an unchanged size changes nothing in the fleet; a
    # size still moving waits to be told as one move.
    return None, Announced(previous.replicas, FRESH, previous.hold, seen.replicas, moving_since)


def explain(spec: ScalerSpec, signals: Signals, decision: Decision) -> str:
    """Why the decision is what it is: the limiting signal's proposal with its measured value
    against its target, the composite when a weighted mean made it, and what held the value."""
    policy = spec.policy
    parts = [_proposal(spec, signals, decision)]
    if policy.combine == "weighted" and len(decision.proposals) > 1:
        mean = ", ".join(f"{s} {_n(p)}" for s, p in decision.proposals.items())
        parts.append(f"composite {_n(decision.composite)} (weighted mean of {mean})")
    held = _hold(policy, signals, decision)
    if held:
        parts.append(held)
    elif decision.burst:
        parts.append("a burst: the queue skipped the scale-up window")
    return "; ".join(parts)


def _proposal(spec: ScalerSpec, signals: Signals, decision: Decision) -> str:
    policy, limiting = spec.policy, decision.limiting
    proposed = decision.proposals.get(limiting)
    if proposed is None:
        return "no signal has data, so the current size holds"
    head = f"{limiting} proposes {_n(proposed)}: "
    if limiting == QUEUE:
        queue = _n(signals.queue)
        what = f"a backlog of {queue} jobs" if spec.redis_address else f"{queue} requests in flight"
        history = decision.state.queue_history
        used = signals.queue
        if policy.queue_smoothing_s > 0 and len(history) > 1 and not decision.burst:
            used = sum(q for _, q in history) / len(history)
            what += f" (mean {_n(used)} over {_n(policy.queue_smoothing_s)}s)"
        text = head + f"{what}, target {_n(policy.target_queue_per_replica)} per replica"
        if signals.queue > 0 and proposed > ceil_replicas(used / policy.target_queue_per_replica):
            text += f", at least {_n(proposed)} while requests are in flight (minBusyReplicas)"
        return text
    if limiting == GPU:
        return head + (f"{_n(signals.gpu_util_percent)}% GPU utilization over {_n(signals.ready_replicas)} ready "
                       f"replicas, target {_n(policy.target_gpu_util_percent)}%")
    if limiting == LATENCY:
        return head + f"p95 latency {_n(signals.p95_seconds)}s, target {_n(policy.target_p95_seconds)}s"
    if limiting == CAPACITY:
        return head + (f"demand {_n(signals.demand)} image-steps/s against {_n(signals.capacity)} per replica, "
                       f"target {_n(100 * policy.target_capacity_utilization)}% of it")
    return head.rstrip(": ")


def _hold(policy: PolicySpec, signals: Signals, decision: Decision) -> str:
    composite = _n(decision.composite)
    return {
        "scale_up_window": f"held below the composite {composite} by the scale-up window "
                           f"({_n(policy.scale_up_window_s)}s)",
        "scale_down_window": f"held above the composite {composite} by the scale-down window "
                             f"({_n(policy.scale_down_window_s)}s)",
        "restart_hold": f"held at the {_n(signals.ready_replicas)} ready replicas by the restart hold (no scale-down "
                        f"within {_n(policy.scale_down_window_s)}s of the scaler's start)",
        "min_replicas": f"bounded by minReplicas {policy.min_replicas}",
        "max_replicas": f"bounded by maxReplicas {policy.max_replicas}",
    }.get(decision.held_by, "")


def _n(x: float | None) -> str:
    """A measured number for a person: at most two decimals, no trailing zeros."""
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{round(x, 2):g}"


def _truncate(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


# --- correlation: rate limit and aggregation, client-go's way ------------------------------------


class TokenBucket:
    """`burst` tokens, refilled at `refill_per_s`; time is the caller's (seconds, monotonic)."""

    def __init__(self, burst: int, refill_per_s: float, now: float):
        self.burst, self.refill_per_s = burst, refill_per_s
        self.tokens, self.at = float(burst), now

    def try_accept(self, now: float) -> bool:
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.refill_per_s)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(frozen=True)
class Series:
    """One Event in the API server and the repeats counted into it."""

    event_name: str  # metadata.name of the Event
    count: int
    first_timestamp: str  # RFC 3339, as written
    last_at: float  # monotonic seconds of the last occurrence


@dataclass(frozen=True)
class Write:
    """What to do with a draft: create a new Event (`series` None) or patch `series`'s."""

    draft: EventDraft
    series: Series | None


class EventCorrelator:
    """Rate limit per ScaledObject and aggregation of repeats. Not thread-safe: one writer uses it."""

    def __init__(self, burst: int = SPAM_BURST, refill_per_s: float = SPAM_REFILL_PER_S,
                 aggregate_window_s: float = AGGREGATE_WINDOW_S, max_cached: int = MAX_CACHED):
        if burst < 1 or refill_per_s < 0 or aggregate_window_s < 0 or max_cached < 1:
            raise ValueError(f"burst must be >= 1 and the rest >= 0, not {burst}, {refill_per_s}, "
                             f"{aggregate_window_s}, {max_cached}")
        self._burst, self._refill_per_s = burst, refill_per_s
        self._window_s, self._max = aggregate_window_s, max_cached
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._series: OrderedDict[tuple, Series] = OrderedDict()

    def correlate(self, draft: EventDraft, now: float) -> Write | None:
        """The write `draft` calls for at `now`, or None when its ScaledObject is over its rate."""
        obj = (draft.namespace, draft.name)
        bucket = self._buckets.pop(obj, None) or TokenBucket(self._burst, self._refill_per_s, now)
        self._buckets[obj] = bucket
        _trim(self._buckets, self._max)
        if not bucket.try_accept(now):
            return None
        series = self._series.get(self._key(draft))
        if series is not None and now - series.last_at > self._window_s:
            series = None
        return Write(draft, series)

    def written(self, draft: EventDraft, series: Series) -> None:
        """Records that `series` is in the API server now, for the next repeat of `draft`."""
        key = self._key(draft)
        self._series.pop(key, None)
        self._series[key] = series
        _trim(self._series, self._max)

    @staticmethod
    def _key(draft: EventDraft) -> tuple:
        return (draft.namespace, draft.name, *draft.key)


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)  # the least recently used, as client-go's LRU
