"""PNG encoding of answered images, optionally in processes of its own.

Encoding a 512x512 image and its base64 costs the CPU tens of milliseconds (38 ms for a
random-weight model's noise-like picture on the CI machine); in a thread of the worker it
competes for the interpreter lock with the pipeline thread, which with a compiled pipeline
spends only 160 ms per image at batch 1. `PngEncoder(processes=N)` encodes in N spawned
processes instead (pixels out and base64 back through pipes); `processes=0` in a thread, as
before. A process pool that breaks (a process killed) is replaced, and the images of that call
are encoded in a thread, so an answer is never lost to the pool.

This module imports only the standard library and, when it encodes, Pillow. A spawned process
still imports the parent's main module (`python -m worker`: the worker's CLI and what it imports,
about 37 MiB resident), once, at `start`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger("worker.encoding")


def encode_png(pixels) -> str:
    """One HxWx3 uint8 array -> its PNG, base64 (ASCII)."""
    from PIL import Image

    buffer = io.BytesIO()
    # Level 1: most of zlib's gain at a fraction of the default level's time per image.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_all(images: Sequence[Any]) -> list[str]:
    return [encode_png(pixels) for pixels in images]


def _ready() -> bool:
    from PIL import Image  # noqa: F401 - loaded once per process, before the first request

    return True


class PngEncoder:
    """Encodes a request's images off the event loop: in `processes` spawned processes, or in a
    thread when `processes` is 0. `start` spawns the processes and waits until each has loaded
    Pillow; `close` ends them."""

    def __init__(self, processes: int = 0) -> None:
        if processes < 0:
            raise ValueError(f"encoder processes must be 0 or more (flag --encode-processes), got {processes}")
        self.processes = processes
        self.replaced = 0  # pools replaced after breaking
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.processes:
            pool = self._current()
            for future in [pool.submit(_ready) for _ in range(self.processes)]:
                future.result(timeout=60)

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the parent holds CUDA and threads that a fork would copy half-way
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
                self.replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)

    async def encode(self, images: Sequence[Any]) -> list[str]:
        """The images' PNGs, base64, in order."""
        if not self.processes:
            return await asyncio.to_thread(encode_all, images)
        pool = self._current()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, encode_all, list(images))
        except BrokenProcessPool as error:
            log.warning("the PNG encoder processes broke (%s); replacing them, this answer encodes in a thread",
                        error or "a process ended")
            self._replace(pool)
            return await asyncio.to_thread(encode_all, images)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
