"""A fleet of batching GPU workers, simulated event by event, for replays and what-ifs.

Each replica is what `worker/` is: a bounded queue (in images) in front of one dynamic
batcher that closes a batch at `max_batch` images or `max_wait_s` after its oldest request,
with a batch's service time from a profile (by default the H100 table in docs/ARCHITECTURE.md),
scaled by the batch's steps. A new replica serves only after a start-up delay drawn from a
distribution (node, image and model load). A router sends each request to the least-loaded
ready replica; a full queue rejects it. A replica asked to go drains: it takes no new work
and leaves when its queue is empty.

With `pull` (the gateway and Redis Streams) the queue lives outside the workers instead:
requests wait in a shared backlog, even at zero replicas, and each ready replica pulls, oldest
first, one request at a time while it holds fewer than `LOOKAHEAD_BATCHES` max batches of images
(the batch running counts), as the pull-mode worker does: the next batch forms while one runs.
Nothing is rejected there (the gateway's bound is not modelled); a draining replica stops
pulling and finishes what it holds.

The clock is the simulation's own; nothing here sleeps or reads the wall clock.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from lab.sim.traces import Arrival
from worker.queue import LOOKAHEAD_BATCHES

# The H100 table of docs/ARCHITECTURE.md: 80GB, SD-1.5 shape, fp16, 512x512, 20 steps: batch -> (seconds per batch, NVML util %)
H100_SD15 = {1: (1.07, 27.0), 4: (1.18, 56.0), 8: (1.42, 78.0), 12: (1.85, 92.0), 16: (2.36, 96.0), 32: (4.55, 94.0)}


@dataclass(frozen=True)
class BatchProfile:
    """Seconds per batch and GPU utilization by batch size, at `reference_steps` steps."""

    table: tuple[tuple[int, float, float], ...] = tuple((b, s, u) for b, (s, u) in sorted(H100_SD15.items()))
    reference_steps: int = 20

    def _interpolate(self, images: int, column: int) -> float:
        sizes = [row[0] for row in self.table]
        if images <= sizes[0]:
            return self.table[0][column] * (images / sizes[0] if column == 1 and sizes[0] > 1 else 1.0)
        if images >= sizes[-1]:
            last = self.table[-1]
            # beyond the table: the last batch's throughput holds
            return last[column] * (images / last[0]) if column == 1 else last[column]
        index = bisect.bisect_left(sizes, images)
        low, high = self.table[index - 1], self.table[index]
        share = (images - low[0]) / (high[0] - low[0])
        return low[column] + share * (high[column] - low[column])

    @classmethod
    def from_file(cls, path) -> BatchProfile:
        """A profile from JSON: {"reference_steps": 20, "batches": [{"batch": 1, "seconds": 1.07,
        "gpu_util_percent": 27}, ...]} (what `bench/worker_throughput.py --profile-out` writes).
        Raises ValueError naming what is wrong."""
        with open(path) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not JSON: {error}") from None
        try:
            rows = tuple(sorted((int(b["batch"]), float(b["seconds"]), float(b.get("gpu_util_percent", 0.0)))
                                for b in data["batches"]))
            steps = int(data.get("reference_steps", 20))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: a profile needs batches of {{batch, seconds[, gpu_util_percent]}}: {error!r}") from None
        if not rows or steps < 1 or any(b < 1 or s <= 0 or not 0 <= u <= 100 for b, s, u in rows) \
                or len({b for b, _, _ in rows}) != len(rows):
            raise ValueError(f"{path}: batches must be distinct sizes >= 1 with seconds > 0 and utilization in 0..100")
        return cls(rows, steps)

    def to_json(self) -> dict:
        return {"reference_steps": self.reference_steps,
                "batches": [{"batch": b, "seconds": s, "gpu_util_percent": u} for b, s, u in self.table]}

    def seconds(self, images: int, steps: int) -> float:
        """A batch's service time; denoising dominates, so it grows with steps."""
        return self._interpolate(images, 1) * steps / self.reference_steps

    def utilization_percent(self, images: int) -> float:
        return self._interpolate(images, 2)


@dataclass(frozen=True)
class StartupDelay:
    """Lognormal start-up delay (scheduling, image pull, model load), by median and p99."""

    median_s: float = 23.0
    p99_s: float = 52.0  # a large production SD fleet's reported load times

    def draw(self, rng: random.Random) -> float:
        if self.p99_s <= self.median_s:
            return self.median_s
        sigma = math.log(self.p99_s / self.median_s) / 2.326  # z of the 99th percentile
        return rng.lognormvariate(math.log(self.median_s), sigma)


