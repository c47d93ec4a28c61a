"""KEDA and the HPA for one ScaledObject: KEDA's schedule, the HPA's real algorithm.

`KedaLoop` is what KEDA's operator and metrics adapter do for one ScaledObject, with the
scaler behind a small interface so the local stack (over real gRPC, `GrpcScaler`) and the
replay simulator (in process) share it:

- KEDA's polling loop, every `polling_interval_s`, asks `IsActive` (and, with
  `useCachedMetrics`, fetches the metric into KEDA's cache). Activity matters only for
  scaling from and to zero, so activation acts only when `min_replicas` is 0: a poll that finds
  the trigger active at 0 replicas scales to 1, and is the last active time; the first poll at
  least `cooldown_s` (`cooldownPeriod`) after the last active time, finding it inactive, scales
  to 0. Activity between polls is not seen: an instant backlog that a poll misses does not hold
  the fleet up. Unlike KEDA, a target that was never active is not scaled to 0 at once: one
  that opens with replicas (the simulator opens every policy with one ready) counts as active at
  the loop's first inactive poll, as a fleet that was serving before the run began would be.
- At every HPA sync (`sync_period_s`) the metric is fetched (or taken from the cache) and goes
  through `lab.hpa` (AverageValue target, tolerance, behavior) to a replica count that is
  applied to the target. A failed fetch keeps the count, as the HPA does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adapter._proto import externalscaler_pb2 as pb
from lab.hpa import Behavior, HorizontalPodAutoscaler, HpaSpec, MetricTarget
from lab.target import ScaleTarget


class Scaler(Protocol):
    """An external scaler as KEDA sees it: a target per replica, activity and a metric value."""

    def metric_target(self) -> float: ...

    def is_active(self) -> bool: ...

    def metric(self) -> float: ...  # raises when there is no value: the HPA keeps the count


@dataclass(frozen=True)
class Tick:
    """What one HPA sync did: the count it set, the metric it read and the HPA's reason."""

    t: float
    desired: int
    ready: int
    metric: float | None
    target: float
    active: bool | None
    reason: str


class KedaLoop:
    def __init__(self, scaler: Scaler, min_replicas: int, max_replicas: int, behavior: Behavior | None = None,
                 polling_interval_s: float = 30.0, sync_period_s: float = 15.0, cooldown_s: float = 300.0,
                 use_cached_metrics: bool = False) -> None:
        self.scaler = scaler
        self.min_replicas = min_replicas
        self.hpa = HorizontalPodAutoscaler(HpaSpec(max(1, min_replicas), max_replicas, behavior or Behavior()))
        self.polling_interval_s = polling_interval_s
        self.sync_period_s = sync_period_s
        self.cooldown_s = cooldown_s
        self.use_cached_metrics = use_cached_metrics
        self.target = 0.0
        self.active: bool | None = None
        self._cached: float | None = None
        self._last_active_at: float | None = None
        self._next_poll = 0.0
        self._next_sync = 0.0

    def start(self, now: float) -> None:
        self.target = self.scaler.metric_target()
        self._next_poll = self._next_sync = now

    def step(self, now: float, target: ScaleTarget) -> Tick | None:
        """Runs whatever is due at `now`; returns the HPA sync's outcome when one ran."""
        if now >= self._next_poll:
            self._next_poll = now + self.polling_interval_s
            self.active = self.scaler.is_active()
            if self.use_cached_metrics:
                self._cached = self._fetch()
            if self.active:
                self._last_active_at = now
            if self.min_replicas == 0:
                self._activation(now, target)
        if now < self._next_sync:
            return None
        self._next_sync = now + self.sync_period_s
        current = target.desired
        if current == 0:
            return Tick(now, 0, target.ready_count(), None, self.target, self.active, "ScaledToZero")
        metric = self._cached if self.use_cached_metrics else self._fetch()
        result = self.hpa.sync(now, current, [(MetricTarget("AverageValue", self.target), metric)], target.ready_count())
        if result.desired_replicas != current:
            target.scale_to(result.desired_replicas)
        return Tick(now, result.desired_replicas, target.ready_count(), metric, self.target, self.active, result.reason)

    def _fetch(self) -> float | None:
        try:
            return self.scaler.metric()
        except Exception:  # noqa: BLE001 - the HPA keeps the count when the metric fails
            return None

    def _activation(self, now: float, target: ScaleTarget) -> None:
        if self.active and target.desired == 0:
            target.scale_to(1)
        elif not self.active and target.desired > 0:
            if self._last_active_at is None:  # it opened with replicas: they served just before the loop began
                self._last_active_at = now
            if now - self._last_active_at >= self.cooldown_s:
                target.scale_to(0)


class GrpcScaler:
    """An external scaler reached over KEDA's gRPC contract."""

    def __init__(self, stub, ref: pb.ScaledObjectRef, timeout_s: float = 10.0) -> None:
        self.stub = stub
        self.ref = ref
        self.timeout_s = timeout_s
        self.metric_name = ""

    def metric_target(self) -> float:
        [spec] = self.stub.GetMetricSpec(self.ref, timeout=self.timeout_s).metricSpecs
        self.metric_name = spec.metricName
        return spec.targetSizeFloat or float(spec.targetSize)

    def is_active(self) -> bool:
        return self.stub.IsActive(self.ref, timeout=self.timeout_s).result

    def metric(self) -> float:
        request = pb.GetMetricsRequest(scaledObjectRef=self.ref, metricName=self.metric_name)
        [value] = self.stub.GetMetrics(request, timeout=self.timeout_s).metricValues
        return value.metricValueFloat or float(value.metricValue)

