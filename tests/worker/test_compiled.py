"""The compiled runner's routing, on the real tiny pipeline on CPU.

The CPU suite keeps eager (issue 15): `compile_fn` stands in for torch.compile at that one
boundary and records what the compiled UNet and VAE decode are called with and on which
thread. What is tested is ours: buckets, padding, the eager fallback for uncovered shapes and
for a would-be recompile, the single thread, the warm-up of every bucket, and that the images
are the eager ones. The compiled kernels themselves are checked on the GPU
(`bench/compiled_pipeline.py`, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import logging
import threading

import numpy as np
import pytest

from worker.batching import BatchKey
from worker.compiled import CompiledRunner, CompileSettings, bucket_for, default_buckets, padded, parse_buckets
from worker.compiled import compiles


@pytest.mark.parametrize(("max_batch", "buckets"), [
    (1, (1,)), (2, (1, 2)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16)), (32, (1, 2, 4, 8, 16, 32)),
])
def test_default_buckets_are_powers_of_two_up_to_the_max_batch_and_it(max_batch, buckets):
    assert default_buckets(max_batch) == buckets


def test_buckets_parse_sorted_and_distinct_and_refuse_what_is_not_a_batch_size():
    assert parse_buckets("8, 1,2,8") == (1, 2, 8)
    for bad in ("", "0,2", "-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="batch buckets"):  # argparse shows its message
            parse_buckets(bad)
    with pytest.raises(ValueError):
        default_buckets(0)


def test_a_batch_takes_the_smallest_bucket_that_holds_it_and_pads_with_its_last_item():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert padded(["a", "b", "c"], 4) == ["a", "b", "c", "c"]
    assert padded([7], 1) == [7]


@pytest.mark.parametrize(("choice", "device", "expected"), [
    ("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False),
])
def test_compile_auto_means_on_cuda_only(choice, device, expected):
    assert compiles(choice, device) is expected


def test_an_unknown_compile_choice_is_refused():
    with pytest.raises(ValueError, match="--compile"):
        compiles("yes", "cuda")


class Recorder:
    """Stands in for torch.compile: the compiled callables call the eager ones and record the
    batch they saw (the first dimension of their first argument) and the thread they ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.fail_with: BaseException | None = None
        self.out_of_memory_above: int | None = None  # the decode raises CUDA's OOM above this many images
        self.raised: BaseException | None = None

    def __call__(self, fn):
        name = "unet" if hasattr(fn, "config") else "decode"

        def compiled(*args, **kwargs):
            self.calls.append((name, int(args[0].shape[0]), threading.current_thread().name))
            if self.fail_with is not None:
                raise self.fail_with
            if name == "decode" and self.out_of_memory_above is not None and args[0].shape[0] > self.out_of_memory_above:
                import torch

                self.raised = torch.OutOfMemoryError("CUDA out of memory (injected in the compiled VAE decode)")
                raise self.raised
            return fn(*args, **kwargs)

        if name == "unet":  # the pipeline reads the UNet's config and dtype through it, as through torch.compile's
            class Module:
                def __call__(self, *args, **kwargs):
                    return compiled(*args, **kwargs)

                def __getattr__(self, attr):
                    return getattr(fn, attr)

            return Module()
        return compiled

    def batches(self, name: str) -> list[int]:
        return [size for which, size, _ in self.calls if which == name]


@pytest.fixture
def compiled(tiny_model):
    # A runner of its own: the compiled runner swaps modules on its pipeline.
    from worker.pipeline import DiffusionRunner

    runner = DiffusionRunner.load(tiny_model, device="cpu")
    recorder = Recorder()
    wrapped = CompiledRunner(runner, CompileSettings((1, 2, 4)), runner.defaults(), compile_fn=recorder)
    return wrapped, runner, recorder


def test_a_batch_runs_padded_to_its_bucket_and_answers_the_eager_images_of_its_own_seeds(compiled):
    runner, eager, recorder = compiled
    d = runner.defaults()
    key = BatchKey(d.width, d.height, steps=2, guidance_scale=7.5)
    prompts, seeds = ["a", "b", "c"], [5, 6, 7]
    images = runner.generate(key, prompts, [None] * 3, seeds)
    assert len(images) == 3
    # classifier-free guidance doubles the UNet's batch: 3 images padded to 4 -> 8
    assert set(recorder.batches("unet")) == {8} and recorder.batches("decode") == [4]
    reference = eager.generate(key, prompts, [None] * 3, seeds)
    for got, want in zip(images, reference):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # same picture; batch size may move a bit
    assert runner.compiled_batches == 1 and runner.eager_batches == 0


