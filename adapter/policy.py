"""The scaler's decision core: signals + previous state + spec + now -> Decision. No I/O.

Each enabled signal proposes a replica count, the proposals combine into one composite
(their maximum, or a weighted mean), and stabilization windows with the HPA's semantics
smooth it: the value may rise only to the lowest recommendation of the scale-up window
and fall only to the highest of the scale-down window. The result is in replicas, so with
an AverageValue target of 1 the HPA asks for that many, once the change exceeds the HPA's
tolerance (10 % by default, so the shipped ScaledObject sets it to 0: README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from adapter.windows import RecommendationWindow
from contract.names import CAPACITY, GPU, LATENCY, QUEUE, SIGNALS

# Float arithmetic such as 3 * 75 / 75 must not round up to 4 replicas.
_CEIL_SLACK = 1e-9

# Idle gaps the keep-warm hold needs before it trusts their quantile, and how many it keeps.
MIN_GAPS, MAX_GAPS = 20, 512

# How the proposals become one composite: their maximum, or their weighted mean.
COMBINE_MODES = ("max", "weighted")


@dataclass(frozen=True)
class PolicySpec:
    """Everything the decision core needs: one trigger's policy, already validated.

    Times are in seconds, utilization in percent, queue lengths in requests, replica counts
    whole. The field defaults are the trigger metadata's defaults (`adapter.config` reads
    them from here), so a ScaledObject that sets nothing gets `PolicySpec()`.
    """

    signals: tuple[str, ...] = (QUEUE, GPU)  # enabled signals, a subset of SIGNALS in its order
    target_queue_per_replica: float = 8.0  # requests (waiting + running) one replica should hold
    target_gpu_util_percent: float = 75.0  # 0 < x <= 100
    target_p95_seconds: float | None = None  # None: no latency objective, the latency signal is off
    combine: str = "max"  # one of COMBINE_MODES
    weights: Mapping[str, float] = field(default_factory=lambda: {s: 1.0 for s in SIGNALS})  # signal -> weight >= 0
    scale_up_window_s: float = 0.0  # stabilization windows, HPA semantics
    scale_down_window_s: float = 300.0
    burst_factor: float = 2.0  # a queue proposal >= this x ready replicas skips the scale-up window
    min_busy_replicas: int = 2  # the queue's floor while requests are in flight; 1 turns it off
    min_replicas: int | None = None  # clamps on the composite; None: no clamp
    max_replicas: int | None = None
    activation_queue: float = 0.0  # active while the queue exceeds this
    target_capacity_utilization: float = 0.8  # 0 < x <= 1: the share of a replica's capacity to plan for
    drain_seconds: float | None = None  # the capacity signal drains the backlog within this; None: target_p95_seconds, else 10
    queue_smoothing_s: float = 30.0  # the queue signal reads the queue's mean over this window (0: the instant gauge)
    trend_window_s: float = 60.0  # the capacity signal's demand trend is fitted over this many seconds
    spare_above_load: float = 0.2  # min_busy_replicas holds only while demand >= this x one replica's capacity
    headroom_sigmas: float = 2.0  # capacity headroom: standard deviations of the arrivals over one start-up
    keep_warm_quantile: float = 1.0  # stay active through idle gaps up to this quantile of those seen ...
    keep_warm_multiple: float = 2.0  # ... times this
    keep_warm_max_s: float = 3600.0  # and never longer than this after the last request; 0: no hold


@dataclass(frozen=True)
class Signals:
    """One observation of a scale target, as the source layer read it."""

    queue: float  # requests waiting + running, summed over the target's pods
    ready_replicas: float
    gpu_util_percent: float | None = None  # None: no GPU series, the signal abstains
    p95_seconds: float | None = None  # None: no request finished inside the window
    # The capacity signal's inputs; any None and it abstains (absent is not zero).
    demand: float | None = None  # image-steps per second arriving, over the window, summed over the target
    arrivals: float | None = None  # requests per second arriving, over the window
    capacity: float | None = None  # image-steps per second one replica serves at its max batch (mean over replicas)
    startup_s: float | None = None  # seconds a new replica takes to serve: process start to ready (mean)


@dataclass(frozen=True)
class PolicyState:
    """What a decision carries forward to the next one."""

    started_at: float | None = None  # time of the first decision since the scaler (re)started
    window: RecommendationWindow = field(default_factory=RecommendationWindow)
    last_value: float | None = None
    demand_history: tuple[tuple[float, float], ...] = ()  # (time, demand) inside the trend window
    queue_history: tuple[tuple[float, float], ...] = ()  # (time, queue) inside queue_smoothing_s
    last_busy_at: float | None = None  # the last decision that saw requests in flight or arriving
    idle_gaps: tuple[float, ...] = ()  # seconds of the last idle stretches that ended, oldest first
    idle: bool = False  # the last decision saw nothing in flight or arriving


@dataclass(frozen=True)
class Decision:
    """A decision, with the reasons a dashboard needs to explain it."""

    proposals: dict[str, float]  # replicas proposed by each enabled signal that had data
    composite: float  # proposals combined and clamped, before stabilization
    value: float  # after stabilization: what KEDA receives
    limiting: str  # the signal whose proposal is the composite, or "none"
    held_by: str  # what moved value away from composite: "" when nothing did
    burst: bool  # the queue proposal skipped the scale-up window
    active: bool  # the queue exceeds the activation threshold, or an idle fleet is kept warm (`keep_warm_s`)
    state: PolicyState
    kept_warm: bool = False  # active only because of the keep-warm hold (`keep_warm_s`)


def ceil_replicas(x: float) -> int:
    return max(0, math.ceil(x - _CEIL_SLACK))


def queue_active(spec: PolicySpec, queue: float) -> bool:
    """IsActive's rule: the queue (requests or jobs) exceeds `activation_queue`."""
    return queue > spec.activation_queue


