"""The compiled runner: UNet and VAE decode under `torch.compile` with CUDA graphs (`--compile`).

Small batches are bound by Python launching kernels, and CUDA graphs remove that (issue 15's
table: three times the images per second at batch 1 on an H200). A CUDA graph replays one
shape, so the runner serves a fixed set of batch-size buckets: a batch of n images runs padded
to the smallest bucket of at least n (padding images are copies of the last one and are
dropped), and every bucket is compiled and captured during `warm_up`, before readiness. A
request the compiled shapes do not cover (another image size, guidance off, a batch above the
largest bucket) runs on the same weights eagerly, never compiling at request time: after the
warm-up every compiled call runs under the stance `fail_on_recompile`, and a batch that would
still recompile runs eagerly (logged once per shape).

Compilation is cached across processes in `cache_dir` (inductor's FX graph, AOTAutograd and
Triton caches, `TORCHINDUCTOR_CACHE_DIR`): mounted as a volume, it lets the next start on the
node skip most of the compile. What remains is tracing and capture.

All compiled calls run on one thread of their own: CUDA graph trees belong to the thread that
recorded them, and the warm-up runs on the loading thread while batches run on the pipeline's.

A bucket that runs out of memory while compiling is dropped with every larger one, and the max
batch follows the largest that captured, as an eager worker's probe halves its batch.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batching import BatchKey
from .pipeline import DiffusionRunner, ModelDefaults

log = logging.getLogger("worker.compiled")

COMPILE_MODE = "reduce-overhead"  # inductor with CUDA graphs
COMPILE_CHOICES = ("auto", "on", "off")  # --compile: auto compiles on CUDA only
WARM_UP_STEPS = 2  # denoising steps of each bucket's warm-up call: shapes do not depend on steps


def compiles(choice: str, device: str) -> bool:
    """Whether `--compile choice` compiles on `device` ("cuda" or "cpu")."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device == "cuda")


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself: (1, 2, 4, 8, 12) for 12.

    Padding to the next power of two wastes at most half a batch, and only between light load
    (batches of one or two) and full load (batches at the max, which need no padding)."""
    if max_batch_size < 1:
        raise ValueError(f"max batch size must be at least 1, not {max_batch_size}")
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8), sorted and distinct; raises ValueError (argparse's
    ArgumentTypeError, so the flag's message shows) on anything but whole numbers of at least 1."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch buckets must be whole numbers separated by commas, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch buckets must be whole numbers of at least 1, got {text!r}")
    return tuple(sizes)


def bucket_for(images: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `images`, or None when none does."""
    return next((size for size in buckets if size >= images), None)


def padded(values: Sequence[Any], size: int) -> list[Any]:
    """`values` followed by copies of its last element up to `size` items."""
    return [*values, *[values[-1]] * (size - len(values))]


@dataclass(frozen=True)
class CompileSettings:
    """What `--compile` compiles: `buckets` batch sizes, each captured at the model's default
    image size; `cache_dir` keeps the compiled artifacts across processes (None: the
    compiler's default, a directory under /tmp that a new pod does not have)."""

    buckets: tuple[int, ...]
    cache_dir: Path | None = None


