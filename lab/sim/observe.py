"""What every simulated policy sees of the fleet: the signals Prometheus would hold.

A scrape every second of the same series the worker and the exporter export; the GPU
utilization averaged over the window (`avg_over_time`), the p95 through the worker's own
latency buckets with `histogram_quantile`'s interpolation, the queue as an instant gauge.
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
        self._recent: deque[tuple[float, float]] = deque()  # (finished at, latency) inside the window
        self._p95_now: float | None = None  # _p95() of _recent as it stands, kept until _recent changes

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
            self._recent.append((request.finished_s, request.latency_s))
        self._seen = len(fleet.finished)
        while self._recent and self._recent[0][0] <= now - self.window_s:
            self._recent.popleft()
            changed = True
        if changed:
            self._p95_now = self._p95()
        signals = Signals(queue=float(fleet.in_flight()), ready_replicas=len(ready),
                          gpu_util_percent=sum(utils) / len(utils) if utils else None, p95_seconds=self._p95_now)
        return Observation(now, len(fleet.serving()), signals)

    def _p95(self) -> float | None:
        """histogram_quantile(0.95, ...) over the worker's latency buckets, as the scaler reads it."""
        if not self._recent:
            return None
        counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        for _, latency in self._recent:
            counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency)] += 1
        cumulative, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return histogram_quantile(0.95, cumulative)