def demand_trend(history: tuple[tuple[float, float], ...]) -> float:
    """The least-squares slope of demand over time, in image-steps per second per second; 0
    with fewer than two samples or no spread in time."""
    if len(history) < 2:
        return 0.0
    n = len(history)
    mean_t = sum(t for t, _ in history) / n
    mean_d = sum(d for _, d in history) / n
    spread = sum((t - mean_t) ** 2 for t, _ in history)
    if spread <= 0:
        return 0.0
    return sum((t - mean_t) * (d - mean_d) for t, d in history) / spread


def capacity_need(spec: PolicySpec, signals: Signals, trend: float = 0.0) -> float | None:
    """Replicas the measured demand needs, unrounded; None when an input is missing.

        need = (demand + max(0, trend) x L + z x sqrt(demand x work / L)) / (capacity x u)
           + queue x work / (capacity x drain)

    `demand` is image-steps per second arriving and `capacity` what one replica serves at its
    max batch, both measured (the workers export them). The first term is Little's-law
    steady state at utilization `u` (`target_capacity_utilization`), with the demand projected
    one start-up delay L ahead along its rising trend (a replica asked for now serves only then),
    plus headroom for the arrivals' randomness over L: z (`headroom_sigmas`) standard deviations
    of a Poisson stream at the measured rate of requests of the measured size. The second drains
    what is in flight (requests, at `work` = demand / arrivals image-steps each) within
    `drain_seconds` (the latency objective by default), so a backlog left by a burst is cleared
    in time instead of waiting for the steady term to notice it.
    """
    demand, capacity = signals.demand, signals.capacity
    if demand is None or capacity is None or capacity <= 0 or signals.arrivals is None or signals.startup_s is None:
        return None
    u = spec.target_capacity_utilization
    startup = signals.startup_s
    lead = max(0.0, trend) * startup
    work = demand / signals.arrivals if signals.arrivals else 0.0  # image-steps per request
    # Poisson arrivals of `work` each: over a start-up delay L the rate varies by sqrt(demand x work / L)
    spread = math.sqrt(demand * work / max(startup, 1.0))
    need = (demand + lead + spec.headroom_sigmas * spread) / (capacity * u)
    if signals.queue > 0 and work:
        drain_s = spec.drain_seconds or spec.target_p95_seconds or 10.0
        need += signals.queue * work / (capacity * drain_s)
    return need