class CompiledRunner:
    """A `DiffusionRunner` whose UNet and VAE decode run compiled for the shapes of `buckets` at
    `defaults`' image size, and eagerly for anything else. Same seed, same picture as eager,
    within fp16 tolerance (docs/BENCHMARKS.md)."""

    def __init__(self, runner: DiffusionRunner, settings: CompileSettings, defaults: ModelDefaults,
                 compile_fn=None) -> None:
        """`compile_fn(callable) -> callable` replaces `torch.compile` (tests use an identity: the
        CPU suite keeps eager); by default torch.compile in `COMPILE_MODE`, full graph."""
        self.runner = runner
        self.settings = settings
        self.size = (defaults.width, defaults.height)
        self.device = runner.device
        self.load_seconds = runner.load_seconds
        self.warm_up_seconds: float | None = None  # compile and capture of every bucket; None before warm_up
        self.compiled_batches = 0  # batches served by the compiled shapes
        self.eager_batches = 0  # batches served eagerly (another size, too large, or a would-be recompile)
        self._warm = False
        self._refused: set[tuple[int, int, int]] = set()  # (bucket, width, height) that would recompile
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-graphs")
        pipeline = runner.pipeline
        self._eager_unet = pipeline.unet
        self._eager_decode = pipeline.vae.decode
        self._thread.submit(self._prepare, compile_fn).result()

    def _prepare(self, compile_fn) -> None:
        import torch

        if self.settings.cache_dir is not None:
            self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.cache_dir)
        pipeline = self.runner.pipeline
        if compile_fn is None:
            torch._inductor.config.conv_1x1_as_mm = True  # diffusers' advice for UNets
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(self.settings.buckets))

            def compile_fn(fn):
                return torch.compile(fn, mode=COMPILE_MODE, fullgraph=True)

            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
            for model in (pipeline.unet, pipeline.vae):
                if hasattr(model, "fuse_qkv_projections"):
                    model.fuse_qkv_projections()
        self._compiled_unet = compile_fn(pipeline.unet)
        self._compiled_decode = compile_fn(pipeline.vae.decode)

    def defaults(self) -> ModelDefaults:
        return self.runner.defaults()

    def covers(self, key: BatchKey, images: int) -> bool:
        """Whether a batch of `images` of `key` runs on the compiled shapes: the default size,
        classifier-free guidance on (guidance_scale > 1 doubles the UNet's batch; the warm-up
        captures that), and a bucket that holds it."""
        return ((key.width, key.height) == self.size and key.guidance_scale > 1
                and bucket_for(images, self.settings.buckets) is not None)

    def generate(
        self, key: BatchKey, prompts: list[str], negative_prompts: list[str | None], seeds: list[int]
    ) -> list[Any]:
        return self._thread.submit(self._generate, key, prompts, negative_prompts, seeds).result()

    def _generate(self, key: BatchKey, prompts: list[str], negative_prompts: list[str | None], seeds: list[int]
                  ) -> list[Any]:
        n = len(prompts)
        if not self.covers(key, n):
            self.eager_batches += 1
            return self.runner.generate(key, prompts, negative_prompts, seeds)
        size = bucket_for(n, self.settings.buckets)
        try:
            with self._compiled(), self._stance():
                images = self.runner.generate(key, padded(prompts, size), padded(negative_prompts, size),
                                              padded(seeds, size))
        except Exception as error:
            if not self._warm or not _is_recompile(error):
                raise
            shape = (size, key.width, key.height)
            if shape not in self._refused:  # once per shape, not once per batch
                self._refused.add(shape)
                log.warning("a batch of %d (bucket %d) at %dx%d would recompile; such batches run eagerly (%s)",
                            n, size, key.width, key.height, str(error).splitlines()[0] if str(error) else type(error).__name__)
            self.eager_batches += 1
            return self.runner.generate(key, prompts, negative_prompts, seeds)
        self.compiled_batches += 1
        return images[:n]

    def _stance(self):
        """After the warm-up, compiling is refused (`fail_on_recompile`) for the call inside, on
        this thread's calls only; before it, nothing is."""
        import contextlib

        import torch

        set_stance = getattr(torch.compiler, "set_stance", None)
        if not self._warm or set_stance is None:
            return contextlib.nullcontext()
        return set_stance("fail_on_recompile")

    def _compiled(self):
        runner = self

        class _Swap:
            def __enter__(self):
                pipeline = runner.runner.pipeline
                object.__setattr__(pipeline, "unet", runner._compiled_unet)
                pipeline.vae.decode = runner._compiled_decode

            def __exit__(self, *exc):
                pipeline = runner.runner.pipeline
                object.__setattr__(pipeline, "unet", runner._eager_unet)
                pipeline.vae.decode = runner._eager_decode
                return False

        return _Swap()

    def warm_up(self, defaults: ModelDefaults, guidance_scale: float = 7.5) -> None:
        """Compiles and captures every bucket, largest first, at the default image size with
        classifier-free guidance on (the API's default); from then on a compiled call may not
        recompile. What a new replica spends between its model load and readiness
        (`warm_up_seconds`).

        A bucket that runs out of memory is dropped with every larger one (`settings.buckets`
        shrinks, and the max batch should follow it: `largest_bucket`); out of memory at the
        smallest bucket, or any other error, propagates."""
        started = time.perf_counter()
        key = BatchKey(defaults.width, defaults.height, steps=WARM_UP_STEPS, guidance_scale=guidance_scale)
        for size in sorted(self.settings.buckets, reverse=True):
            began = time.perf_counter()
            try:
                # Twice: CUDA graph trees record on a shape's second call, after one warm-up run.
                for _ in range(2):
                    self.generate(key, ["warm-up"] * size, [None] * size, list(range(size)))
            except Exception as error:
                smaller = tuple(b for b in self.settings.buckets if b < size)
                if not self.is_out_of_memory(error) or not smaller:
                    raise
                self.release_memory()
                log.error("bucket %d ran out of memory while compiling (%s); serving buckets %s only",
                          size, error, smaller)
                self.settings = CompileSettings(smaller, self.settings.cache_dir)
                continue
            log.info("bucket %d compiled and captured in %.1f s", size, time.perf_counter() - began)
        self._warm = True
        self.warm_up_seconds = time.perf_counter() - started
        log.info("compiled %d buckets %s in %.1f s (cache %s)", len(self.settings.buckets), self.settings.buckets,
                 self.warm_up_seconds, self.settings.cache_dir or "the compiler's default")

    @property
    def largest_bucket(self) -> int:
        return self.settings.buckets[-1]

    def is_out_of_memory(self, error: BaseException) -> bool:
        return self.runner.is_out_of_memory(error)

    def release_memory(self) -> None:
        self.runner.release_memory()


def _is_recompile(error: BaseException) -> bool:
    """Whether `error` is the compiler refusing to recompile under `fail_on_recompile`."""
    from torch._dynamo.exc import RecompileError

    return isinstance(error, RecompileError)
