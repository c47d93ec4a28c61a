"""The bounded request queue and its deadline-or-size batcher.

Requests are `Job`s; a batch is a list of `Slice`s, runs of one job's images, so a request
with `n` images counts `n` toward the batch size and may span batches when `n` exceeds it.
A batch takes the key (size, steps, guidance) of the oldest waiting job, so incompatible
requests never mix and none starves: whatever waits longest decides what runs next. The rule
for cutting, a `BatchPolicy`, is passed in like the clock, so the pipeline thread can apply a
lowered max batch without the queue holding a second copy of it. A job may carry a start-by
time (pull mode: its deadline); one none of whose images has started by then is dropped and
answered as each batch is cut, so it never starts late.

The queue is shared by the event loop (submit, cancel) and the one pipeline thread (take),
under one lock. The clock is an argument everywhere but in `take`, which blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("worker.batching")

@dataclass(frozen=True)
class BatchPolicy:
    """The rule for cutting a batch: once `max_batch_size` images of the oldest job's key wait,
    or once that job has waited `max_wait_s` seconds, whichever comes first.

    Set by `--max-batch-size` and `--max-wait-ms`; the engine applies a copy with a smaller
    `max_batch_size` after running out of memory.
    """

    max_batch_size: int = 8
    max_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1 (flag --max-batch-size), got {self.max_batch_size}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be at least 0 (flag --max-wait-ms), got {self.max_wait_s * 1000:g} ms")


@dataclass(frozen=True)
class BatchKey:
    """What images must share to run in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float


class QueueFull(Exception):
    """The queue has no room for the request's images."""

    def __init__(self, waiting_images: int, capacity_images: int) -> None:
        super().__init__(f"queue full: {waiting_images} of {capacity_images} images waiting")
        self.waiting_images = waiting_images


class QueueClosed(Exception):
    """The worker is draining and accepts no new work."""


@dataclass(eq=False)
class Job:
    """One accepted request: its images, their seeds and, once run, their pixels.

    Fields below `seeds` are written under the queue's lock or by the pipeline thread.
    `on_done` is called once, from the pipeline thread, when every image is in, the job failed,
    or it expired: `start_by` (the clock of `arrived_at`; None: never) passed before any of its
    images started, and it was dropped uncomputed.
    """

    key: BatchKey
    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    arrived_at: float
    on_done: Callable[[Job], None] = lambda job: None
    start_by: float | None = None
    next_image: int = 0  # images handed to batches so far
    started_at: float | None = None  # when its first image began computing
    images: list[Any] = field(default_factory=list)
    done_images: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    expired: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("a job needs at least one image")
        self.images = [None] * len(self.seeds)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def waiting_images(self) -> int:
        return self.n - self.next_image


@dataclass(frozen=True)
class Slice:
    """Images `start` to `stop` of one job."""

    job: Job
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Batch:
    key: BatchKey
    slices: tuple[Slice, ...]

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.slices)

    def prompts(self) -> list[str]:
        return [piece.job.prompt for piece in self.slices for _ in range(piece.size)]

    def negative_prompts(self) -> list[str | None]:
        return [piece.job.negative_prompt for piece in self.slices for _ in range(piece.size)]

    def seeds(self) -> list[int]:
        return [seed for piece in self.slices for seed in piece.job.seeds[piece.start:piece.stop]]

    def unfinished(self) -> Batch:
        """This batch less the slices of jobs already answered (a job fails whole when one image fails)."""
        return Batch(self.key, tuple(piece for piece in self.slices if not piece.job.finished))

    def split(self) -> tuple[Batch, Batch]:
        """Two batches of about half the images each, in order; needs at least two images."""
        half = self.size // 2
        first: list[Slice] = []
        second: list[Slice] = []
        taken = 0
        for piece in self.slices:
            room = half - taken
            if room >= piece.size:
                first.append(piece)
                taken += piece.size
            elif room > 0:
                first.append(Slice(piece.job, piece.start, piece.start + room))
                second.append(Slice(piece.job, piece.start + room, piece.stop))
                taken = half
            else:
                second.append(piece)
        return Batch(self.key, tuple(first)), Batch(self.key, tuple(second))