def keep_warm_s(spec: PolicySpec, signals: Signals, gaps: tuple[float, ...]) -> float:
    """How long an idle fleet stays active after its last request, in seconds: 0 when a cold
    start meets the objective anyway (start-up within `target_p95_seconds`), else
    `keep_warm_multiple` times the `keep_warm_quantile` of the idle gaps seen (so at most the
    rest of the gaps, and fewer, end in a cold start), at most `keep_warm_max_s`, and that
    maximum while fewer than `MIN_GAPS` gaps are known.
    Ski rental with the objective first: a cold start costs missed requests, an idle replica
    only its GPU."""
    if signals.startup_s is not None and spec.target_p95_seconds and signals.startup_s <= spec.target_p95_seconds:
        return 0.0
    if len(gaps) < MIN_GAPS:
        return spec.keep_warm_max_s
    ordered = sorted(gaps)
    rank = min(len(ordered) - 1, math.ceil(spec.keep_warm_quantile * len(ordered)) - 1)
    return min(spec.keep_warm_max_s, spec.keep_warm_multiple * ordered[max(0, rank)])


def proposals(spec: PolicySpec, signals: Signals, trend: float = 0.0, queue_mean: float | None = None
              ) -> dict[str, float]:
    """Replicas each enabled signal asks for; a signal without data proposes nothing.
    `trend` is the demand's slope (`demand_trend`), for the capacity signal's lead; `queue_mean`
    the queue's mean over `queue_smoothing_s` (None: the instant queue), for the queue signal
    unless the instant queue is a burst (its proposal at least `burst_factor` x ready)."""
    out: dict[str, float] = {}
    ready = signals.ready_replicas
    queue_need = ceil_replicas(signals.queue / spec.target_queue_per_replica)
    if QUEUE in spec.signals:
        steady = queue_need if queue_mean is None else ceil_replicas(queue_mean / spec.target_queue_per_replica)
        bursting = queue_need > 0 and queue_need >= spec.burst_factor * ready
        # While requests are in flight, never rely on a lone replica: new ones take tens of
        # seconds to start, and one replica cannot absorb a step in load meanwhile.
        # The spare is for load that a step could push past one replica: held while the measured
        # demand is at least `spare_above_load` of a replica's capacity (always, unmeasured).
        trickle = (signals.demand is not None and signals.capacity
                   and signals.demand < spec.spare_above_load * signals.capacity)
        busy_floor = 1 if trickle else spec.min_busy_replicas
        need = queue_need if bursting else steady
        out[QUEUE] = max(need, busy_floor) if signals.queue > 0 else need
    if GPU in spec.signals and signals.gpu_util_percent is not None:
        out[GPU] = ceil_replicas(ready * signals.gpu_util_percent / spec.target_gpu_util_percent)
    if LATENCY in spec.signals and signals.p95_seconds is not None and spec.target_p95_seconds:
        # p95 over the window lags: after a backlog it still reports waits the fleet has
        # already cleared, and ready x p95 / target would grow with every replica added. So
        # latency may add one replica beyond the larger of ready and the queue's need, and only
        # while the queue fills the ready replicas; with less in flight it can only hold.
        held = max(ceil_replicas(ready), queue_need)
        out[LATENCY] = min(ceil_replicas(ready * signals.p95_seconds / spec.target_p95_seconds),
                           held + 1 if queue_need >= ready else held)
    if CAPACITY in spec.signals:
        need = capacity_need(spec, signals, trend)
        if need is not None:
            # a request in flight needs a replica even when the rate rounds to none
            out[CAPACITY] = max(ceil_replicas(need), 1 if signals.queue > 0 else 0)
    return out