@dataclass(frozen=True)
class FleetSpec:
    max_batch: int = 12
    max_wait_s: float = 0.05
    max_queue_images: int = 96  # a worker's own queue; unused with `pull`
    profile: BatchProfile = field(default_factory=BatchProfile)
    startup: StartupDelay = field(default_factory=StartupDelay)
    pull: bool = False  # workers pull from a shared queue (the gateway's stream) instead of a router pushing


@dataclass
class Request:
    arrival: Arrival
    replica: int = -1
    started_s: float | None = None
    finished_s: float | None = None
    rejected: bool = False

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival.t_s


@dataclass
class Replica:
    id: int
    created_s: float
    ready_s: float
    queue: deque = field(default_factory=deque)
    waiting_images: int = 0
    running: list = field(default_factory=list)
    busy_until: float = 0.0
    batch_images: int = 0
    busy_s: float = 0.0  # seconds computing, for the duty cycle
    util_integral: float = 0.0  # percent x seconds, the running batch counted in full
    batch_util_percent: float = 0.0  # the running batch's utilization
    draining: bool = False
    gone_s: float | None = None
    pending_deadline: float | None = None

    def util_integral_at(self, now: float) -> float:
        """Percent x seconds up to `now`, as NVML's samples would have accumulated them."""
        if self.running and self.busy_until > now:
            return self.util_integral - self.batch_util_percent * (self.busy_until - now)
        return self.util_integral

    def load(self) -> int:
        return self.waiting_images + self.batch_images

    def in_flight(self) -> int:
        return len(self.queue) + len(self.running)


