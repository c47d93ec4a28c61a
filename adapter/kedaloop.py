"""KEDA and the HPA on one machine: the scaler's real gRPC contract, the HPA's real algorithm.

`LocalKeda` does what KEDA's operator and metrics adapter do for one ScaledObject with an
external trigger: `GetMetricSpec` once for the metric name and target, `IsActive` every
`polling_interval_s`, and, at every HPA sync, `GetMetrics`, whose value goes through
`adapter.hpa` (AverageValue target, tolerance, behavior) to a replica count applied to the
target. KEDA's activation (scaling from and to zero) applies only when `min_replicas` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adapter._proto import externalscaler_pb2 as pb
from adapter.hpa import Behavior, HorizontalPodAutoscaler, HpaSpec, MetricTarget


class ScaleTarget(Protocol):
    """What the controller scales: the count it asked for, the count ready, and the knob."""

    @property
    def desired(self) -> int: ...

    def ready_count(self) -> int: ...

    def scale_to(self, replicas: int) -> None: ...


@dataclass(frozen=True)
class Tick:
    """One controller step, for the live view and the timeline."""

    t: float
    desired: int
    ready: int
    metric: float | None
    target: float
    active: bool | None
    reason: str


class LocalKeda:
    def __init__(self, stub, ref: pb.ScaledObjectRef, min_replicas: int, max_replicas: int,
                 behavior: Behavior | None = None, polling_interval_s: float = 30.0, sync_period_s: float = 15.0,
                 cooldown_s: float = 300.0) -> None:
        self.stub = stub
        self.ref = ref
        self.min_replicas = min_replicas
        self.hpa = HorizontalPodAutoscaler(HpaSpec(max(1, min_replicas), max_replicas, behavior or Behavior()))
        self.polling_interval_s = polling_interval_s
        self.sync_period_s = sync_period_s
        self.cooldown_s = cooldown_s
        self.metric_name = ""
        self.target = 0.0
        self.active: bool | None = None
        self._last_active_at: float | None = None
        self._next_poll = 0.0
        self._next_sync = 0.0

    def start(self, now: float) -> None:
        [spec] = self.stub.GetMetricSpec(self.ref, timeout=10).metricSpecs
        self.metric_name = spec.metricName
        self.target = spec.targetSizeFloat or float(spec.targetSize)
        self._next_poll = self._next_sync = now

    def step(self, now: float, target: ScaleTarget) -> Tick | None:
        """Runs whatever is due at `now`; returns the HPA sync's outcome when one ran."""
        if now >= self._next_poll:
            self._next_poll = now + self.polling_interval_s
            self.active = self.stub.IsActive(self.ref, timeout=10).result
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
        request = pb.GetMetricsRequest(scaledObjectRef=self.ref, metricName=self.metric_name)
        try:
            [value] = self.stub.GetMetrics(request, timeout=10).metricValues
            metric = value.metricValueFloat or float(value.metricValue)
        except Exception:  # noqa: BLE001 - the HPA keeps the count when the metric fails
            metric = None
        result = self.hpa.sync(now, current, [(MetricTarget("AverageValue", self.target), metric)], target.ready_count())
        if result.desired_replicas != current:
            target.scale_to(result.desired_replicas)
        return Tick(now, result.desired_replicas, target.ready_count(), metric, self.target, self.active, result.reason)

    def _activation(self, now: float, target: ScaleTarget) -> None:
        if self.active and target.desired == 0:
            target.scale_to(1)
        elif not self.active and target.desired > 0 and self._last_active_at is not None \
                and now - self._last_active_at >= self.cooldown_s:
            target.scale_to(0)