def _combine(spec: PolicySpec, proposed: dict[str, float], fallback: float) -> tuple[float, str]:
    if not proposed:
        # No signal has data (no GPU series and no traffic, queue disabled): no evidence
        # for a change, so hold what the target has rather than invent a number.
        return fallback, "none"
    limiting = max(proposed, key=lambda s: (proposed[s], -spec.signals.index(s)))
    if spec.combine == "max":
        return proposed[limiting], limiting
    weighted = {s: spec.weights.get(s, 1.0) for s in proposed}
    total = sum(weighted.values())
    if total <= 0:
        return fallback, "none"
    return sum(proposed[s] * w for s, w in weighted.items()) / total, limiting


def _clamp(spec: PolicySpec, value: float) -> tuple[float, str]:
    if spec.max_replicas is not None and value > spec.max_replicas:
        return float(spec.max_replicas), "max_replicas"
    if spec.min_replicas is not None and value < spec.min_replicas:
        return float(spec.min_replicas), "min_replicas"
    return value, ""


def decide(spec: PolicySpec, signals: Signals, state: PolicyState, now: float) -> Decision:
    """The stabilized replica recommendation for `signals` observed at `now`."""
    started_at = state.started_at if state.started_at is not None else now
    current = state.last_value if state.last_value is not None else signals.ready_replicas

    history = ()
    if CAPACITY in spec.signals:  # the trend only leads the capacity signal
        cutoff = now - spec.trend_window_s
        history = tuple(h for h in state.demand_history if h[0] > cutoff)
        if signals.demand is not None:
            history += ((now, signals.demand),)
    queue_seen = ()
    if spec.queue_smoothing_s > 0:
        cutoff = now - spec.queue_smoothing_s
        queue_seen = tuple(q for q in state.queue_history if q[0] > cutoff) + ((now, signals.queue),)
    queue_mean = sum(q for _, q in queue_seen) / len(queue_seen) if queue_seen else None
    proposed = proposals(spec, signals, demand_trend(history), queue_mean)
    raw, limiting = _combine(spec, proposed, fallback=current)
    composite, composite_clamped_by = _clamp(spec, raw)

    queue_proposal = proposed.get(QUEUE, 0.0)
    burst = queue_proposal > 0 and queue_proposal >= spec.burst_factor * signals.ready_replicas

    # HPA semantics: move from the current value no further up than the lowest
    # recommendation inside the scale-up window, no further down than the highest
    # inside the scale-down window. A burst ignores the scale-up window.
    window = state.window
    up_limit = composite if burst else window.lowest(now, spec.scale_up_window_s, composite)
    down_limit = window.highest(now, spec.scale_down_window_s, composite)
    value = min(max(current, up_limit), down_limit)
    held_by = composite_clamped_by
    if value < composite:
        held_by = "scale_up_window"
    elif value > composite:
        held_by = "scale_down_window"

    # After a restart the history is gone; until one scale-down window of it exists,
    # never recommend fewer replicas than are serving.
    if now - started_at < spec.scale_down_window_s and value < signals.ready_replicas:
        value = signals.ready_replicas
        held_by = "restart_hold"

    value, clamped_by = _clamp(spec, value)
    held_by = clamped_by or held_by

    # Idle gaps: a stretch without requests in flight or arriving, measured at its end.
    busy = signals.queue > 0 or bool(signals.arrivals)
    last_busy, gaps = state.last_busy_at, state.idle_gaps
    if busy:
        if state.idle and last_busy is not None:
            gaps = (gaps + (now - last_busy,))[-MAX_GAPS:]
        last_busy = now
    active = queue_active(spec, signals.queue)
    kept_warm = (not active and last_busy is not None and signals.ready_replicas > 0 and spec.keep_warm_max_s > 0
                 and now - last_busy < keep_warm_s(spec, signals, gaps))

    keep_s = max(spec.scale_up_window_s, spec.scale_down_window_s)
    next_state = PolicyState(
        started_at=started_at,
        window=window.record(now, composite, keep_s),
        last_value=value,
        demand_history=history,
        queue_history=queue_seen,
        last_busy_at=last_busy,
        idle_gaps=gaps,
        idle=not busy,
    )
    return Decision(
        proposals=proposed,
        composite=composite,
        value=value,
        limiting=limiting,
        held_by=held_by,
        burst=burst,
        active=active or kept_warm,
        kept_warm=kept_warm,
        state=next_state,
    )
