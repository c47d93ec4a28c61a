"""The scaler's own metrics (`scaler_*`): per-target families built fresh on each scrape,
plus process-wide gRPC and Prometheus-query counters.

Per-target series carry `namespace`, `scaledobject` and `metric` (the trigger's metricName).
A forgotten target's series disappear with it, because nothing per target is kept in
prometheus_client's own state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from adapter.events import REASONS as EVENT_REASONS
from adapter.kube import FALLBACK_REASONS
from adapter.policy import demand_trend
from adapter.reading import Reading
from adapter.recorder import RESULTS as EVENT_RESULTS
from adapter.targets import Target, Unavailable
from contract import names
from contract.names import CAPACITY, GPU, QUERIES, SIGNALS

LABELS = names.SCALER_LABELS
HELD_BY = ("scale_up_window", "scale_down_window", "restart_hold", "min_replicas", "max_replicas")

# RPCs answer from memory in well under a millisecond; Prometheus queries take milliseconds.
_RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10)
_QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ScalerMetrics:
    """Process-wide counters, registered into the registry passed in."""

    def __init__(self, registry: CollectorRegistry):
        self.grpc_requests = Counter(
            names.SCALER_GRPC_REQUESTS, "gRPC calls answered, by method and status code", [names.METHOD, names.CODE], registry=registry
        )
        self.grpc_duration = Histogram(
            names.SCALER_GRPC_DURATION,
            "Time to answer a unary gRPC call",
            [names.METHOD],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.query_duration = Histogram(
            names.SCALER_QUERY_DURATION,
            "Prometheus request round trips, by query ('combined' when one request carries all of a target's queries)",
            [names.QUERY],
            buckets=_QUERY_BUCKETS,
            registry=registry,
        )

        self.kubernetes_fallback = Gauge(
            names.SCALER_KUBERNETES_API_FALLBACK,
            "ScaledObjects whose scale target's ready replicas the Kubernetes API did not give at the last "
            "read, by why, so the history rule decides whether an empty answer is 0 for them",
            [names.REASON],
            registry=registry,
        )
        self.kubernetes_api_fallback({})
        self.kubernetes_events = Counter(
            names.SCALER_KUBERNETES_EVENTS,
            "Kubernetes Events drafted on ScaledObjects, by the Event's reason and what became of it: created, "
            "patched (a repeat counted into an existing Event), rate_limited or queue_full (dropped), failed",
            [names.REASON, names.RESULT],
            registry=registry,
        )
        for reason in EVENT_REASONS:
            for result in EVENT_RESULTS:
                self.kubernetes_events.labels(reason, result)

    def kubernetes_event(self, reason: str, result: str) -> None:
        """Counts one drafted Event's fate (adapter.recorder.RESULTS); called from the writer thread too."""
        self.kubernetes_events.labels(reason, result).inc()

    def kubernetes_api_fallback(self, counts: Mapping[str, int]) -> None:
        """How many ScaledObjects fall back for each of adapter.kube.FALLBACK_REASONS (absent: 0)."""
        for reason in FALLBACK_REASONS:
            self.kubernetes_fallback.labels(reason).set(counts.get(reason, 0))

    def observe_reading(self, reading: Reading) -> None:
        for query, duration_s in reading.requests:
            self.query_duration.labels(query).observe(duration_s)


