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
from contract.names import GPU, LATENCY, QUEUE, SIGNALS

# Float arithmetic such as 3 * 75 / 75 must not round up to 4 replicas.
_CEIL_SLACK = 1e-9

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


@dataclass(frozen=True)
class Signals:
    """One observation of a scale target, as the source layer read it."""

    queue: float  # requests waiting + running, summed over the target's pods
    ready_replicas: float
    gpu_util_percent: float | None = None  # None: no GPU series, the signal abstains
    p95_seconds: float | None = None  # None: no request finished inside the window


@dataclass(frozen=True)
class PolicyState:
    """What a decision carries forward to the next one."""

    started_at: float | None = None  # time of the first decision since the scaler (re)started
    window: RecommendationWindow = field(default_factory=RecommendationWindow)
    last_value: float | None = None


@dataclass(frozen=True)
class Decision:
    """A decision, with the reasons a dashboard needs to explain it."""

    proposals: dict[str, float]  # replicas proposed by each enabled signal that had data
    composite: float  # proposals combined and clamped, before stabilization
    value: float  # after stabilization: what KEDA receives
    limiting: str  # the signal whose proposal is the composite, or "none"
    held_by: str  # what moved value away from composite: "" when nothing did
    burst: bool  # the queue proposal skipped the scale-up window
    active: bool  # the queue exceeds the activation threshold
    state: PolicyState


def ceil_replicas(x: float) -> int:
    return max(0, math.ceil(x - _CEIL_SLACK))


def queue_active(spec: PolicySpec, queue: float) -> bool:
    """IsActive's rule: the queue (requests or jobs) exceeds `activation_queue`."""
    return queue > spec.activation_queue


def proposals(spec: PolicySpec, signals: Signals) -> dict[str, float]:
    """Replicas each enabled signal asks for; a signal without data proposes nothing."""
    out: dict[str, float] = {}
    ready = signals.ready_replicas
    queue_need = ceil_replicas(signals.queue / spec.target_queue_per_replica)
    if QUEUE in spec.signals:
        # While requests are in flight, never rely on a lone replica: new ones take tens of
        # seconds to start, and one replica cannot absorb a step in load meanwhile.
        out[QUEUE] = max(queue_need, spec.min_busy_replicas) if signals.queue > 0 else queue_need
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

    proposed = proposals(spec, signals)
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

    keep_s = max(spec.scale_up_window_s, spec.scale_down_window_s)
    next_state = PolicyState(
        started_at=started_at,
        window=window.record(now, composite, keep_s),
        last_value=value,
    )
    return Decision(
        proposals=proposed,
        composite=composite,
        value=value,
        limiting=limiting,
        held_by=held_by,
        burst=burst,
        active=queue_active(spec, signals.queue),
        state=next_state,
    )
