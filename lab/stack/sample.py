"""What the local stack shows each second and records at the end, read the way the scaler reads it:
Prometheus through the scaler's own client and built-in queries, or, without Prometheus, the
signals the scaler itself scraped."""

from __future__ import annotations

import math

from adapter.policy import Signals
from adapter.prometheus import PrometheusClient, QueryError
from adapter.promql import builtin_queries
from adapter.server import ScalerServer
from contract import names
from lab.stack.discovery import SELECTOR
from lab.stack.workers import WorkerFleet
from lab.timeline import TimelinePoint

WINDOW = "10s"


class Sampler:
    """One timeline point a call; `prometheus_url` None reads the scaler's own last snapshot, and
    `queue_from_scaler` takes the queue from that snapshot too (a job stream's backlog, which
    the scaler reads from Redis and Prometheus does not have)."""

    def __init__(self, scaler: ScalerServer, prometheus_url: str | None, queue_from_scaler: bool = False) -> None:
        self._scaler = scaler
        self._url = prometheus_url
        self._queue_from_scaler = queue_from_scaler
        self._client = PrometheusClient() if prometheus_url else None
        self._queries = builtin_queries(SELECTOR, WINDOW)

    async def value(self, promql: str) -> float | None:
        """An instant query's single value; None when it fails or is empty (the view shows '-')."""
        try:
            samples = await self._client.query(self._url, promql, 2.0)
        except QueryError:
            return None
        return samples[0].value if samples else None

    async def point(self, t: float, offered_rps: float, fleet: WorkerFleet) -> TimelinePoint:
        snapshot = None
        for registered in self._scaler.registry.targets():
            snapshot = registered.snapshot or snapshot
        decision = snapshot.decision if snapshot else None
        queue = p95 = busy = None
        if self._client is not None:
            queue = await self.value(self._queries.queue)
            p95 = await self.value(self._queries.latency)
            busy = await self.value(f"avg(rate({names.BUSY_SECONDS}_total{{{SELECTOR}}}[{WINDOW}]))")
        elif snapshot is not None:  # what the scaler itself read from the workers
            queue, p95 = snapshot.signals.queue, snapshot.signals.p95_seconds
        if self._queue_from_scaler:
            queue = snapshot.signals.queue if snapshot is not None else None
        signals = Signals(queue=math.nan if queue is None else queue, ready_replicas=fleet.ready_count(), p95_seconds=p95)
        return TimelinePoint(t, fleet.desired, offered_rps, signals, busy, decision)

    async def batches(self, span_s: float) -> dict[str, float] | None:
        """The workers' busy seconds, batches and images over the run, as Prometheus counted them."""
        if self._client is None:
            return None
        span = f"{int(span_s)}s"
        sums = {name: await self.value(f"sum(increase({metric}{{{SELECTOR}}}[{span}]))")
                for name, metric in (("busy_seconds", f"{names.BUSY_SECONDS}_total"),
                                     ("batches", f"{names.BATCH_SIZE}_count"), ("images", f"{names.BATCH_SIZE}_sum"))}
        return sums if all(v is not None for v in sums.values()) else None

    async def exported(self, span_s: float) -> dict | None:
        """What the workers exported of their capacity over the run, as Prometheus last saw each
        worker's series: image-steps per second by batch size (the mean over the workers of each
        one's last value) and each worker's start-up seconds. None without Prometheus or before
        any batch was measured."""
        if self._client is None:
            return None
        span = f"{int(span_s)}s"
        try:
            throughput = await self._client.query(self._url, f"avg by ({names.BATCH_SIZE_LABEL}) (last_over_time("
                                                  f"{names.BATCH_THROUGHPUT}{{{SELECTOR}}}[{span}]))", 5.0)
            startup = await self._client.query(
                self._url, f"last_over_time({names.STARTUP_SECONDS}{{{SELECTOR}}}[{span}])", 5.0)
        except QueryError:
            return None
        profile = sorted((int(s.labels[names.BATCH_SIZE_LABEL]), s.value) for s in throughput
                         if names.BATCH_SIZE_LABEL in s.labels and s.value > 0)
        if not profile:
            return None
        return {"image_steps_per_second": [{"batch": b, "value": v} for b, v in profile],
                "startup_seconds": sorted(s.value for s in startup)}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def view_header() -> str:
    return (f"{'t':>5} {'req/s':>6} {'want':>4} {'ready':>5} {'queue':>6} {'p95 s':>6} {'busy':>5}  "
            f"{'q/g/l/c propose':>15}  composite -> served")


def view_line(point: TimelinePoint) -> str:
    """One line of the live view: replicas, signals, each signal's proposal, composite and value served."""
    def number(value: float | None, width: int, digits: int = 1) -> str:
        return f"{value:{width}.{digits}f}" if value is not None and not math.isnan(value) else "-".rjust(width)

    decision = point.decision
    proposals = "/".join(f"{decision.proposals[s]:.1f}" if decision and s in decision.proposals else "-"
                         for s in names.SIGNALS)
    composite = f"{number(decision.composite, 4)} -> {number(decision.value, 3, 0)}" if decision else "-"
    signals = point.signals
    return (f"{point.t:5.0f} {point.arrivals_per_s:6.1f} {point.desired:4d} {signals.ready_replicas:5d} "
            f"{number(signals.queue, 6)} {number(signals.p95_seconds, 6, 2)} {number(point.busy, 5, 2)}  "
            f"{proposals:>15}  {composite}")