class TargetCollector:
    """Builds the per-target families from the registry's targets at scrape time."""

    def __init__(self, targets: Callable[[], list[Target]], clock: Callable[[], float]):
        self._targets = targets
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []  # families vary with the registered targets

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        g = _Families()
        newest: dict[tuple[str, str, str], Target] = {}
        for target in self._targets():
            labels = (target.namespace, target.name, target.spec.metric_name)
            kept = newest.get(labels)
            if kept is None or target.last_used_at > kept.last_used_at:
                newest[labels] = target
        g.scaledobjects.add_metric([], len(newest))
        for labels, target in newest.items():
            self._collect_target(g, list(labels), target, now)
        return g.all()

    @staticmethod
    def _collect_target(g: _Families, labels: list[str], target: Target, now: float) -> None:
        age = target.age(now)
        stale = age is None or age > target.spec.stale_after_s
        g.stale.add_metric(labels, 1.0 if stale else 0.0)
        if GPU in target.spec.policy.signals:
            g.silent.add_metric(labels + [GPU], 1.0 if GPU in target.silent else 0.0)
        if age is not None:
            g.age.add_metric(labels, age)
        g.refreshes.add_metric(labels + ["ok"], target.refreshes["ok"])
        g.refreshes.add_metric(labels + ["error"], target.refreshes["error"])
        for outcome in target.last_outcomes:
            g.query_duration.add_metric(labels + [outcome.name], outcome.duration_s)
        for query in QUERIES:
            if query in target.query_failures or any(o.name == query for o in target.last_outcomes):
                g.query_failures.add_metric(labels + [query], target.query_failures[query])
        try:  # IsActive's answer, which may outlive the snapshot (Target.is_active); absent when UNAVAILABLE
            g.active.add_metric(labels, 1.0 if target.is_active(now) else 0.0)
        except Unavailable:
            pass
        snapshot = target.snapshot
        if snapshot is None:
            return
        signals, decision = snapshot.signals, snapshot.decision
        g.queue.add_metric(labels, signals.queue)
        g.ready.add_metric(labels, signals.ready_replicas)
        if signals.gpu_util_percent is not None:
            g.gpu.add_metric(labels, signals.gpu_util_percent)
        if signals.p95_seconds is not None:
            g.p95.add_metric(labels, signals.p95_seconds)
        for family, value in ((g.demand, signals.demand), (g.capacity, signals.capacity), (g.startup, signals.startup_s)):
            if value is not None:
                family.add_metric(labels, value)
        if CAPACITY in target.spec.policy.signals and signals.demand is not None:
            g.trend.add_metric(labels, demand_trend(decision.state.demand_history))
        for signal in SIGNALS:
            if signal in decision.proposals:
                g.proposal.add_metric(labels + [signal], decision.proposals[signal])
        g.composite.add_metric(labels, decision.composite)
        g.desired.add_metric(labels, decision.value)
        g.burst.add_metric(labels, 1.0 if decision.burst else 0.0)
        for signal in SIGNALS + ("none",):
            g.limiting.add_metric(labels + [signal], 1.0 if decision.limiting == signal else 0.0)
        for reason in HELD_BY:
            g.held.add_metric(labels + [reason], 1.0 if decision.held_by == reason else 0.0)


class _Families:
    """One scrape's worth of fresh metric families."""

    def __init__(self):
        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=LABELS + extra)

        self.scaledobjects = GaugeMetricFamily(names.SCALER_SCALEDOBJECTS, "Triggers registered and refreshing")
        self.queue = gauge(names.SCALER_QUEUE, "Queue signal: requests waiting + running over the target's pods, "
                           "or the job stream's backlog (undelivered + pending) with redisAddress")
        self.ready = gauge(names.SCALER_READY, f"Replicas reporting ready ({names.READY})")
        self.gpu = gauge(names.SCALER_GPU, "GPU signal: mean utilization over the target's GPUs")
        self.p95 = gauge(names.SCALER_P95, "Latency signal: p95 request latency over the window")
        self.demand = gauge(names.SCALER_DEMAND, "Capacity signal: image-steps per second asked of the target "
                            "over the window")
        self.capacity = gauge(names.SCALER_CAPACITY, "Capacity signal: image-steps per second one replica serves "
                              "at its max batch, mean over the replicas")
        self.startup = gauge(names.SCALER_STARTUP, "Capacity signal: seconds from a replica's start to ready, mean")
        self.trend = gauge(names.SCALER_DEMAND_TREND, "Capacity signal: the demand's least-squares slope over "
                           "trendWindowSeconds, per second")
        self.proposal = gauge(names.SCALER_PROPOSAL, "Replicas each signal proposes", (names.SIGNAL,))
        self.composite = gauge(names.SCALER_COMPOSITE, "Composite of the proposals, before stabilization")
        self.desired = gauge(names.SCALER_DESIRED, "Composite after stabilization: the value KEDA receives")
        self.active = gauge(names.SCALER_ACTIVE, "1 when IsActive answers true (queue above activationQueue, or the keep-warm hold)")
        self.burst = gauge(names.SCALER_BURST, "1 when the queue proposal skipped the scale-up window")
        self.limiting = gauge(names.SCALER_LIMITING, "1 for the signal whose proposal is the composite", (names.SIGNAL,))
        self.held = gauge(names.SCALER_HOLD, "1 for what holds the value away from the composite", (names.REASON,))
        self.age = gauge(names.SCALER_VALUE_AGE, "Age of the value being served")
        self.silent = gauge(names.SCALER_SIGNAL_SILENT,
                            "1 when an enabled signal matches no series while replicas are ready (it abstains)",
                            (names.SIGNAL,))
        self.stale = gauge(names.SCALER_STALE, "1 when no value can be served (none yet, or older than staleAfterSeconds)")
        self.query_duration = gauge(
            names.SCALER_QUERY_LAST_DURATION, "Duration of each query in the last refresh", (names.QUERY,)
        )
        self.refreshes = CounterMetricFamily(
            names.SCALER_REFRESHES, "Background refreshes by result", labels=LABELS + (names.RESULT,)
        )
        self.query_failures = CounterMetricFamily(
            names.SCALER_QUERY_FAILURES, "Failed Prometheus queries by query", labels=LABELS + (names.QUERY,)
        )

    def all(self) -> list[Metric]:
        return list(vars(self).values())
