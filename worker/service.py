"""The worker's request lifecycle: admit, queue, await, answer, and count the outcome.

`WorkerService` sits between the HTTP layer and the pipeline thread. Every accepted request
ends in exactly one outcome (ok, timeout, error, cancelled) and every refused one is counted
as rejected, so the requests counter (`contract.names.REQUESTS`) adds up to what clients sent.
The demand (`contract.names.REQUESTED_IMAGE_STEPS`) is counted on arrival, in image-steps, for
every request that fits this model: accepted, or refused because the queue was full.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from contract.schema import GenerationRequest

from .batching import BatchKey, BatchPolicy, BatchQueue, Job, QueueClosed, QueueFull
from .compiled import CompiledRunner
from .encoding import PngEncoder
from .engine import BatchFailed, Engine, ImageRunner
from .metrics import LiveState, WorkerMetrics
from .pipeline import ModelDefaults
from .uptime import process_uptime_s

log = logging.getLogger("worker.service")

SEED_MODULUS = 2**63  # torch.Generator.manual_seed takes any int below 2**64; stay signed-safe
# What a request that does not say gets: the capacity probe's steps and guidance.
DEFAULT_STEPS = GenerationRequest.model_fields["num_inference_steps"].default
DEFAULT_GUIDANCE = GenerationRequest.model_fields["guidance_scale"].default


@dataclass(frozen=True)
class WorkerLimits:
    """Admission and batching settings, parsed once from flags."""

    batching: BatchPolicy = field(default_factory=BatchPolicy)
    max_queue_images: int = 64
    request_timeout_s: float = 300.0
    max_image_side: int = 1024

    def __post_init__(self) -> None:
        for name, flag in (("max_queue_images", "--max-queue"), ("max_image_side", "--max-image-side")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (flag {flag}), got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(
                f"request_timeout_s must be above 0 (flag --request-timeout), got {self.request_timeout_s}"
            )


@dataclass(frozen=True)
class ImageSpec:
    """A validated generation request, in the worker's terms."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int | None  # None: the model's default size
    height: int | None
    steps: int
    guidance_scale: float
    seed: int | None


@dataclass(frozen=True)
class GeneratedImage:
    png_b64: str
    seed: int


@dataclass(frozen=True)
class Generation:
    """A request's answer: its images, and how long it waited for its first image to start."""

    images: list[GeneratedImage]
    wait_s: float  # seconds from its arrival in the queue to the start of its first image's batch


class Rejected(Exception):
    """Refused before queueing: `status` is the HTTP status, `retry_after_s` a hint for clients."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class InvalidRequest(Exception):
    """A request that is well-formed but does not fit this model or these limits."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RequestFailed(Exception):
    """Accepted but not answered with images: `status` is 500 (pipeline error) or 504 (timeout)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotStarted(RequestFailed):
    """None of the request's images had started by its `start_by_s`; it was dropped uncomputed."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message)


class ClientGone(Exception):
    """The client disconnected before its images were ready."""


