"""The worker's Prometheus metrics: the load signals the scaler believes.

Names are DESIGN.md's contract. Counters and histograms are updated where things happen;
the gauges (queue depth, in-flight, readiness, effective max batch) and the busy-time
counter are read from live state at scrape time by `LiveCollector`, so a scrape in the
middle of a long batch already counts the time that batch has computed so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Request latencies of a diffusion worker run from a fraction of a second (tiny model, small
# batch) to minutes (deep queue); these bounds resolve the p95 the scaler reads across that
# span. The synthetic fleet in lab/synthetic.py uses the same bounds.
LATENCY_BUCKETS_S = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
OUTCOMES = ("ok", "rejected", "timeout", "error", "cancelled")


@dataclass(frozen=True)
class LiveState:
    """What the collector reads at scrape time; each callable must be cheap and thread-safe."""

    queue_images: Callable[[], int]
    requests_in_flight: Callable[[], int]
    busy_seconds: Callable[[], float]
    max_batch_size: Callable[[], int]
    ready: Callable[[], bool]


class LiveCollector:
    """Builds the live gauges and the busy-time counter afresh on every scrape."""

    def __init__(self, state: LiveState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state
        yield GaugeMetricFamily("diffusion_queue_depth", "Images waiting for the pipeline", value=state.queue_images())
        yield GaugeMetricFamily(
            "diffusion_requests_in_flight", "Requests accepted and not yet answered (waiting + running)",
            value=state.requests_in_flight(),
        )
        yield CounterMetricFamily(
            "diffusion_busy_seconds", "Seconds the pipeline has spent computing; its rate is the duty cycle",
            value=state.busy_seconds(),
        )
        yield GaugeMetricFamily(
            "diffusion_max_batch_size", "Images per batch the batcher allows now (lowered after out-of-memory)",
            value=state.max_batch_size(),
        )
        yield GaugeMetricFamily(
            "diffusion_ready", "1 when the model is loaded and the worker is not draining", value=float(state.ready()),
        )


class WorkerMetrics:
    """The worker's event metrics, registered into the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_duration = Histogram(
            "diffusion_request_duration_seconds",
            "Seconds from accepting a request to its response (accepted requests of every outcome)",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.queue_wait = Histogram(
            "diffusion_queue_wait_seconds", "Seconds a request waited before its first image started",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.batch_size = Histogram(
            "diffusion_batch_size", "Images per pipeline call", buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.requests = Counter(
            "diffusion_requests", "Requests by outcome", labelnames=("outcome",), registry=registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.images = Counter("diffusion_images", "Images the pipeline generated", registry=registry)
        self.model_load = Gauge(
            "diffusion_model_load_seconds", "Seconds the model took to load onto its device", registry=registry,
        )

    def watch(self, state: LiveState) -> None:
        self.registry.register(LiveCollector(state))
