"""The pipeline loop against a scripted runner at the pipeline boundary: splits, failures, answers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from worker.batching import BatchKey, BatchPolicy, BatchQueue, Job
from worker.engine import BatchFailed, Engine
from worker.metrics import WorkerMetrics

KEY = BatchKey(64, 64, steps=4, guidance_scale=7.5)


class FakeOutOfMemory(Exception):
    pass


class ScriptedRunner:
    """Returns each image as its seed; runs out of memory above `memory_images`; raises a
    RuntimeError for calls above `fails_above` images (as an upsample kernel past INT_MAX
    elements does); raises a ValueError on 'explode', at any batch size."""

    def __init__(self, memory_images: int = 1000, fails_above: int = 1000) -> None:
        self.memory_images = memory_images
        self.fails_above = fails_above
        self.calls: list[list[int]] = []
        self.released = 0

    def generate(self, key, prompts, negative_prompts, seeds):
        self.calls.append(list(seeds))
        if len(seeds) > self.memory_images:
            raise FakeOutOfMemory(f"{len(seeds)} images do not fit")
        if len(seeds) > self.fails_above:
            raise RuntimeError(f"input too large for upsample at {len(seeds)} images")
        if "explode" in prompts:
            raise ValueError("the pipeline blew up")
        return [("image", seed) for seed in seeds]

    def is_out_of_memory(self, error):
        return isinstance(error, FakeOutOfMemory)

    def release_memory(self):
        self.released += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_engine(
    runner: ScriptedRunner, max_batch: int = 8, probe_after: int = 100
) -> tuple[Engine, BatchQueue, WorkerMetrics]:
    queue = BatchQueue(capacity_images=64)
    metrics = WorkerMetrics(CollectorRegistry())
    batching = BatchPolicy(max_batch_size=max_batch, max_wait_s=0.0)
    return Engine(queue, runner, batching, metrics, clock=Clock(), probe_after=probe_after), queue, metrics


def submit(queue: BatchQueue, prompt: str, seeds: tuple[int, ...], done: list[Job]) -> Job:
    job = Job(key=KEY, prompt=prompt, negative_prompt=None, seeds=seeds, arrived_at=99.0, on_done=done.append)
    queue.submit(job)
    return job


def drain(engine: Engine, queue: BatchQueue) -> None:
    queue.close()
    engine.run_forever()


def value(metrics: WorkerMetrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {})


def run_due_batch(engine: Engine, queue: BatchQueue) -> None:
    engine.run_batch(queue.poll(engine.batching, now=200.0))


def test_every_image_reaches_its_own_job_in_order():
    runner = ScriptedRunner()
    engine, queue, metrics = make_engine(runner, max_batch=4)
    done: list[Job] = []
    a = submit(queue, "a", (1, 2, 3), done)
    b = submit(queue, "b", (7, 8), done)
    drain(engine, queue)
    assert runner.calls == [[1, 2, 3, 7], [8]]
    assert a.images == [("image", 1), ("image", 2), ("image", 3)]
    assert b.images == [("image", 7), ("image", 8)]
    assert done == [a, b] and a.error is None and b.error is None
    assert value(metrics, "diffusion_images_total") == 5
    assert value(metrics, "diffusion_batch_size_count") == 2
    assert value(metrics, "diffusion_batch_size_sum") == 5


def test_out_of_memory_splits_the_batch_retries_the_halves_and_lowers_the_max_batch():
    runner = ScriptedRunner(memory_images=2)
    engine, queue, metrics = make_engine(runner, max_batch=8)
    done: list[Job] = []
    jobs = [submit(queue, f"r{index}", (index * 10, index * 10 + 1), done) for index in range(4)]
    drain(engine, queue)
    assert runner.calls[0] == [0, 1, 10, 11, 20, 21, 30, 31]
    assert [len(call) for call in runner.calls] == [8, 4, 2, 2, 4, 2, 2]
    assert engine.max_batch_size == 2
    assert engine.batching == BatchPolicy(max_batch_size=2, max_wait_s=0.0)  # the wait is kept
    assert runner.released == 3
    assert all(job.error is None and len(job.images) == 2 for job in jobs)
    assert sorted(done, key=id) == sorted(jobs, key=id)
    # only the calls that produced images count as batches
    assert value(metrics, "diffusion_batch_size_count") == 4
    assert value(metrics, "diffusion_images_total") == 8
    assert value(metrics, "diffusion_queue_wait_seconds_count") == 4  # once per request, retries or not
    assert value(metrics, "diffusion_batch_splits_total") == 3
    assert value(metrics, "diffusion_isolated_failures_total") == 0


def test_later_batches_respect_the_lowered_max_batch():
    runner = ScriptedRunner(memory_images=3)
    engine, queue, _ = make_engine(runner, max_batch=8)
    done: list[Job] = []
    submit(queue, "first", tuple(range(8)), done)
    batch = queue.poll(engine.batching, now=200.0)
    engine.run_batch(batch)
    assert engine.max_batch_size == 2
    submit(queue, "later", tuple(range(6)), done)
    drain(engine, queue)
    assert [len(call) for call in runner.calls[-3:]] == [2, 2, 2]


def test_out_of_memory_at_one_image_fails_that_request_only():
    runner = ScriptedRunner(memory_images=0)
    engine, queue, _ = make_engine(runner, max_batch=1)
    done: list[Job] = []
    job = submit(queue, "huge", (5,), done)
    drain(engine, queue)
    assert isinstance(job.error, BatchFailed) and "FakeOutOfMemory" in str(job.error)
    assert done == [job]
    assert runner.calls == [[5]]  # a one-image batch is not retried


def test_an_error_only_at_larger_batches_splits_them_and_lowers_the_max_batch():
    """Issue 12, case 3: max batch 4, a pipeline that raises for more than 2 images, 4 concurrent
    single-image requests twice: all 8 succeed and the second round runs in batches of 2."""
    runner = ScriptedRunner(fails_above=2)
    engine, queue, metrics = make_engine(runner, max_batch=4)
    done: list[Job] = []
    first_round = [submit(queue, f"first{index}", (index,), done) for index in range(4)]
    run_due_batch(engine, queue)
    assert engine.max_batch_size == 2
    second_round = [submit(queue, f"second{index}", (10 + index,), done) for index in range(4)]
    drain(engine, queue)
    assert [job.error for job in first_round + second_round] == [None] * 8
    assert [job.images for job in first_round + second_round] == [
        [("image", seed)] for seed in (0, 1, 2, 3, 10, 11, 12, 13)
    ]
    assert [len(call) for call in runner.calls] == [4, 2, 2, 2, 2]  # only the first full batch failed
    assert engine.batching == BatchPolicy(max_batch_size=2, max_wait_s=0.0)
    assert value(metrics, "diffusion_batch_splits_total") == 1
    assert value(metrics, "diffusion_isolated_failures_total") == 0
    assert value(metrics, "diffusion_images_total") == 8


def test_a_poison_request_fails_alone_and_the_others_of_its_batch_succeed():
    runner = ScriptedRunner()
    engine, queue, metrics = make_engine(runner, max_batch=4)
    done: list[Job] = []
    before = submit(queue, "before", (1,), done)
    poison = submit(queue, "explode", (2,), done)
    others = [submit(queue, "other", (3,), done), submit(queue, "other", (4,), done)]
    after = submit(queue, "after", (5,), done)
    drain(engine, queue)
    assert isinstance(poison.error, BatchFailed) and str(poison.error) == "ValueError: the pipeline blew up"
    for job in [before, *others, after]:
        assert job.error is None and job.images == [("image", job.seeds[0])]
    assert sorted(done, key=id) == sorted([before, poison, *others, after], key=id)  # each answered once
    assert runner.calls == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [5]]
    assert engine.max_batch_size == 4  # an error that also fails alone says nothing about batch size
    assert value(metrics, "diffusion_batch_splits_total") == 2
    assert value(metrics, "diffusion_isolated_failures_total") == 1


def test_a_request_that_fails_alone_gets_its_own_error_not_the_one_its_batch_raised():
    runner = ScriptedRunner(fails_above=2)
    engine, queue, _ = make_engine(runner, max_batch=4)
    done: list[Job] = []
    poison = submit(queue, "explode", (1,), done)
    others = [submit(queue, "other", (seed,), done) for seed in (2, 3, 4)]
    drain(engine, queue)
    assert str(poison.error) == "ValueError: the pipeline blew up"  # the batch of 4 raised a RuntimeError
    assert [job.error for job in others] == [None] * 3


def test_a_batch_that_fails_at_every_size_costs_at_most_two_calls_per_image():
    class BrokenRunner(ScriptedRunner):
        def generate(self, key, prompts, negative_prompts, seeds):
            self.calls.append(list(seeds))
            raise RuntimeError(f"broken for {list(seeds)}")

    runner = BrokenRunner()
    engine, queue, metrics = make_engine(runner, max_batch=4)
    done: list[Job] = []
    jobs = [submit(queue, "p", (seed,), done) for seed in (1, 2, 3, 4)]
    drain(engine, queue)
    assert [len(call) for call in runner.calls] == [4, 2, 1, 1, 2, 1, 1]  # 2n - 1 calls, then the loop ends
    assert [str(job.error) for job in jobs] == [f"RuntimeError: broken for [{seed}]" for seed in (1, 2, 3, 4)]
    assert len(done) == 4
    assert engine.max_batch_size == 4  # nothing ran, so nothing says smaller batches would
    assert value(metrics, "diffusion_batch_splits_total") == 3
    assert value(metrics, "diffusion_isolated_failures_total") == 4


def test_a_failed_job_spanning_batches_is_answered_once_and_its_rest_not_computed():
    runner = ScriptedRunner()
    engine, queue, _ = make_engine(runner, max_batch=2)
    done: list[Job] = []
    spanning = submit(queue, "explode", (1, 2, 3, 4, 5), done)
    drain(engine, queue)
    assert done == [spanning]
    assert runner.calls == [[1, 2], [1]]  # its second image is not retried once its first failed alone


def test_a_runner_returning_the_wrong_count_fails_the_job_instead_of_misdelivering():
    class ShortRunner(ScriptedRunner):
        def generate(self, key, prompts, negative_prompts, seeds):
            return super().generate(key, prompts, negative_prompts, seeds)[:-1]

    engine, queue, _ = make_engine(ShortRunner())
    done: list[Job] = []
    job = submit(queue, "p", (1, 2), done)
    drain(engine, queue)
    assert "returned 0 images for a batch of 1" in str(job.error)
    assert job.images == [None, None]


def test_busy_seconds_count_the_running_batch_up_to_now():
    clock = Clock()

    class SlowRunner(ScriptedRunner):
        def generate(self, key, prompts, negative_prompts, seeds):
            clock.now += 1.5  # the batch takes 1.5 s of the engine's clock
            observed.append(engine.busy_seconds())
            clock.now += 0.5
            return super().generate(key, prompts, negative_prompts, seeds)

    observed: list[float] = []
    queue = BatchQueue(capacity_images=8)
    engine = Engine(queue, SlowRunner(), BatchPolicy(max_batch_size=8, max_wait_s=0.0),
                    WorkerMetrics(CollectorRegistry()), clock=clock)
    submit(queue, "p", (1,), [])
    drain(engine, queue)
    assert observed == [1.5]
    assert engine.busy_seconds() == 2.0
    clock.now += 10
    assert engine.busy_seconds() == 2.0  # idle time is not busy


def test_queue_wait_is_observed_once_per_request_when_its_first_image_starts():
    runner = ScriptedRunner()
    engine, queue, metrics = make_engine(runner, max_batch=1)
    submit(queue, "p", (1, 2, 3), [])
    drain(engine, queue)
    assert value(metrics, "diffusion_queue_wait_seconds_count") == 1
    assert value(metrics, "diffusion_queue_wait_seconds_sum") == 1.0  # arrived 99.0, started 100.0


class FlakyRunner(ScriptedRunner):
    """Raises a RuntimeError for calls of more than 2 images while `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def generate(self, key, prompts, negative_prompts, seeds):
        if self.failing and len(seeds) > 2:
            self.calls.append(list(seeds))
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
        return super().generate(key, prompts, negative_prompts, seeds)


def run_full_batches(engine: Engine, queue: BatchQueue, count: int, size: int) -> None:
    done: list[Job] = []
    for index in range(count):
        submit(queue, f"p{index}", tuple(range(size)), done)
        run_due_batch(engine, queue)
    assert all(job.error is None for job in done)


def test_a_lowered_max_batch_is_probed_back_up_once_the_error_is_gone():
    """A transient error must not cost throughput for the life of the pod."""
    runner = FlakyRunner()
    engine, queue, _ = make_engine(runner, max_batch=4, probe_after=3)
    run_full_batches(engine, queue, 1, 4)
    assert engine.max_batch_size == 2
    runner.failing = False
    run_full_batches(engine, queue, 2, 2)
    assert engine.max_batch_size == 2  # not yet: 2 of 3 full batches
    run_full_batches(engine, queue, 1, 2)
    assert engine.max_batch_size == 4  # probed back up
    run_full_batches(engine, queue, 1, 4)
    assert engine.max_batch_size == 4 and [len(call) for call in runner.calls[-1:]] == [4]


def test_a_size_that_keeps_failing_is_probed_ever_more_rarely():
    runner = FlakyRunner()
    engine, queue, metrics = make_engine(runner, max_batch=4, probe_after=2)
    run_full_batches(engine, queue, 1, 4)
    run_full_batches(engine, queue, 2, 2)
    assert engine.max_batch_size == 4  # probing
    run_full_batches(engine, queue, 1, 4)  # the probe fails, and is retried as 2 + 2
    assert engine.max_batch_size == 2
    run_full_batches(engine, queue, 3, 2)
    assert engine.max_batch_size == 2  # the wait doubled to 4 full batches
    run_full_batches(engine, queue, 1, 2)
    assert engine.max_batch_size == 4
    assert value(metrics, "diffusion_batch_splits_total") == 2


def test_probing_never_exceeds_the_configured_max_batch():
    runner = ScriptedRunner(memory_images=2)
    engine, queue, _ = make_engine(runner, max_batch=3, probe_after=1)
    run_full_batches(engine, queue, 1, 3)
    assert engine.max_batch_size == 1  # out of memory at 3: halves of 1 and 2
    runner.memory_images = 1000
    run_full_batches(engine, queue, 1, 1)
    assert engine.max_batch_size == 2
    run_full_batches(engine, queue, 1, 2)
    assert engine.max_batch_size == 3
