"""The worker's Prometheus metrics: the load signals the scaler believes.

Every name and bucket comes from `contract.names`, which the scaler's queries, the rules and
the dashboards read too. Counters and histograms are updated where things happen; the gauges
(queue depth, in-flight, readiness, effective max batch, capacity, start-up) and the busy-time
counter are read from live state at scrape time by `LiveCollector`, so a scrape in the middle of
a long batch already counts the time that batch has computed so far. A value not measured yet
(the capacity before any batch, the start-up before ready) has no sample at all: absent, not 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from contract import names


@dataclass(frozen=True)
class LiveState:
    """What the collector reads at scrape time; each callable must be cheap and thread-safe."""

    queue_images: Callable[[], int]
    requests_in_flight: Callable[[], int]
    busy_seconds: Callable[[], float]
    max_batch_size: Callable[[], int]
    ready: Callable[[], bool]
    capacity_image_steps_per_second: Callable[[], float | None]  # at the max batch in force; None: not measured
    throughput_by_batch_size: Callable[[], Mapping[int, float]]  # image-steps per second, by images per batch
    startup_seconds: Callable[[], float | None]  # process start to ready; None: not ready yet, or unknown
    model_load_seconds: Callable[[], float | None]  # imports and weights onto the device; None: not loaded yet
    warm_up_seconds: Callable[[], float | None]  # model loaded to ready; None: not ready yet
    compiled_buckets: Callable[[], int] = lambda: 0  # batch sizes compiled and captured; 0: eager
    eager_batches: Callable[[], int] = lambda: 0  # batches a compiled runner ran eagerly (uncovered shapes)
    encoder_restarts: Callable[[], int] = lambda: 0  # PNG encoder process pools replaced after breaking


class LiveCollector:
    """Builds the live gauges and the busy-time counter afresh on every scrape."""

    def __init__(self, state: LiveState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state
        yield GaugeMetricFamily(names.QUEUE_DEPTH, "Images waiting for the pipeline", value=state.queue_images())
        yield GaugeMetricFamily(
            names.REQUESTS_IN_FLIGHT, "Requests accepted and not yet answered (waiting + running)",
            value=state.requests_in_flight(),
        )
        yield CounterMetricFamily(
            names.BUSY_SECONDS, "Seconds the pipeline has spent computing; its rate is the duty cycle",
            value=state.busy_seconds(),
        )
        yield GaugeMetricFamily(
            names.MAX_BATCH_SIZE, "Images per batch the batcher allows now (lowered after an error that depends on batch size)",
            value=state.max_batch_size(),
        )
        yield GaugeMetricFamily(
            names.READY, "1 when the model is loaded, the worker is not draining and (pull mode) its queue answers",
            value=float(state.ready()),
        )
        capacity = state.capacity_image_steps_per_second()
        if capacity is not None:
            yield GaugeMetricFamily(
                names.CAPACITY_IMAGE_STEPS,
                "Image-steps (images x denoising steps) per second this replica serves at its max batch size, "
                "measured (moving mean; the best smaller batch until one at the max ran)",
                value=capacity,
            )
        profile = GaugeMetricFamily(
            names.BATCH_THROUGHPUT, "Image-steps per second measured at each batch size (moving mean)",
            labels=(names.BATCH_SIZE_LABEL,),
        )
        for size, rate in sorted(state.throughput_by_batch_size().items()):
            profile.add_metric((str(size),), rate)
        yield profile
        yield GaugeMetricFamily(
            names.COMPILED_BUCKETS, "Batch sizes compiled with CUDA graphs and captured (--compile); 0 when the "
            "pipeline runs eagerly, --compile auto's fallback included", value=state.compiled_buckets(),
        )
        yield CounterMetricFamily(
            names.EAGER_BATCHES, "Batches a compiled worker ran eagerly: another image size, guidance off, more "
            "images than the largest bucket, or a shape that would recompile", value=state.eager_batches(),
        )
        yield CounterMetricFamily(
            names.ENCODER_RESTARTS, "PNG encoder process pools replaced after one broke (their answers were encoded "
            "in a thread)", value=state.encoder_restarts(),
        )
        for name, text, value in (
            (names.STARTUP_SECONDS, "Seconds from process start to ready: imports, model load, warm-up and capacity "
             "probe", state.startup_seconds()),
            (names.MODEL_LOAD, "Seconds the model took to load onto its device, imports included",
             state.model_load_seconds()),
            (names.WARM_UP_SECONDS, "Seconds from the model loaded to ready: warm-up calls, compiling and capturing "
             "every batch bucket (--compile), the capacity probe", state.warm_up_seconds()),
        ):
            if value is not None:  # not measured yet: absent, not 0
                yield GaugeMetricFamily(name, text, value=value)


class WorkerMetrics:
    """The worker's event metrics, registered into the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_duration = Histogram(
            names.REQUEST_DURATION,
            "Seconds from accepting a request to its response (accepted requests of every outcome)",
            buckets=names.LATENCY_BUCKETS_S, registry=registry,
        )
        self.queue_wait = Histogram(
            names.QUEUE_WAIT, "Seconds a request waited before its first image started",
            buckets=names.LATENCY_BUCKETS_S, registry=registry,
        )
        self.batch_size = Histogram(
            names.BATCH_SIZE, "Images per pipeline call", buckets=names.BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.requests = Counter(
            names.REQUESTS, "Requests by outcome", labelnames=(names.OUTCOME_LABEL,), registry=registry,
        )
        for outcome in names.OUTCOMES:
            self.requests.labels(outcome)
        self.images = Counter(names.IMAGES, "Images the pipeline generated", registry=registry)
        self.requested_image_steps = Counter(
            names.REQUESTED_IMAGE_STEPS,
            "Image-steps (images x denoising steps) of the requests received, accepted or refused for a full "
            "queue, counted on arrival (pull mode: of the jobs pulled); invalid requests are not counted",
            registry=registry,
        )
        self.batch_splits = Counter(
            names.BATCH_SPLITS, "Failed batches of more than one image split in two, each half retried",
            registry=registry,
        )
        self.isolated_failures = Counter(
            names.ISOLATED_FAILURES,
            "Requests failed by an image that raised alone, after the others of its batch were retried",
            registry=registry,
        )
        self.queue_jobs = Counter(
            names.QUEUE_JOBS, "Jobs taken off the Redis stream and ended by this worker, by outcome (pull mode)",
            labelnames=(names.JOB_OUTCOME_LABEL,), registry=registry,
        )
        for outcome in names.JOB_OUTCOMES:
            self.queue_jobs.labels(outcome)
        self.queue_reclaimed = Counter(
            names.QUEUE_RECLAIMED, "Jobs taken over from a consumer that left them pending past --claim-idle",
            registry=registry,
        )
        self.unauthorized = Counter(
            names.HTTP_UNAUTHORIZED, "HTTP requests refused with 401: no API key, or not one of --api-key-file's; "
            "not in the requests counter, so refused clients never count as arrivals", registry=registry,
        )
        self.queue_in_hand = Gauge(
            names.QUEUE_IN_HAND, "Jobs pulled off the Redis stream and not yet acknowledged (0 in direct mode)",
            registry=registry,
        )

    def watch(self, state: LiveState) -> None:
        self.registry.register(LiveCollector(state))
