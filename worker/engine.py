"""The one thread that owns the pipeline: takes batches from the queue, runs them, answers jobs.

Failure isolation lives here, the same for every error. A failed batch of more than one image
is bisected and its halves retried, down to single images, so a request fails only with an
error that its own image raises alone. An error that the smaller batches do not raise depends
on the batch size: the effective max batch is lowered to the largest batch that ran, so full
batches do not fail again. Out-of-memory is known to depend on size, so it lowers the max batch
at once, before the retry. Bisection calls the pipeline at most 2n - 1 times for n images, and a
one-image batch is never retried.

A lowered max batch is probed back up: a transient error (another process's memory on a shared
GPU, a driver hiccup) must not cost throughput for the life of the pod. After `probe_after`
full batches at the lowered size, the max batch doubles (up to the configured one); if the
error returns at the probed size it is lowered again and the wait before the next probe doubles,
so a size that always fails costs one failed call per 100, 200, 400, ... full batches.

Every call that produces images is timed, as the busy-seconds counter times it, into a
`ThroughputProfile` (worker/throughput.py): the capacity this replica exports. Before serving,
`probe_capacity` measures one batch at the max batch size, so the capacity exists at readiness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .batching import Batch, BatchKey, BatchPolicy, BatchQueue, Job
from .metrics import WorkerMetrics
from .throughput import ThroughputProfile

log = logging.getLogger("worker.engine")


class ImageRunner(Protocol):
    """The pipeline boundary: one call per batch, one image (HxWx3 uint8 array) per seed."""

    def generate(
        self, key: BatchKey, prompts: list[str], negative_prompts: list[str | None], seeds: list[int]
    ) -> Sequence[Any]: ...

    def is_out_of_memory(self, error: BaseException) -> bool: ...

    def release_memory(self) -> None: ...


class BatchFailed(Exception):
    """A job's image raised in a batch of its own; the message is the pipeline's error."""


@dataclass(frozen=True)
class Outcome:
    """What running a batch, retries included, came to."""

    largest_ok: int = 0  # images in the largest pipeline call that produced images
    all_ok: bool = True  # whether every image of it was generated

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(max(self.largest_ok, other.largest_ok), self.all_ok and other.all_ok)


class Engine:
    """Runs batches, cut by `batching`, on a dedicated thread until the queue is closed and empty."""

    def __init__(
        self,
        queue: BatchQueue,
        runner: ImageRunner,
        batching: BatchPolicy,
        metrics: WorkerMetrics,
        clock: Callable[[], float] = time.monotonic,
        probe_after: int = 100,
    ) -> None:
        """`probe_after`: full batches at a lowered max batch before it is tried twice as large."""
        if probe_after < 1:
            raise ValueError(f"probe_after must be at least 1 batch, not {probe_after}")
        self.queue = queue
        self.runner = runner
        # The policy in force: the configured one until an error that depends on batch size
        # replaces it with a smaller max batch; probed back up towards `_configured_max`.
        self.batching = batching
        self._configured_max = batching.max_batch_size
        self._probe_after = probe_after
        self._full_since_lowered = 0  # full batches run at the lowered max batch
        self._probing = False  # the max batch in force was raised by a probe that has not yet run full
        self.metrics = metrics
        self.clock = clock
        self._busy_total_s = 0.0
        self._busy_since: float | None = None
        self._busy_lock = threading.Lock()
        self._images_per_s: float | None = None  # smoothed throughput, for Retry-After
        self.throughput = ThroughputProfile()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="pipeline", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> bool:
        """Waits for the loop to end; returns whether it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    def run_forever(self) -> None:
        while (batch := self.queue.take(self.batching, self.clock)) is not None:
            self.run_batch(batch)

    def busy_seconds(self) -> float:
        with self._busy_lock:
            running = self.clock() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy_total_s + running

    def images_per_second(self) -> float | None:
        return self._images_per_s

    def capacity_image_steps_per_second(self) -> float | None:
        """Image-steps per second at the max batch in force, measured; None before any batch
        (see `ThroughputProfile.capacity`)."""
        return self.throughput.capacity(self.max_batch_size)

    def probe_capacity(self, key: BatchKey) -> int:
        """Runs one batch of `max_batch_size` images of `key` before serving and records its
        throughput, timed as a served batch is; no served-work metric (images, batch sizes,
        busy seconds) moves. Call it before `start`, on the thread that will not run batches.

        Out of memory halves the batch and lowers the max batch in force, as a served batch's
        out-of-memory does (and it is probed back up the same way), then tries again. Returns
        the batch size that ran, or 0 when even one image ran out of memory: the worker serves
        without a capacity until a batch runs. Any other error propagates (a model that cannot
        run a batch should not turn ready).
        """
        size = self.max_batch_size
        while True:
            start = self.clock()
            try:
                images = self.runner.generate(key, ["capacity probe"] * size, [None] * size, list(range(size)))
            except Exception as error:
                if not self.runner.is_out_of_memory(error):
                    raise
                self.runner.release_memory()
                if size == 1:
                    log.error("capacity probe: out of memory at batch size 1 (%s); serving without a measured "
                              "capacity until a batch runs", error)
                    return 0
                self._lower_max_batch(size // 2, f"capacity probe: out of memory at batch size {size}")
                size //= 2
                continue
            seconds = self.clock() - start
            if len(images) != size:
                raise RuntimeError(f"pipeline returned {len(images)} images for a capacity probe of {size}")
            self.throughput.record(size, size * key.steps, seconds)
            log.info("capacity probe: %d images x %d steps in %.3f s: %.1f image-steps/s",
                     size, key.steps, seconds, size * key.steps / seconds if seconds > 0 else float("nan"))
            return size

    def run_batch(self, batch: Batch) -> None:
        """Runs a batch as the queue cut it; each request's wait ends when its first image starts."""
        start = self.clock()
        for piece in batch.slices:
            if piece.start == 0:
                self.metrics.queue_wait.observe(start - piece.job.arrived_at)
        self._execute(batch)

    def _execute(self, batch: Batch, retry: bool = False) -> Outcome:
        batch = batch.unfinished()  # a retry skips the images of a job that has failed meanwhile
        if batch.size == 0:
            return Outcome()
        start = self.clock()
        with self._busy_lock:
            self._busy_since = start
        try:
            images = self.runner.generate(batch.key, batch.prompts(), batch.negative_prompts(), batch.seeds())
            if len(images) != batch.size:
                raise RuntimeError(f"pipeline returned {len(images)} images for a batch of {batch.size}")
        except Exception as error:  # noqa: BLE001 - every failure must answer its jobs
            self._stop_busy()
            if batch.size > 1:
                return self._bisect(batch, error)
            self._fail_alone(batch, error, retry)
            return Outcome(all_ok=False)
        seconds = self._stop_busy() - start
        self.metrics.batch_size.observe(batch.size)
        self.metrics.images.inc(batch.size)
        self._note_throughput(batch.size, seconds)
        self.throughput.record(batch.size, batch.size * batch.key.steps, seconds)
        self._deliver(batch, images)
        if not retry and batch.size >= self.max_batch_size:  # a bisection's halves are not evidence
            self._ran_full()
        return Outcome(largest_ok=batch.size)

    def _ran_full(self) -> None:
        """A batch of the max batch in force ran: a probe succeeded, or one more toward the next."""
        self._probing = False
        if self.max_batch_size >= self._configured_max:
            return
        self._full_since_lowered += 1
        if self._full_since_lowered >= self._probe_after:
            size = min(self._configured_max, 2 * self.max_batch_size)
            log.info("%d full batches ran at max batch %d: probing %d", self._full_since_lowered,
                     self.max_batch_size, size)
            self.batching = replace(self.batching, max_batch_size=size)
            self._full_since_lowered = 0
            self._probing = True

    def _stop_busy(self) -> float:
        with self._busy_lock:
            now = self.clock()
            if self._busy_since is not None:
                self._busy_total_s += now - self._busy_since
            self._busy_since = None
            return now

    def _bisect(self, batch: Batch, error: BaseException) -> Outcome:
        """Retries the halves of a failed batch, so that only an image that fails alone fails."""
        self.metrics.batch_splits.inc()
        # Whatever the error, the failed call may have left its activations cached.
        self.runner.release_memory()
        first, second = batch.split()
        log.warning("batch of %d images failed (%s: %s): retrying it as %d + %d",
                    batch.size, type(error).__name__, error, first.size, second.size)
        if self.runner.is_out_of_memory(error):
            self._lower_max_batch(first.size, f"out of memory at batch size {batch.size}")
        outcome = self._execute(first, retry=True) + self._execute(second, retry=True)
        if outcome.all_ok:
            # Every image ran in a smaller batch: this batch failed for its size, and so would the
            # next full one. A transient error looks the same: lowering costs throughput, not
            # answers, and the probe gives the throughput back.
            self._lower_max_batch(outcome.largest_ok, f"{type(error).__name__} at batch size {batch.size} only")
        return outcome

    def _lower_max_batch(self, size: int, why: str) -> None:
        if 1 <= size < self.max_batch_size:
            if self._probing:  # the probed size fails again: wait twice as long before the next
                self._probe_after *= 2
                self._probing = False
            log.warning("%s: max batch lowered from %d to %d (probed again after %d full batches)",
                        why, self.max_batch_size, size, self._probe_after)
            self.batching = replace(self.batching, max_batch_size=size)
            self._full_since_lowered = 0

    def _fail_alone(self, batch: Batch, error: BaseException, retry: bool) -> None:
        """Fails the one job of a one-image batch with the error its image raised."""
        [piece] = batch.slices
        job = piece.job
        if retry:
            self.metrics.isolated_failures.inc()
        log.error("image %d of a request failed alone: %s: %s", piece.start, type(error).__name__, error)
        self.queue.cancel(job)  # its later images would be thrown away
        job.error = BatchFailed(f"{type(error).__name__}: {error}")
        self._finish(job)

    def _deliver(self, batch: Batch, images: Sequence[Any]) -> None:
        offset = 0
        for piece in batch.slices:
            job = piece.job
            job.images[piece.start:piece.stop] = images[offset:offset + piece.size]
            offset += piece.size
            job.done_images += piece.size
            if job.done_images == job.n and not job.finished:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finished = True
        try:
            job.on_done(job)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the loop
            log.exception("answering a job failed")

    def _note_throughput(self, images: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = images / seconds
        self._images_per_s = rate if self._images_per_s is None else 0.7 * self._images_per_s + 0.3 * rate