class Fleet:
    """Replicas, router and batchers; advance it with `run_until(t)`."""

    def __init__(self, spec: FleetSpec, seed: int = 0) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.now = 0.0
        self.replicas: list[Replica] = []  # every replica ever started, by id
        self._live: list[Replica] = []  # those not gone yet: what every query scans
        self.requests: list[Request] = []
        self.finished: list[Request] = []  # in finishing order, for window queries
        self.backlog: deque[Request] = deque()  # with `pull`: the stream's entries no worker holds yet
        self.cold_starts = 0  # scale-ups from zero replicas that had to wait a start-up delay
        self._events: list[tuple[float, int, str, int]] = []  # (time, order, kind, replica id)
        self._order = 0
        self._next_id = 0

    # -- scaling ----------------------------------------------------------------------------

    def serving(self) -> list[Replica]:
        return [r for r in self._live if not r.draining]

    def ready(self) -> list[Replica]:
        return [r for r in self.serving() if r.ready_s <= self.now]

    @property
    def desired(self) -> int:
        """Replicas asked for and not draining, ready or starting (a Deployment's spec.replicas)."""
        return len(self.serving())

    def ready_count(self) -> int:
        return len(self.ready())

    def scale_to(self, replicas: int, startup_s: float | None = None) -> None:
        """Adds replicas (each ready after a drawn start-up delay) or drains the newest ones."""
        serving = self.serving()
        if not serving and replicas > 0 and startup_s != 0:
            self.cold_starts += 1
        for _ in range(replicas - len(serving)):
            delay = self.spec.startup.draw(self.rng) if startup_s is None else startup_s
            replica = Replica(self._next_id, self.now, self.now + delay)
            self._next_id += 1
            self.replicas.append(replica)
            self._live.append(replica)
            self._push(replica.ready_s, "ready", replica.id)
        for replica in sorted(serving, key=lambda r: (r.created_s, r.id), reverse=True)[: max(0, len(serving) - replicas)]:
            replica.draining = True
            self._maybe_leave(replica)

    # -- traffic ----------------------------------------------------------------------------

    def offer(self, arrivals: Iterable[Arrival]) -> None:
        for arrival in arrivals:
            self._push(arrival.t_s, "arrival", len(self.requests))
            self.requests.append(Request(arrival))

    def run_until(self, t: float) -> None:
        while self._events and self._events[0][0] <= t:
            when, _, kind, index = heapq.heappop(self._events)
            self._advance(when)
            if kind == "arrival":
                self._route(self.requests[index])
            elif kind in ("ready", "deadline"):
                self._maybe_start(self.replicas[index])
            elif kind == "done":
                self._finish(self.replicas[index])
            if self.backlog:
                self._deliver()
        self._advance(t)

    def _push(self, when: float, kind: str, index: int) -> None:
        self._order += 1
        heapq.heappush(self._events, (when, self._order, kind, index))

    def _advance(self, t: float) -> None:
        self.now = max(self.now, t)

    def _route(self, request: Request) -> None:
        if self.spec.pull:
            self.backlog.append(request)
            return
        ready = self.ready()
        if not ready:  # nothing serves yet: the request waits on the least-loaded starting replica
            ready = self.serving()
        if not ready:
            request.rejected = True
            return
        replica = min(ready, key=lambda r: (r.load(), r.id))
        if replica.waiting_images + request.arrival.images > self.spec.max_queue_images:
            request.rejected = True
            return
        self._hand(replica, request)
        self._maybe_start(replica)

    def _hand(self, replica: Replica, request: Request) -> None:
        request.replica = replica.id
        replica.queue.append(request)
        replica.waiting_images += request.arrival.images

    def _deliver(self) -> None:
        """Pull mode: the least-loaded ready replicas read from the backlog, oldest first, one
        request at a time while the images in hand, the batch running included, are fewer than
        `LOOKAHEAD_BATCHES` max batches, as the pull-mode worker does (it learns a job's images
        only once it has read the entry, so the last one read may take it past). So the next
        batch is in hand when one finishes: a pull takes no time here, but in the worker one
        made between batches would leave the GPU idle."""
        limit = LOOKAHEAD_BATCHES * self.spec.max_batch
        for replica in sorted(self.ready(), key=lambda r: (r.load(), r.id)):
            while self.backlog and replica.load() < limit:
                self._hand(replica, self.backlog.popleft())
            self._maybe_start(replica)
            if not self.backlog:
                return

    def _maybe_start(self, replica: Replica) -> None:
        if replica.running or not replica.queue or replica.ready_s > self.now or replica.gone_s is not None:
            return
        head = replica.queue[0]
        steps = head.arrival.steps
        compatible = sum(r.arrival.images for r in replica.queue if r.arrival.steps == steps)
        due = head.arrival.t_s + self.spec.max_wait_s
        if compatible < self.spec.max_batch and self.now < due and not replica.draining:
            if replica.pending_deadline != due:
                replica.pending_deadline = due
                self._push(due, "deadline", replica.id)
            return
        replica.pending_deadline = None
        # Oldest first, same steps; a request's images stay together (one larger than the
        # max batch runs alone, where the worker would split it across batches).
        batch, images = [], 0
        for request in replica.queue:
            if request.arrival.steps != steps:
                continue
            if batch and images + request.arrival.images > self.spec.max_batch:
                break
            batch.append(request)
            images += request.arrival.images
        for request in batch:
            replica.queue.remove(request)
            request.started_s = self.now
        replica.waiting_images -= images
        seconds = self.spec.profile.seconds(images, steps)
        replica.running = batch
        replica.batch_images = images
        replica.busy_until = self.now + seconds
        replica.busy_s += seconds
        replica.batch_util_percent = self.spec.profile.utilization_percent(images)
        replica.util_integral += seconds * replica.batch_util_percent
        self._push(replica.busy_until, "done", replica.id)

    def _finish(self, replica: Replica) -> None:
        for request in replica.running:
            request.finished_s = self.now
            self.finished.append(request)
        replica.running = []
        replica.batch_images = 0
        self._maybe_start(replica)
        self._maybe_leave(replica)

    def _maybe_leave(self, replica: Replica) -> None:
        if replica.draining and not replica.queue and not replica.running and replica.gone_s is None:
            replica.gone_s = self.now
            self._live.remove(replica)

    # -- what the worker and exporter would report ------------------------------------------

    def in_flight(self) -> int:
        """Requests accepted and not answered: in the workers, and with `pull` in the backlog too
        (the stream's length, undelivered plus pending, which the scaler reads even at zero)."""
        return len(self.backlog) + sum(r.in_flight() for r in self._live)

    def gpu_hours(self, until: float) -> float:
        """Time every replica held a GPU, start-up included, in hours."""
        return sum(((r.gone_s if r.gone_s is not None else until) - r.created_s) for r in self.replicas) / 3600

    def hours_at_zero(self, until: float) -> float:
        """Time from 0 to `until` in which no replica held a GPU, in hours."""
        covered, reach = 0.0, 0.0
        for start, end in sorted((r.created_s, r.gone_s if r.gone_s is not None else until) for r in self.replicas):
            start, end = max(start, reach), min(end, until)
            if end > start:
                covered += end - start
                reach = end
        return (until - covered) / 3600