class WorkerService:
    """Admission, queueing and answers for one pipeline."""

    def __init__(self, limits: WorkerLimits, metrics: WorkerMetrics,
                 uptime_s: Callable[[], float | None] = process_uptime_s) -> None:
        """`uptime_s`: seconds since the process started (None: unknown), read once at readiness."""
        self.limits = limits
        self.metrics = metrics
        self.encoder = PngEncoder(0)  # answers encoded in a thread; the server may set processes
        self._compiled: CompiledRunner | None = None  # the runner, when it is compiled
        self._uptime_s = uptime_s
        self.startup_s: float | None = None  # process start to ready; None until ready
        self.model_load_s: float | None = None  # imports and weights onto the device; None until loaded
        self.warm_up_s: float | None = None  # model loaded to ready; None until ready
        self.queue = BatchQueue(limits.max_queue_images)
        self.engine: Engine | None = None
        self.defaults: ModelDefaults | None = None
        self.draining = False
        # Pull mode (worker/queue.py): why the job queue holds readiness false, or None.
        self.pull_status: Callable[[], str | None] = lambda: None
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.watch(
            LiveState(
                queue_images=lambda: self.queue.waiting_images,
                requests_in_flight=lambda: self._in_flight,
                busy_seconds=lambda: self.engine.busy_seconds() if self.engine else 0.0,
                max_batch_size=lambda: self.engine.max_batch_size if self.engine else limits.batching.max_batch_size,
                ready=lambda: self.ready,
                capacity_image_steps_per_second=lambda: (
                    self.engine.capacity_image_steps_per_second() if self.engine else None),
                throughput_by_batch_size=lambda: self.engine.throughput.by_batch_size() if self.engine else {},
                startup_seconds=lambda: self.startup_s,
                model_load_seconds=lambda: self.model_load_s,
                warm_up_seconds=lambda: self.warm_up_s,
                compiled_buckets=lambda: len(self._compiled.settings.buckets) if self._compiled else 0,
                eager_batches=lambda: self._compiled.eager_batches if self._compiled else 0,
                encoder_restarts=lambda: self.encoder.replaced,
            )
        )

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        """Why /readyz answers 503 (draining, model loading, the job queue's state), or None."""
        if self.draining:
            return "draining"
        if self.engine is None:
            return "model loading"
        return self.pull_status()

    def attach(self, runner: ImageRunner, defaults: ModelDefaults, load_seconds: float,
               probe_capacity: bool = False, loaded_at: float | None = None) -> None:
        """Starts serving with a loaded runner (called once, after the model loaded, on the
        thread that loaded it). With `probe_capacity`, one batch at the max batch size, the
        model's default size and the API's default steps and guidance runs first
        (`Engine.probe_capacity`), so the capacity is measured when readiness turns true.
        `loaded_at` (time.perf_counter() when the load ended) times the warm-up to here.
        The start-up seconds are read last: what a new replica costs before it serves."""
        self.model_load_s = load_seconds
        self._compiled = runner if isinstance(runner, CompiledRunner) else None
        self.defaults = defaults
        engine = Engine(self.queue, runner, self.limits.batching, self.metrics)
        if probe_capacity:
            engine.probe_capacity(BatchKey(defaults.width, defaults.height, DEFAULT_STEPS, DEFAULT_GUIDANCE))
        engine.start()
        if loaded_at is not None:
            self.warm_up_s = time.perf_counter() - loaded_at
        self.startup_s = self._uptime_s()
        if self.startup_s is None:
            log.warning("the process start time is unknown here (no Linux /proc): no start-up seconds exported")
        self.engine = engine  # ready from here

    # -- a request --------------------------------------------------------------------------

    async def generate(
        self, spec: ImageSpec, disconnected: Callable[[], Awaitable[None]], start_by_s: float | None = None,
        count_demand: bool = True,
    ) -> Generation:
        """Runs one request to its end; raises Rejected, InvalidRequest, RequestFailed or ClientGone.

        `disconnected` returns when nobody wants the answer any more (ClientGone: the images not
        started are dropped). `start_by_s`: seconds from now by which its first image must start,
        else it is dropped uncomputed and NotStarted (a RequestFailed, 504) is raised; None: no
        such bound, only the request timeout. `count_demand`: add its image-steps to the demand
        when it is accepted or refused for a full queue (False for a retry of a job counted once).
        """
        if self.draining:
            self.metrics.requests.labels("rejected").inc()
            raise Rejected(503, "draining: this worker accepts no new requests", retry_after_s=1)
        if self.engine is None or self.defaults is None:
            self.metrics.requests.labels("rejected").inc()
            raise Rejected(503, "model not loaded yet", retry_after_s=5)
        key = self._batch_key(spec, self.defaults)
        if count_demand:
            # Before the queue's verdict: a request refused for a full queue is demand too.
            self.metrics.requested_image_steps.inc(spec.n * spec.steps)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Job] = loop.create_future()
        arrived_at = time.monotonic()
        job = Job(
            key=key,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            seeds=self._seeds(spec),
            arrived_at=arrived_at,
            on_done=lambda finished: _resolve_soon(loop, done, finished),
            start_by=arrived_at + start_by_s if start_by_s is not None else None,
        )
        try:
            self.queue.submit(job)
        except QueueFull as full:
            self.metrics.requests.labels("rejected").inc()
            raise Rejected(429, str(full), retry_after_s=self._retry_after_s(full.waiting_images)) from None
        except QueueClosed:
            self.metrics.requests.labels("rejected").inc()
            raise Rejected(503, "draining: this worker accepts no new requests", retry_after_s=1) from None
        self._enter()
        outcome = "error"
        try:
            images = await self._await_job(job, done, disconnected)
            outcome = "ok"
            return Generation(images, job.started_at - job.arrived_at)
        except ClientGone:
            outcome = "cancelled"
            raise
        except RequestFailed as failed:
            outcome = "timeout" if failed.status == 504 else "error"
            raise
        finally:
            self.metrics.requests.labels(outcome).inc()
            self.metrics.request_duration.observe(time.monotonic() - job.arrived_at)
            self._leave()

    async def _await_job(
        self, job: Job, done: asyncio.Future[Job], disconnected: Callable[[], Awaitable[None]]
    ) -> list[GeneratedImage]:
        gone = asyncio.ensure_future(disconnected())
        try:
            finished, _ = await asyncio.wait(
                {done, gone}, timeout=self.limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if done not in finished:
            self.queue.cancel(job)
            if gone in finished:
                raise ClientGone()
            raise RequestFailed(504, f"no result within the request timeout of {self.limits.request_timeout_s:g} s")
        if job.expired:
            raise NotStarted("none of its images had started by its start-by time: dropped uncomputed")
        if job.error is not None:
            message = str(job.error) if isinstance(job.error, BatchFailed) else repr(job.error)
            raise RequestFailed(500, f"generation failed: {message}")
        encoded = await self.encoder.encode(job.images)
        return [GeneratedImage(png, seed) for png, seed in zip(encoded, job.seeds, strict=True)]

    def _batch_key(self, spec: ImageSpec, defaults: ModelDefaults) -> BatchKey:
        width = spec.width or defaults.width
        height = spec.height or defaults.height
        for side in (width, height):
            if side % defaults.size_multiple:
                raise InvalidRequest("size", f"each side must be a multiple of {defaults.size_multiple} for this model")
            if side > self.limits.max_image_side:
                raise InvalidRequest("size", f"each side must be at most {self.limits.max_image_side} pixels")
        if spec.n > self.limits.max_queue_images:
            raise InvalidRequest("n", f"n must be at most the queue capacity, {self.limits.max_queue_images} images")
        return BatchKey(width, height, spec.steps, spec.guidance_scale)

    @staticmethod
    def _seeds(spec: ImageSpec) -> tuple[int, ...]:
        base = spec.seed if spec.seed is not None else secrets.randbelow(SEED_MODULUS)
        return tuple((base + index) % SEED_MODULUS for index in range(spec.n))

    def _retry_after_s(self, waiting_images: int) -> int:
        """Seconds until the queue has likely drained what waits now, from recent throughput."""
        rate = self.engine.images_per_second() if self.engine else None
        if not rate:
            return 1
        return max(1, min(60, math.ceil(waiting_images / rate)))

    # -- in-flight accounting and drain -----------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _enter(self) -> None:
        with self._in_flight_lock:
            self._in_flight += 1
            self._idle.clear()

    def _leave(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new work, waits for every accepted request to be answered; True if all were."""
        self.draining = True
        self.queue.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.error("drain timed out after %.0f s with %d requests unanswered", timeout_s, self._in_flight)
            return False
        if self.engine is not None:
            await asyncio.to_thread(self.engine.join, 5.0)
        return True


def _resolve_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Job], job: Job) -> None:
    """Called on the pipeline thread: hands the finished job to the request's event loop."""

    def resolve() -> None:
        if not future.done():
            future.set_result(job)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: the process is exiting and nobody waits
        pass

