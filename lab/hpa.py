"""The Horizontal Pod Autoscaler's algorithm, as Kubernetes implements it, for local runs and replays.

A faithful, pure emulation of one HPA object (k8s.io/kubernetes pkg/controller/podautoscaler:
`horizontal.go` and `replica_calculator.go`, autoscaling/v2): per-metric replica proposals
for External metrics with `AverageValue` or `Value` targets and the tolerance, the maximum over
metrics, then `behavior`: stabilization (the lowest recommendation over the scale-up window,
the highest over the scale-down window) and the scaling policies (Pods and Percent per period,
`selectPolicy` Max, Min or Disabled), then min/max. Time is an argument; nothing here reads a
clock or does I/O. The local stack and the replay simulator share this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
TargetType = Literal["AverageValue", "Value"]

DEFAULT_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance


@dataclass(frozen=True)
class ScalingPolicy:
    type: PolicyType
    value: int
    period_seconds: int

    def __post_init__(self) -> None:
        if self.type not in ("Pods", "Percent"):
            raise ValueError(f"policy type must be Pods or Percent, got {self.type!r}")
        if self.value <= 0 or not 0 < self.period_seconds <= 1800:
            raise ValueError(f"policy value must be > 0 and periodSeconds in 1..1800, got {self.value}, {self.period_seconds}")


@dataclass(frozen=True)
class ScalingRules:
    stabilization_window_seconds: int
    policies: tuple[ScalingPolicy, ...]
    select_policy: SelectPolicy = "Max"
    # This direction's tolerance (autoscaling/v2 `tolerance`, Kubernetes 1.33+ behind the
    # HPAConfigurableTolerance gate, beta in 1.35); None: the cluster-wide one (HpaSpec's).
    tolerance: float | None = None


# Kubernetes' defaults (autoscaling/v2 SetDefaults_HorizontalPodAutoscalerBehavior).
DEFAULT_SCALE_UP = ScalingRules(0, (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)))
DEFAULT_SCALE_DOWN = ScalingRules(300, (ScalingPolicy("Percent", 100, 15),))


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules = DEFAULT_SCALE_UP
    scale_down: ScalingRules = DEFAULT_SCALE_DOWN

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> Behavior:
        """From a `behavior` object as in the HPA (or KEDA's horizontalPodAutoscalerConfig); absent parts default."""
        spec = spec or {}
        return cls(_rules(spec.get("scaleUp"), DEFAULT_SCALE_UP), _rules(spec.get("scaleDown"), DEFAULT_SCALE_DOWN))


def _rules(spec: Mapping[str, Any] | None, default: ScalingRules) -> ScalingRules:
    if not spec:
        return default
    window = spec.get("stabilizationWindowSeconds", default.stabilization_window_seconds)
    if not 0 <= int(window) <= 3600:
        raise ValueError(f"stabilizationWindowSeconds must be in 0..3600, got {window}")
    policies = default.policies
    if "policies" in spec:
        policies = tuple(ScalingPolicy(p["type"], int(p["value"]), int(p["periodSeconds"])) for p in spec["policies"])
    select = spec.get("selectPolicy", "Max")
    if select not in ("Max", "Min", "Disabled"):
        raise ValueError(f"selectPolicy must be Max, Min or Disabled, got {select!r}")
    tolerance = _quantity(spec["tolerance"]) if "tolerance" in spec else default.tolerance
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {spec['tolerance']!r}")
    return ScalingRules(int(window), policies, select, tolerance)


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as the tolerance field takes it: 0, 0.05, "0.05" or "50m"."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(f"tolerance must be a quantity such as 0.05 or 50m, got {value!r}") from None


# The behavior our ScaledObject sets (manifests/base/scaledobject.yaml): the HPA passes the
# scaler's value through at once, so the scaler's stabilization windows are the only ones, and
# with tolerance 0 a one-replica step applies at any fleet size (where the cluster honours the
# field: Kubernetes 1.33+ with HPAConfigurableTolerance; elsewhere the cluster-wide 10 % holds).
PASS_THROUGH = Behavior(
    scale_up=ScalingRules(0, (ScalingPolicy("Percent", 1000, 15),), tolerance=0.0),
    scale_down=ScalingRules(0, (ScalingPolicy("Percent", 100, 15),), tolerance=0.0),
)


@dataclass(frozen=True)
class MetricTarget:
    """An External metric's target: `AverageValue` (per replica) or `Value` (in total)."""

    type: TargetType
    value: float

    def __post_init__(self) -> None:
        if self.type not in ("AverageValue", "Value") or not self.value > 0:
            raise ValueError(f"target must be AverageValue or Value with a value above 0, got {self.type} {self.value}")


@dataclass(frozen=True)
class HpaSpec:
    min_replicas: int
    max_replicas: int
    behavior: Behavior = field(default_factory=Behavior)
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= minReplicas <= maxReplicas, got {self.min_replicas}, {self.max_replicas}")


@dataclass(frozen=True)
class SyncResult:
    desired_replicas: int
    metric_replicas: int | None  # the proposal before behavior, None when no metric was valid
    reason: str


@dataclass(frozen=True)
class Tolerances:
    """The band of usage ratios inside which nothing changes: [1 - scale_down, 1 + scale_up]
    (replica_calculator.go `Tolerances.isWithin`)."""

    scale_down: float
    scale_up: float

    def within(self, usage_ratio: float) -> bool:
        return 1.0 - self.scale_down <= usage_ratio <= 1.0 + self.scale_up


def metric_replicas(target: MetricTarget, value: float, current_replicas: int, ready_replicas: int,
                    tolerance: float | Tolerances) -> int:
    """One External metric's proposal (GetExternalPerPodMetricReplicas / GetExternalMetricReplicas);
    a plain `tolerance` applies to both directions."""
    band = tolerance if isinstance(tolerance, Tolerances) else Tolerances(tolerance, tolerance)
    if target.type == "AverageValue":
        usage_ratio = value / (target.value * current_replicas)
        if band.within(usage_ratio):
            return current_replicas
        return math.ceil(value / target.value)
    usage_ratio = value / target.value
    if band.within(usage_ratio):
        return current_replicas
    return math.ceil(usage_ratio * ready_replicas)


class HorizontalPodAutoscaler:
    """One HPA's state across syncs: its recommendations and its scale events."""

    def __init__(self, spec: HpaSpec) -> None:
        self.spec = spec
        self._recommendations: list[tuple[float, int]] = []  # (time, unstabilized recommendation)
        self._scale_up_events: list[tuple[float, int]] = []  # (time, replicas added)
        self._scale_down_events: list[tuple[float, int]] = []  # (time, replicas removed)

    def sync(self, now: float, current_replicas: int, metrics: Sequence[tuple[MetricTarget, float | None]],
             ready_replicas: int | None = None) -> SyncResult:
        """One reconcile: the replica count the HPA sets at `now`. A value of None is a failed metric."""
        spec = self.spec
        ready = current_replicas if ready_replicas is None else ready_replicas
        if current_replicas == 0:
            return SyncResult(0, None, "ScalingDisabled")  # KEDA owns 0 <-> 1
        if current_replicas > spec.max_replicas:
            return self._record(now, current_replicas, spec.max_replicas, None, "TooManyReplicas")
        if current_replicas < spec.min_replicas:
            return self._record(now, current_replicas, spec.min_replicas, None, "TooFewReplicas")
        behavior = spec.behavior
        band = Tolerances(
            spec.tolerance if behavior.scale_down.tolerance is None else behavior.scale_down.tolerance,
            spec.tolerance if behavior.scale_up.tolerance is None else behavior.scale_up.tolerance,
        )
        proposals = [metric_replicas(t, v, current_replicas, ready, band) for t, v in metrics if v is not None]
        if not proposals:
            return SyncResult(current_replicas, None, "FailedGetExternalMetric")
        proposal = max(proposals)
        if len(proposals) < len(metrics) and proposal < current_replicas:
            # Kubernetes does not scale down while any metric is unavailable.
            proposal = current_replicas
        stabilized = self._stabilize(now, current_replicas, proposal)
        desired, reason = self._apply_policies(now, current_replicas, stabilized)
        return self._record(now, current_replicas, desired, proposal, reason)

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        behavior = self.spec.behavior
        if not self._recommendations:
            # recordInitialRecommendation: a new (or restarted) controller starts its
            # history from the current count, so it does not scale down on its first sync.
            self._recommendations.append((now, current))
        up_cutoff = now - behavior.scale_up.stabilization_window_seconds
        down_cutoff = now - behavior.scale_down.stabilization_window_seconds
        up, down = desired, desired
        old_index = None
        for index, (stamp, recommendation) in enumerate(self._recommendations):
            if stamp > up_cutoff:
                up = min(up, recommendation)
            if stamp > down_cutoff:
                down = max(down, recommendation)
            if stamp < up_cutoff and stamp < down_cutoff:
                old_index = index
        recommendation = current
        if recommendation < up:
            recommendation = up
        if recommendation > down:
            recommendation = down
        if old_index is not None:
            self._recommendations[old_index] = (now, desired)
        else:
            self._recommendations.append((now, desired))
        return recommendation

    def _apply_policies(self, now: float, current: int, desired: int) -> tuple[int, str]:
        spec = self.spec
        if desired > current:
            limit = max(self._scale_up_limit(now, current), current)
            allowed = min(spec.max_replicas, limit)
            if desired > allowed:
                return allowed, "ScaleUpLimit" if limit < spec.max_replicas else "TooManyReplicas"
        elif desired < current:
            limit = min(self._scale_down_limit(now, current), current)
            allowed = max(spec.min_replicas, limit)
            if desired < allowed:
                return allowed, "ScaleDownLimit" if limit > spec.min_replicas else "TooFewReplicas"
        return desired, "DesiredWithinRange"

    def _period_start(self, now: float, current: int, period_s: int) -> int:
        added = sum(change for stamp, change in self._scale_up_events if stamp > now - period_s)
        removed = sum(change for stamp, change in self._scale_down_events if stamp > now - period_s)
        return current - added + removed

    def _scale_up_limit(self, now: float, current: int) -> int:
        rules = self.spec.behavior.scale_up
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start + policy.value)
            else:  # rounded up, or a small fleet could never grow
                proposals.append(math.ceil(start * (1 + policy.value / 100)))
        return min(proposals) if rules.select_policy == "Min" else max(proposals)

    def _scale_down_limit(self, now: float, current: int) -> int:
        rules = self.spec.behavior.scale_down
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            start = self._period_start(now, current, policy.period_seconds)
            if policy.type == "Pods":
                proposals.append(start - policy.value)
            else:
                proposals.append(int(start * (1 - policy.value / 100)))
        # Max selects the largest change, which for scaling down is the lowest count.
        return max(proposals) if rules.select_policy == "Min" else min(proposals)

    def _record(self, now: float, current: int, desired: int, proposal: int | None, reason: str) -> SyncResult:
        if desired > current:
            self._scale_up_events.append((now, desired - current))
        elif desired < current:
            self._scale_down_events.append((now, current - desired))
        longest = max((p.period_seconds for rules in (self.spec.behavior.scale_up, self.spec.behavior.scale_down)
                       for p in rules.policies), default=0)
        self._scale_up_events = [e for e in self._scale_up_events if e[0] > now - longest]
        self._scale_down_events = [e for e in self._scale_down_events if e[0] > now - longest]
        return SyncResult(desired, proposal, reason)
