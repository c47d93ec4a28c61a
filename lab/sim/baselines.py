"""The baselines: what users run today, each as its published defaults make it.

- `hpa-gpu`: HPA on GPU utilization, 75 % per replica (dcgm-exporter + prometheus-adapter,
  utilization averaged over 1 m), Kubernetes' default behavior;
- `keda-queue`: KEDA's Prometheus scaler on requests in flight, 5 per replica, through the
  same KEDA loop as the composite, Kubernetes' default behavior;
- `keda-queue-min0`: the same on a queue and down to zero, as a user with an SQS queue runs it:
  `queueLength` 5, `activationQueueLength` 0, `minReplicaCount` 0, KEDA's default
  `pollingInterval` (30 s) and `cooldownPeriod` (300 s);
- `fixed-interval`: every 30 s, one replica more when the queue exceeds the replicas' batch
  capacity, one fewer when it is empty (the Lightning approach);
- `knative`: Knative's KPA with its defaults on concurrency, the container concurrency set
  to the max batch (70 % of it is the target), 60 s stable window, 6 s panic window, panic
  at twice the ready pods, at most halving per decision.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from lab.hpa import HorizontalPodAutoscaler, HpaSpec, MetricTarget
from lab.keda import KedaLoop
from lab.target import FleetTarget
from lab.sim.controller import Controller, PeriodicController
from lab.sim.observe import Observation

BASELINE_NAMES = ("hpa-gpu", "keda-queue", "fixed-interval", "knative")
KEDA_QUEUE_MIN0 = "keda-queue-min0"
# KEDA's defaults for a ScaledObject that sets neither, seconds
KEDA_POLLING_INTERVAL_S = 30.0
KEDA_COOLDOWN_PERIOD_S = 300.0


class PrometheusQueueScaler:
    """A KEDA built-in scaler on the queue (requests in flight, or a queue's length): queried at
    each call, active while the queue exceeds `activation` (KEDA's `activationQueueLength`)."""

    def __init__(self, target_per_replica: float, activation: float = 0.0) -> None:
        self.target = target_per_replica
        self.activation = activation
        self.latest: Observation | None = None

    def metric_target(self) -> float:
        return self.target

    def is_active(self) -> bool:
        return self.latest is not None and self.latest.signals.queue > self.activation

    def metric(self) -> float:
        if self.latest is None:
            raise LookupError("nothing scraped yet")
        return self.latest.signals.queue


class KedaQueueController(Controller):
    """KEDA on queue length: its Prometheus scaler, its loop, the HPA's default behavior."""

    def __init__(self, target_per_replica: float, min_replicas: int, max_replicas: int,
                 polling_interval_s: float = KEDA_POLLING_INTERVAL_S, sync_period_s: float = 15.0,
                 name: str = "keda-queue", cooldown_s: float = KEDA_COOLDOWN_PERIOD_S, activation: float = 0.0) -> None:
        self.name = name
        self.scaler = PrometheusQueueScaler(target_per_replica, activation)
        self.keda = KedaLoop(self.scaler, min_replicas, max_replicas, None, polling_interval_s, sync_period_s, cooldown_s)
        self._started = False

    def step(self, o: Observation, target: FleetTarget) -> None:
        self.scaler.latest = o
        if not self._started:
            self.keda.start(o.t)
            self._started = True
        self.keda.step(o.t, target)


class HpaController(PeriodicController):
    """An HPA on one metric (through prometheus-adapter) with Kubernetes' default behavior."""

    def __init__(self, name: str, metric: Callable[[Observation], float | None], target_per_replica: float,
                 min_replicas: int, max_replicas: int) -> None:
        super().__init__()
        self.name = name
        self.metric = metric
        self.target = MetricTarget("AverageValue", target_per_replica)
        self.hpa = HorizontalPodAutoscaler(HpaSpec(min_replicas, max_replicas))

    def desired(self, o: Observation) -> int:
        return self.hpa.sync(o.t, o.serving, [(self.target, self.metric(o))], o.signals.ready_replicas).desired_replicas


class FixedIntervalController(PeriodicController):
    """One replica more or fewer every 30 s, from the queue against the replicas' batch capacity."""

    name = "fixed-interval"
    period_s = 30.0

    def __init__(self, batch_capacity: int, min_replicas: int, max_replicas: int) -> None:
        super().__init__()
        self.capacity = batch_capacity
        self.min_replicas, self.max_replicas = min_replicas, max_replicas

    def desired(self, o: Observation) -> int:
        if o.signals.queue > self.capacity * max(o.signals.ready_replicas, 1):
            return min(self.max_replicas, o.serving + 1)
        if o.signals.queue == 0:
            return max(self.min_replicas, o.serving - 1)
        return o.serving


class KnativeController(PeriodicController):
    """Knative's KPA with its defaults: every 2 s, concurrency averaged over a 60 s stable window
    and a 6 s panic window, aimed at 70 % of the container concurrency; panic when the panic
    window asks for at least twice the ready pods, and while panicking never scale down; at most
    halve the pods per decision (max-scale-down-rate 2)."""

    name = "knative"
    period_s = 2.0

    def __init__(self, container_concurrency: float, min_replicas: int, max_replicas: int,
                 stable_s: float = 60.0, panic_s: float = 6.0, panic_threshold: float = 2.0,
                 target_utilization: float = 0.7, max_scale_down_rate: float = 2.0) -> None:
        super().__init__()
        self.target = container_concurrency * target_utilization
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.stable_s, self.panic_s, self.panic_threshold = stable_s, panic_s, panic_threshold
        self.max_scale_down_rate = max_scale_down_rate
        self.history: deque[tuple[float, float]] = deque()
        self.panicking_until = -math.inf
        self.panic_peak = 0

    def desired(self, o: Observation) -> int:
        self.history.append((o.t, o.signals.queue))
        while self.history[0][0] <= o.t - self.stable_s:
            self.history.popleft()
        stable = sum(q for _, q in self.history) / len(self.history)
        recent = [q for t, q in self.history if t > o.t - self.panic_s]
        panic = sum(recent) / len(recent)
        stable_want = math.ceil(stable / self.target)
        panic_want = math.ceil(panic / self.target)
        if panic / self.target >= self.panic_threshold * max(o.signals.ready_replicas, 1):
            self.panicking_until = o.t + self.stable_s
        if o.t < self.panicking_until:  # in panic: never scale down, follow the panic window up
            self.panic_peak = max(self.panic_peak, panic_want, o.serving)
            want = self.panic_peak
        else:
            self.panic_peak = 0
            want = max(stable_want, math.ceil(o.signals.ready_replicas / self.max_scale_down_rate))
        return max(self.min_replicas, min(self.max_replicas, want))


def keda_queue_min0(max_replicas: int) -> KedaQueueController:
    """KEDA on a queue's length down to zero with what its users set: 5 per replica, active above
    0, and KEDA's defaults for the rest (polling 30 s, cooldown 300 s)."""
    return KedaQueueController(5.0, 0, max_replicas, name=KEDA_QUEUE_MIN0, activation=0.0)


def baseline(name: str, max_batch: int, min_replicas: int, max_replicas: int) -> Controller:
    """One baseline by name. Only KEDA's can go to zero: `keda-queue-min0` always does, and
    `keda-queue` with `min_replicas` 0; the others raise ValueError at 0 (an HPA's minReplicas
    is at least 1, fixed-interval never wakes an empty fleet, Knative's activator is not modelled)."""
    if name == KEDA_QUEUE_MIN0:
        return keda_queue_min0(max_replicas)
    if name == "keda-queue":
        return KedaQueueController(5.0, min_replicas, max_replicas)
    if name not in BASELINE_NAMES:
        raise ValueError(f"no baseline {name!r}; known: {', '.join((*BASELINE_NAMES, KEDA_QUEUE_MIN0))}")
    if min_replicas < 1:
        raise ValueError(f"{name} cannot scale to zero: min replicas must be at least 1")
    if name == "hpa-gpu":
        return HpaController("hpa-gpu", _gpu_busy_replicas, 75.0, min_replicas, max_replicas)
    if name == "fixed-interval":
        return FixedIntervalController(max_batch, min_replicas, max_replicas)
    return KnativeController(float(max_batch), min_replicas, max_replicas)


def baselines(max_batch: int, min_replicas: int, max_replicas: int) -> list[Controller]:
    """The four baselines of every table, at `min_replicas` (at least 1)."""
    return [baseline(name, max_batch, min_replicas, max_replicas) for name in BASELINE_NAMES]


def _gpu_busy_replicas(o: Observation) -> float | None:
    """prometheus-adapter's sum of per-pod utilization: the HPA divides it by 75 % per replica."""
    s = o.signals
    return None if s.gpu_util_percent is None else s.gpu_util_percent * s.ready_replicas