def test_shapes_the_buckets_do_not_cover_run_eagerly_and_never_reach_the_compiled_modules(compiled):
    runner, _, recorder = compiled
    d = runner.defaults()
    other_size = BatchKey(d.width // 2, d.height // 2, steps=2, guidance_scale=7.5)
    assert len(runner.generate(other_size, ["a"], [None], [1])) == 1
    unguided = BatchKey(d.width, d.height, steps=2, guidance_scale=1.0)  # the UNet would see n, not 2n
    assert len(runner.generate(unguided, ["a"], [None], [1])) == 1
    too_many = BatchKey(d.width, d.height, steps=2, guidance_scale=7.5)
    assert len(runner.generate(too_many, ["a"] * 5, [None] * 5, list(range(5)))) == 5
    assert recorder.calls == [] and runner.eager_batches == 3 and runner.compiled_batches == 0
    # and the pipeline's own modules are the eager ones again after a compiled batch
    runner.generate(too_many, ["a"], [None], [1])
    assert runner.runner.pipeline.unet is runner._eager_unet


def test_the_warm_up_runs_every_bucket_largest_first_and_every_compiled_call_on_one_thread(compiled):
    runner, _, recorder = compiled
    runner.warm_up(runner.defaults())
    decoded = recorder.batches("decode")
    assert decoded == [4, 4, 2, 2, 1, 1]  # twice each: CUDA graphs record on a shape's second call
    assert runner.warm_up_seconds is not None and runner.warm_up_seconds > 0
    d = runner.defaults()
    key = BatchKey(d.width, d.height, steps=2, guidance_scale=7.5)
    other = threading.Thread(target=runner.generate, args=(key, ["x"], [None], [3]))
    other.start()
    other.join()
    assert {thread for _, _, thread in recorder.calls} == {"cuda-graphs_0"}


def test_a_batch_that_would_recompile_after_the_warm_up_runs_eagerly_and_other_errors_propagate(compiled):
    runner, _, recorder = compiled
    d = runner.defaults()
    key = BatchKey(d.width, d.height, steps=2, guidance_scale=7.5)
    from torch._dynamo.exc import RecompileError

    recorder.fail_with = RecompileError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
    with pytest.raises(RecompileError):  # before the warm-up, nothing is forbidden: a real error
        runner.generate(key, ["a"], [None], [1])
    recorder.fail_with = None
    runner.warm_up(runner.defaults())
    recorder.fail_with = RecompileError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
    assert len(runner.generate(key, ["a", "b"], [None] * 2, [1, 2])) == 2
    assert runner.eager_batches == 1
    recorder.fail_with = RuntimeError("CUDA error: an illegal memory access was encountered (recompile)")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        runner.generate(key, ["a"], [None], [1])


def test_out_of_memory_in_a_compiled_batch_lowers_the_max_batch_as_an_eager_one_does(compiled):
    import torch
    from prometheus_client import CollectorRegistry

    from worker.batching import BatchPolicy, BatchQueue
    from worker.engine import Engine
    from worker.metrics import WorkerMetrics

    runner, _, recorder = compiled
    runner.warm_up(runner.defaults())
    recorder.out_of_memory_above = 2  # images: the compiled VAE decode runs out of memory at a bucket of 4
    engine = Engine(BatchQueue(64), runner, BatchPolicy(max_batch_size=4, max_wait_s=0.0),
                    WorkerMetrics(CollectorRegistry()))
    d = runner.defaults()
    assert engine.probe_capacity(BatchKey(d.width, d.height, steps=2, guidance_scale=7.5)) == 2
    assert engine.max_batch_size == 2
    assert recorder.batches("decode")[-2:] == [4, 2]  # the failed bucket, then the halved one, both compiled
    assert isinstance(recorder.raised, torch.OutOfMemoryError)


def test_a_bucket_out_of_memory_while_compiling_is_dropped_with_every_larger_one(compiled):
    runner, _, recorder = compiled
    recorder.out_of_memory_above = 2
    runner.warm_up(runner.defaults())
    assert runner.settings.buckets == (1, 2) and runner.largest_bucket == 2
    assert recorder.batches("decode") == [4, 2, 2, 1, 1]  # 4 failed once; 2 and 1 captured


def test_out_of_memory_at_the_smallest_bucket_while_compiling_propagates(compiled):
    import torch

    runner, _, recorder = compiled
    recorder.out_of_memory_above = 0
    with pytest.raises(torch.OutOfMemoryError):
        runner.warm_up(runner.defaults())


# -- the server's use of it: what --compile auto and on do when compiling fails ------------------

def server_for(tiny_model, compile_choice: str, max_batch: int, buckets=None):
    from worker.batching import BatchPolicy
    from worker.server import ServeConfig, WorkerServer
    from worker.service import WorkerLimits

    limits = WorkerLimits(batching=BatchPolicy(max_batch_size=max_batch, max_wait_s=0.0))
    return WorkerServer(ServeConfig(model_dir=tiny_model, device="cpu", limits=limits, compile=compile_choice,
                                    batch_buckets=buckets))


@pytest.fixture
def recorded(monkeypatch):
    """CompiledRunner as the server builds it, with the recorder in torch.compile's place."""
    import worker.compiled

    recorder = Recorder()
    real = worker.compiled.CompiledRunner

    class Recorded(real):
        def __init__(self, runner, settings, defaults):
            super().__init__(runner, settings, defaults, compile_fn=recorder)

    monkeypatch.setattr(worker.compiled, "CompiledRunner", Recorded)
    return recorder


@pytest.mark.parametrize("choice", ["auto", "on"])
def test_a_failed_compile_serves_eagerly_with_auto_and_fails_loudly_with_on(tiny_model, recorded, choice, caplog):
    from worker.pipeline import DiffusionRunner

    runner = DiffusionRunner.load(tiny_model, device="cpu")
    recorded.fail_with = RuntimeError("Unsupported: graph break in the UNet")  # every compiled call
    server = server_for(tiny_model, choice, max_batch=2)
    if choice == "on":
        with pytest.raises(RuntimeError, match="--compile on: compiling the pipeline failed"):
            server._compiled(runner, runner.defaults())
        return
    with caplog.at_level(logging.ERROR, logger="worker.server"):
        assert server._compiled(runner, runner.defaults()) is None  # the caller serves `runner` eagerly
    assert "serving it eagerly" in caplog.text
    assert runner.pipeline.unet.__class__.__name__ == "UNet2DConditionModel"  # the eager modules are back


def test_the_server_lowers_the_max_batch_to_the_largest_bucket_that_compiled_and_drops_buckets_above_it(
        tiny_model, recorded):
    from worker.pipeline import DiffusionRunner

    runner = DiffusionRunner.load(tiny_model, device="cpu")
    recorded.out_of_memory_above = 2
    server = server_for(tiny_model, "on", max_batch=4, buckets=(1, 2, 4, 8))
    compiled = server._compiled(runner, runner.defaults())
    assert 8 not in recorded.batches("decode")  # above --max-batch-size: never compiled
    assert compiled.settings.buckets == (1, 2)
    assert server.service.limits.batching.max_batch_size == 2


def test_the_worker_exports_its_compiled_buckets_and_counts_the_batches_it_ran_eagerly(compiled):
    from prometheus_client import CollectorRegistry

    from contract import names
    from worker.metrics import WorkerMetrics
    from worker.service import WorkerLimits, WorkerService

    runner, eager, _ = compiled

    def exported(service):
        return {family.name: family.samples[0].value for family in service.metrics.registry.collect()
                if family.name in (names.COMPILED_BUCKETS, names.EAGER_BATCHES)}

    plain = WorkerService(WorkerLimits(), WorkerMetrics(CollectorRegistry()))
    plain.attach(eager, eager.defaults(), 1.0)
    assert exported(plain) == {names.COMPILED_BUCKETS: 0, names.EAGER_BATCHES: 0}
    service = WorkerService(WorkerLimits(), WorkerMetrics(CollectorRegistry()))
    service.attach(runner, runner.defaults(), 1.0)
    assert exported(service) == {names.COMPILED_BUCKETS: 3, names.EAGER_BATCHES: 0}
    d = runner.defaults()
    runner.generate(BatchKey(d.width // 2, d.height // 2, steps=2, guidance_scale=7.5), ["a"], [None], [1])
    assert exported(service)[names.EAGER_BATCHES] == 1
    for running in (plain, service):
        running.queue.close()
        assert running.engine.join(5.0)
