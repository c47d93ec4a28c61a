"""The gateway's Prometheus metrics, registered into a registry passed in (never at import)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from contract.names import (
    API_LABEL,
    GATEWAY_ACCEPTED,
    GATEWAY_BACKLOG,
    GATEWAY_LATENCY,
    GATEWAY_QUEUE_WAIT,
    GATEWAY_REJECTED,
    GATEWAY_REQUESTED_IMAGE_STEPS,
    LATENCY_BUCKETS_S,
    REJECT_REASON_LABEL,
    REJECT_REASONS,
)

from .jobs import Job, QueueUnavailable

SYNC, ASYNC = "sync", "async"  # API_LABEL's values: /v1/images/generations, /v1/jobs
APIS = (SYNC, ASYNC)
INVALID, BACKLOG_FULL, REDIS_UNAVAILABLE, UNAUTHORIZED = REJECT_REASONS
BACKLOG_REFRESH_S = 1.0  # scrapes closer together than this share one XLEN
_REMEMBERED_JOBS = 10_000  # jobs whose queue wait was observed, so a polled job counts once


class _Backlog:
    """GATEWAY_BACKLOG from the last XLEN; no series while the last read failed (a backlog
    nobody could read is unknown, not 0)."""

    def __init__(self) -> None:
        self.value: int | None = None

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(GATEWAY_BACKLOG, "Jobs in the stream (waiting or in a worker's hands) when last read")

    def collect(self) -> Iterator[Metric]:
        if self.value is not None:
            yield GaugeMetricFamily(GATEWAY_BACKLOG, "Jobs in the stream (waiting or in a worker's hands) when last read",
                                    value=self.value)


class GatewayMetrics:
    """Accepted and rejected counts, the demand in image-steps, queue wait and latency histograms,
    the backlog gauge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.accepted = Counter(GATEWAY_ACCEPTED, "Jobs enqueued (an idempotent replay is not a new job)",
                                [API_LABEL], registry=registry)
        self.rejected = Counter(GATEWAY_REJECTED, "Requests refused, nothing enqueued", [REJECT_REASON_LABEL],
                                registry=registry)
        self.requested_image_steps = Counter(
            GATEWAY_REQUESTED_IMAGE_STEPS,
            "Image-steps (images x denoising steps) of the jobs enqueued, counted when enqueued: the demand",
            registry=registry)
        for api in APIS:
            self.accepted.labels(api)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.queue_wait = Histogram(GATEWAY_QUEUE_WAIT, "Enqueue to a worker's start, of jobs the gateway saw end",
                                    buckets=LATENCY_BUCKETS_S, registry=registry)
        self.latency = Histogram(GATEWAY_LATENCY, "Arrival to answer of accepted synchronous requests",
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self._backlog = _Backlog()
        registry.register(self._backlog)
        self._backlog_read_at: float | None = None
        self._observed: OrderedDict[str, None] = OrderedDict()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def accept(self, api: str, images: int, steps: int) -> None:
        """A new job enqueued through `api`: `images` images at `steps` denoising steps each."""
        self.accepted.labels(api).inc()
        self.requested_image_steps.inc(images * steps)

    def job_ended(self, job: Job) -> None:
        """Observes an ended job's queue wait, once per job (a job polled many times, or
        waited for by several clients, counts once); jobs that never started have none."""
        if not job.ended or job.started_at is None or job.id in self._observed:
            return
        self._observed[job.id] = None
        if len(self._observed) > _REMEMBERED_JOBS:
            self._observed.popitem(last=False)
        self.queue_wait.observe(max(0.0, job.started_at - job.created_at))

    async def refresh_backlog(self, read: Callable[[], Awaitable[int]], now_s: float) -> None:
        """Re-reads the backlog unless it was read less than BACKLOG_REFRESH_S before `now_s`
        (monotonic seconds); a failed read leaves the gauge absent until one succeeds."""
        if self._backlog_read_at is not None and now_s - self._backlog_read_at < BACKLOG_REFRESH_S:
            return
        self._backlog_read_at = now_s
        try:
            self._backlog.value = await read()
        except QueueUnavailable:
            self._backlog.value = None
