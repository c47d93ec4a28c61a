"""Runs the worker: uvicorn serving the API at once, the model loading beside it, drain on signals.

The HTTP server comes up before the model so that liveness answers during a long load;
readiness turns true once the model is loaded and warmed up (one small call, then one batch at
the max batch size that measures the capacity). The first SIGTERM (or Ctrl-C)
starts a drain: readiness false, new requests 503, accepted ones finish, then exit 0; exit 1
when `drain_timeout_s` passes first. A second Ctrl-C stops at once.

In pull mode (`ServeConfig.queue`) a `QueueConsumer` starts once the model is loaded, and the
drain first stops it pulling, then lets the batcher finish, then waits until every job in hand
is FINISHed on the queue.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry

from contract.apikey import ApiKeys, warn_if_open

from .api import build_app
from .compiled import compiles
from .encoding import PngEncoder
from .metrics import WorkerMetrics
from .queue import QueueConsumer
from .queueconfig import QueueConfig
from .service import WorkerLimits, WorkerService

log = logging.getLogger("worker.server")

EXIT_DRAINED, EXIT_DRAIN_TIMEOUT, EXIT_LOAD_FAILED = 0, 1, 2


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    host: str = "0.0.0.0"
    port: int = 8000
    device: str = "auto"
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    drain_timeout_s: float = 120.0
    warm_up: bool = True
    access_log: bool = False
    queue: QueueConfig | None = None  # pull mode: jobs from this Redis stream; None: the HTTP API only
    compile: str = "auto"  # one of COMPILE_CHOICES: "auto" compiles on CUDA only
    batch_buckets: tuple[int, ...] | None = None  # compiled batch sizes; None: `default_buckets(max batch)`
    compile_cache_dir: Path | None = None  # compiled artifacts kept across processes; None: the compiler's default
    encode_processes: int | None = None  # PNG encoder processes; None: ENCODE_PROCESSES_ON_CUDA on CUDA, else 0 (a thread)
    api_keys: ApiKeys | None = field(default=None, repr=False)  # None: the API needs no key


ENCODE_PROCESSES_ON_CUDA = 2



class WorkerServer(uvicorn.Server):
    """uvicorn, with the model loaded on a thread and a drain instead of an abrupt stop."""

    def __init__(self, config: ServeConfig) -> None:
        self.serve_config = config
        self.service = WorkerService(config.limits, WorkerMetrics(CollectorRegistry()))
        self.consumer = QueueConsumer(config.queue, self.service) if config.queue else None
        super().__init__(
            uvicorn.Config(
                build_app(self.service, config.api_keys),
                host=config.host,
                port=config.port,
                lifespan="off",
                access_log=config.access_log,
                timeout_graceful_shutdown=5,
                log_config=None,
            )
        )
        self.exit_code = EXIT_DRAINED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        warn_if_open(self.serve_config.api_keys, self.serve_config.host, log)
        threading.Thread(target=self._load_model, name="model-load", daemon=True).start()
        await super().serve(sockets)

    def _load_model(self) -> None:
        from .pipeline import DiffusionRunner

        config = self.serve_config
        try:
            runner = DiffusionRunner.load(config.model_dir, config.device)
            loaded_at = time.perf_counter()
            self.service.model_load_s = runner.load_seconds  # exported from here, through the compile
            defaults = runner.defaults()
            processes = config.encode_processes
            if processes is None:
                processes = ENCODE_PROCESSES_ON_CUDA if runner.device == "cuda" else 0
            self.service.encoder = PngEncoder(processes)
            self.service.encoder.start()
            compiled = self._compiled(runner, defaults) if compiles(config.compile, runner.device) else None
            if compiled is not None:
                runner = compiled  # every bucket compiled and captured, whatever --no-warm-up says
            elif config.warm_up:
                runner.warm_up(defaults)
            # The warm-up's second part: a batch at the max batch size measures the capacity.
            self.service.attach(runner, defaults, runner.load_seconds, probe_capacity=config.warm_up,
                                loaded_at=loaded_at)
        except Exception:  # noqa: BLE001 - any load failure ends the process with a clear log
            log.exception("loading the model from %s failed", config.model_dir)
            self.exit_code = EXIT_LOAD_FAILED
            self.should_exit = True
            return
        limits, startup_s = config.limits, self.service.startup_s
        log.info("ready after %s s: max batch %d, max wait %.0f ms, queue %d images",
                 "(unknown)" if startup_s is None else f"{startup_s:.2f}", self.service.engine.max_batch_size,
                 limits.batching.max_wait_s * 1000, limits.max_queue_images)
        if self.consumer is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_consumer)

    def _compiled(self, runner, defaults):
        """The runner compiled and every bucket captured. When compiling fails: with `--compile
        auto` None (logged as an error; the worker serves eagerly, slower), with `on` the error."""
        from .compiled import CompiledRunner, CompileSettings, default_buckets

        config = self.serve_config
        limits = self.service.limits
        max_batch = limits.batching.max_batch_size
        buckets = config.batch_buckets or default_buckets(max_batch)
        if buckets[-1] > max_batch:
            log.warning("batch buckets above --max-batch-size (%d) are not compiled: %s", max_batch,
                        [b for b in buckets if b > max_batch])
            buckets = tuple(b for b in buckets if b <= max_batch) or (max_batch,)
        if buckets[-1] < max_batch:
            log.warning("the largest batch bucket (%d) is below --max-batch-size (%d): larger batches run eagerly",
                        buckets[-1], max_batch)
        try:
            compiled = CompiledRunner(runner, CompileSettings(buckets, config.compile_cache_dir), defaults)
            compiled.warm_up(defaults)
        except Exception as error:
            if config.compile != "auto":
                raise RuntimeError(f"--compile {config.compile}: compiling the pipeline failed: {error}") from error
            log.exception("--compile auto: compiling the pipeline failed; serving it eagerly (set --compile off "
                          "to skip the attempt, or clear --compile-cache-dir if a cached artifact is broken)")
            runner.release_memory()
            return None
        if compiled.largest_bucket < buckets[-1] == max_batch:
            self.service.limits = replace(limits, batching=replace(limits.batching,
                                                                   max_batch_size=compiled.largest_bucket))
            log.warning("max batch lowered from %d to %d, the largest bucket that compiled", max_batch,
                        compiled.largest_bucket)
        return compiled

    def _start_consumer(self) -> None:
        if self.consumer is not None and not self._drain_started:
            self.consumer.start()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler on the loop's thread; uvicorn's own handler would stop at
        # once and re-raise the signal at exit, which loses accepted requests.
        if self._drain_started:
            if sig == signal.SIGINT:
                log.warning("second interrupt: stopping without waiting for the drain")
                self.exit_code = EXIT_DRAIN_TIMEOUT
                self.force_exit = self.should_exit = True
            return
        self._drain_started = True
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, reason: str) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(reason))

    async def _drain(self, reason: str) -> None:
        service, consumer = self.service, self.consumer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.serve_config.drain_timeout_s
        if consumer is not None:
            log.info("%s: pulling no more jobs; %d in hand", reason, consumer.in_hand)
            try:
                async with asyncio.timeout_at(deadline):
                    await consumer.stop_pulling()
            except TimeoutError:
                pass  # what is in hand is waited for below, within what is left of the timeout
        log.info("%s: draining %d accepted requests (at most %.0f s)",
                 reason, service.in_flight, self.serve_config.drain_timeout_s)
        drained = await service.drain(max(deadline - loop.time(), 0.0))
        if consumer is not None:
            drained = await consumer.finish(deadline - loop.time()) and drained
        if not drained:
            self.exit_code = EXIT_DRAIN_TIMEOUT
        log.info("drain %s; exiting", "complete" if drained else "timed out")
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    """Serves until drained or failed; returns the process exit code."""
    server = WorkerServer(config)
    try:
        server.run()
    finally:
        server.service.encoder.close()
    return server.exit_code
