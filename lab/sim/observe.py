"""What every simulated policy sees of the fleet: the signals Prometheus would hold.

A scrape every second of the same series the worker and the exporter export; the GPU
utilization averaged over the window (`avg_over_time`), the p95 through the worker's own
latency buckets with `histogram_quantile`'s interpolation, the queue as an instant gauge.
The capacity signal's inputs as the workers export them: demand and arrivals as rates over the
window of what arrived (image-steps, requests; counted on arrival, as the worker and the gateway
do), each ready replica's capacity as its profile's image-steps per second at the max batch
(what the worker's warm-up probe measures), and its start-up delay; capacity and start-up are
absent at zero ready replicas, as their series are.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

from adapter.directscrape import histogram_quantile
from adapter.policy import Signals
from contract.names import LATENCY_BUCKETS_S
from lab.sim.fleet import Fleet


@dataclass(frozen=True)
class Observation:
    """The fleet at `t`: the scaler's signals, and the replicas asked for (the target's spec)."""

    t: float
    serving: int  # replicas asked for and not draining
    signals: Signals  # queue over every pod still up; GPU mean over ready replicas; p95 over the window


class Observer:
    """Samples the fleet every scrape and answers window queries as PromQL would."""

    def __init__(self, fleet: Fleet, window_s: float) -> None:
        self.fleet = fleet
        self.window_s = window_s
        self._util: deque[tuple[float, dict[int, float]]] = deque()  # (t, replica -> util integral)
        self._seen = 0  # requests of fleet.finished already taken into the window
        self._recent: deque[tuple[float, int]] = deque()  # (finished at, latency bucket) inside the window
        self._counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # requests of _recent per latency bucket
        self._p95_now: float | None = None  # _p95() of _recent as it stands, kept until _recent changes
        self._arrived = 0  # requests of fleet.requests already taken into the demand window
        self._demand: deque[tuple[float, float]] = deque()  # (arrived at, image-steps) inside the window
        self._demand_work = 0.0  # image-steps inside the window
        spec = fleet.spec
        steps = spec.profile.reference_steps
        self._capacity = spec.max_batch * steps / spec.profile.seconds(spec.max_batch, steps)

    def observe(self, now: float) -> Observation:
        fleet = self.fleet
        ready = fleet.ready()
        integrals = {r.id: r.util_integral_at(now) for r in ready}
        self._util.append((now, integrals))
        while self._util and self._util[0][0] < now - self.window_s:
            self._util.popleft()
        oldest_t, oldest = self._util[0]
        utils = [(integrals[i] - oldest.get(i, integrals[i])) / (now - oldest_t)
                 for i in integrals if now > oldest_t and i in oldest]
        changed = len(fleet.finished) > self._seen
        for request in fleet.finished[self._seen:]:
            self._take(request.finished_s, request.latency_s)
        self._seen = len(fleet.finished)
        while self._recent and self._recent[0][0] <= now - self.window_s:
            self._counts[self._recent.popleft()[1]] -= 1
            changed = True
        if changed:
            self._p95_now = self._p95()
        requests = fleet.requests
        while self._arrived < len(requests) and requests[self._arrived].arrival.t_s <= now:
            arrival = requests[self._arrived].arrival
            work = arrival.images * arrival.steps
            self._demand.append((arrival.t_s, work))
            self._demand_work += work
            self._arrived += 1
        while self._demand and self._demand[0][0] <= now - self.window_s:
            self._demand_work -= self._demand.popleft()[1]
        span = min(self.window_s, now) or self.window_s  # a rate over the part of the window that exists
        # a replica that was there from the start exports the start-up it had: the spec's median
        startup = [r.ready_s - r.created_s or fleet.spec.startup.median_s for r in ready]
        signals = Signals(queue=float(fleet.in_flight()), ready_replicas=len(ready),
                          gpu_util_percent=sum(utils) / len(utils) if utils else None, p95_seconds=self._p95_now,
                          demand=max(0.0, self._demand_work) / span, arrivals=len(self._demand) / span,
                          capacity=self._capacity if ready else None,
                          startup_s=sum(startup) / len(startup) if startup else None)
        return Observation(now, len(fleet.serving()), signals)

    def _take(self, finished_s: float, latency_s: float) -> None:
        """Counts a request that finished at `finished_s` into its latency bucket, as the worker's
        histogram does."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)
        self._recent.append((finished_s, bucket))
        self._counts[bucket] += 1

    def _p95(self) -> float | None:
        """histogram_quantile(0.95, ...) over the worker's latency buckets, as the scaler reads it."""
        if not self._recent:
            return None
        cumulative, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), self._counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return histogram_quantile(0.95, cumulative)