class BatchQueue:
    """Jobs waiting for the pipeline, bounded in images, handed out as batches."""

    def __init__(self, capacity_images: int) -> None:
        if capacity_images < 1:
            raise ValueError(f"capacity_images must be at least 1, got {capacity_images}")
        self.capacity_images = capacity_images
        self._waiting: deque[Job] = deque()  # jobs with images not yet handed out, oldest first
        self._waiting_images = 0
        self._closed = False
        self._changed = threading.Condition()

    # -- event loop side -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queues the job, or raises QueueClosed / QueueFull without queueing any of it."""
        with self._changed:
            if self._closed:
                raise QueueClosed("draining")
            if self._waiting_images + job.n > self.capacity_images:
                raise QueueFull(self._waiting_images, self.capacity_images)
            self._waiting.append(job)
            self._waiting_images += job.n
            self._changed.notify_all()

    def cancel(self, job: Job) -> int:
        """Drops the job's images that have not started; returns how many were dropped."""
        with self._changed:
            job.cancelled = True
            dropped = job.waiting_images
            if dropped:
                self._waiting.remove(job)
                self._waiting_images -= dropped
                job.next_image = job.n
                self._changed.notify_all()
            return dropped

    def close(self) -> None:
        """Refuses new jobs from now on; what waits is still handed out, without waiting to fill."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- read by metrics -------------------------------------------------------------------

    @property
    def waiting_images(self) -> int:
        return self._waiting_images

    @property
    def waiting_jobs(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- pipeline thread side --------------------------------------------------------------

    def poll(self, policy: BatchPolicy, now: float) -> Batch | float | None:
        """The next batch if one is due at `now`; else seconds until one may be; None when idle.

        A batch is due when `policy` says so (size reached or the oldest job waited long
        enough), or when the queue is closed (nothing more will come to fill it).
        """
        with self._changed:
            return self._poll_locked(policy, now)

    def take(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> Batch | None:
        """Blocks until a batch is due and returns it; returns None once closed and empty."""
        with self._changed:
            while True:
                due = self._poll_locked(policy, clock())
                if isinstance(due, Batch):
                    return due
                if due is None and self._closed:
                    return None
                self._changed.wait(timeout=due)

    def _poll_locked(self, policy: BatchPolicy, now: float) -> Batch | float | None:
        self._expire_locked(now)
        if not self._waiting:
            return None
        head = self._waiting[0]
        wait_s = head.arrived_at + policy.max_wait_s - now
        if wait_s > 0 and not self._closed and self._compatible_images(head.key) < policy.max_batch_size:
            return wait_s
        return self._cut_locked(head.key, policy.max_batch_size, now)

    def _expire_locked(self, now: float) -> None:
        """Drops and answers the jobs whose `start_by` passed before any of their images started.
        Checked as batches are cut, so no image of such a job ever starts after it."""
        for job in [job for job in self._waiting if job.start_by is not None and job.next_image == 0
                    and now > job.start_by]:
            self._waiting.remove(job)
            self._waiting_images -= job.n
            job.next_image = job.n
            job.expired = job.finished = True
            try:
                job.on_done(job)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the batcher
                log.exception("answering an expired job failed")

    def _compatible_images(self, key: BatchKey) -> int:
        return sum(job.waiting_images for job in self._waiting if job.key == key)

    def _cut_locked(self, key: BatchKey, max_images: int, now: float) -> Batch:
        slices: list[Slice] = []
        room = max_images
        for job in list(self._compatible(key)):
            if room == 0:
                break
            take = min(room, job.waiting_images)
            slices.append(Slice(job, job.next_image, job.next_image + take))
            if job.started_at is None:
                job.started_at = now
            job.next_image += take
            room -= take
            self._waiting_images -= take
            if job.waiting_images == 0:
                self._waiting.remove(job)
        return Batch(key, tuple(slices))

    def _compatible(self, key: BatchKey) -> Iterator[Job]:
        return (job for job in self._waiting if job.key == key)
