"""What a replica can serve and what is asked of it: the throughput profile's arithmetic, the
engine's timing and capacity probe against a scripted runner on the engine's clock, the process
uptime from a /proc stat file, then the exports over real HTTP and from a real
`python -m worker serve`."""

from __future__ import annotations

import logging
import os
import time

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from contract import names
from worker.batching import BatchKey, BatchPolicy, BatchQueue, Job
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.service import WorkerLimits, WorkerService
from worker.throughput import ThroughputProfile
from worker.uptime import process_uptime_s

from .test_drain import start_process
from .test_http import in_background, queue_has

IMPORTED_AT = time.monotonic()  # this process started before this line ran
CAPACITY = names.CAPACITY_IMAGE_STEPS
THROUGHPUT = names.BATCH_THROUGHPUT
REQUESTED = names.REQUESTED_IMAGE_STEPS + "_total"
KEY = BatchKey(64, 64, steps=10, guidance_scale=7.5)


# -- the profile ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("calls", "profile"), [
    ([(4, 40, 2.0)], {4: 20.0}),  # the first sample is the mean
    ([(4, 40, 2.0), (4, 40, 1.0)], {4: 0.8 * 20.0 + 0.2 * 40.0}),
    ([(4, 40, 2.0), (4, 40, 1.0), (4, 40, 1.0)], {4: 0.8 * (0.8 * 20.0 + 0.2 * 40.0) + 0.2 * 40.0}),
    ([(1, 10, 1.0), (4, 40, 0.5)], {1: 10.0, 4: 80.0}),  # each size its own mean
    ([(4, 40, 0.0)], {}),  # a call timed at 0 s says nothing of a rate
])
def test_the_profile_is_a_moving_mean_of_image_steps_per_second_per_batch_size(calls, profile):
    throughput = ThroughputProfile()
    for batch_size, image_steps, seconds in calls:
        throughput.record(batch_size, image_steps, seconds)
    assert throughput.by_batch_size() == pytest.approx(profile)


@pytest.mark.parametrize(("profile", "max_batch_size", "capacity"), [
    ({}, 8, None),  # nothing measured: absent, not 0
    ({8: 100.0, 4: 80.0}, 8, 100.0),  # the max batch's own mean
    ({8: 70.0, 4: 80.0}, 8, 70.0),  # ... even when a smaller batch measured better
    ({2: 30.0, 4: 50.0}, 8, 50.0),  # until one at the max ran: the best smaller
    ({2: 60.0, 4: 50.0}, 8, 60.0),  # the best, not the largest
    ({4: 50.0, 8: 90.0}, 4, 50.0),  # a size above a lowered max is not served now
    ({8: 90.0}, 4, None),
])
def test_the_capacity_is_the_max_batchs_mean_else_the_best_smaller_one(profile, max_batch_size, capacity):
    throughput = ThroughputProfile()
    for size, rate in profile.items():
        throughput.record(size, int(rate * 10), 10.0)
    assert throughput.capacity(max_batch_size) == (pytest.approx(capacity) if capacity is not None else None)


@pytest.mark.parametrize("call", [(0, 10, 1.0), (1, 0, 1.0), (2, 20, -0.5)])
def test_the_profile_refuses_an_impossible_batch(call):
    with pytest.raises(ValueError):
        ThroughputProfile().record(*call)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5])
def test_the_profile_refuses_a_weight_outside_0_to_1(weight):
    with pytest.raises(ValueError, match="weight"):
        ThroughputProfile(weight)


# -- the engine: served batches and the probe -------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeOutOfMemory(Exception):
    pass


class TimedRunner:
    """Takes 0.5 s + 0.25 s per image of the engine's clock; out of memory above `memory_images`
    images; raises RuntimeError on every call when `broken`."""

    def __init__(self, clock: Clock, memory_images: int = 1000, broken: bool = False) -> None:
        self.clock = clock
        self.memory_images = memory_images
        self.broken = broken
        self.calls: list[int] = []
        self.released = 0

    @staticmethod
    def seconds(images: int) -> float:
        return 0.5 + 0.25 * images

    def generate(self, key, prompts, negative_prompts, seeds):
        self.calls.append(len(seeds))
        if self.broken:
            raise RuntimeError("the pipeline is broken")
        if len(seeds) > self.memory_images:
            raise FakeOutOfMemory(f"{len(seeds)} images do not fit")
        self.clock.now += self.seconds(len(seeds))
        return [seed for seed in seeds]

    def is_out_of_memory(self, error):
        return isinstance(error, FakeOutOfMemory)

    def release_memory(self):
        self.released += 1


def make_engine(max_batch_size: int = 4, **runner) -> tuple[Engine, BatchQueue, TimedRunner, WorkerMetrics]:
    clock = Clock()
    queue = BatchQueue(capacity_images=64)
    metrics = WorkerMetrics(CollectorRegistry())
    timed = TimedRunner(clock, **runner)
    engine = Engine(queue, timed, BatchPolicy(max_batch_size=max_batch_size, max_wait_s=0.0), metrics, clock=clock)
    return engine, queue, timed, metrics


def rate(images: int, steps: int = KEY.steps) -> float:
    """Image-steps per second of one scripted call."""
    return images * steps / TimedRunner.seconds(images)


def run(engine: Engine, queue: BatchQueue, images: int) -> None:
    queue.submit(Job(key=KEY, prompt="p", negative_prompt=None, seeds=tuple(range(images)), arrived_at=99.0))
    engine.run_batch(queue.poll(engine.batching, now=200.0))


def test_served_batches_are_timed_into_the_profile_and_the_capacity_follows_the_max_batch():
    engine, queue, _, _ = make_engine(max_batch_size=4)
    assert engine.capacity_image_steps_per_second() is None
    run(engine, queue, 2)
    assert engine.throughput.by_batch_size() == {2: pytest.approx(rate(2))}
    assert engine.capacity_image_steps_per_second() == pytest.approx(rate(2))  # the best smaller, until 4 ran
    run(engine, queue, 4)
    assert engine.capacity_image_steps_per_second() == pytest.approx(rate(4))
    # timed as the busy-seconds counter times it: both calls' seconds are the busy time
    assert engine.busy_seconds() == pytest.approx(TimedRunner.seconds(2) + TimedRunner.seconds(4))


def test_the_probe_measures_one_max_batch_and_moves_no_served_work_metric():
    engine, _, runner, metrics = make_engine(max_batch_size=4)
    assert engine.probe_capacity(KEY) == 4
    assert runner.calls == [4]
    assert engine.capacity_image_steps_per_second() == pytest.approx(rate(4))
    sample = metrics.registry.get_sample_value
    assert sample(names.IMAGES + "_total") == 0
    assert sample(names.BATCH_SIZE + "_count") == 0
    assert engine.busy_seconds() == 0


def test_out_of_memory_in_the_probe_halves_the_batch_lowers_the_max_batch_and_is_logged(caplog):
    engine, _, runner, _ = make_engine(max_batch_size=8, memory_images=3)
    with caplog.at_level(logging.WARNING, logger="worker.engine"):
        assert engine.probe_capacity(KEY) == 2
    assert runner.calls == [8, 4, 2] and runner.released == 2
    assert engine.max_batch_size == 2  # as a served batch's out-of-memory would; probed back up later
    assert engine.capacity_image_steps_per_second() == pytest.approx(rate(2))
    assert "capacity probe: out of memory at batch size 8" in caplog.text


def test_out_of_memory_at_one_image_leaves_the_capacity_unmeasured_and_the_worker_up(caplog):
    engine, _, runner, _ = make_engine(max_batch_size=2, memory_images=0)
    with caplog.at_level(logging.ERROR, logger="worker.engine"):
        assert engine.probe_capacity(KEY) == 0
    assert runner.calls == [2, 1] and engine.max_batch_size == 1
    assert engine.capacity_image_steps_per_second() is None
    assert "serving without a measured capacity" in caplog.text


def test_any_other_error_in_the_probe_fails_the_start():
    engine, _, _, _ = make_engine(broken=True)
    with pytest.raises(RuntimeError, match="broken"):
        engine.probe_capacity(KEY)


# -- the process's uptime ---------------------------------------------------------------------------

def stat_line(command: str, start_ticks: int) -> str:
    """A /proc/pid/stat line: pid, (command), then fields 3 to 52 with field 22 the start time."""
    fields = ["S", *["0"] * 18, str(start_ticks), *["0"] * 30]
    return f"4242 ({command}) {' '.join(fields)}\n"


def test_uptime_is_boottime_now_less_the_start_time_after_the_command_name(tmp_path):
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    started = int((time.clock_gettime(time.CLOCK_BOOTTIME) - 5.0) * ticks_per_s)
    stat = tmp_path / "stat"
    stat.write_text(stat_line("a) 1 2 (b", started))  # a command name may hold ') ' and digits
    assert process_uptime_s(str(stat)) == pytest.approx(5.0, abs=2 / ticks_per_s + 0.5)


def test_uptime_of_this_process_covers_the_time_since_this_module_loaded():
    uptime = process_uptime_s()
    assert uptime is not None and uptime >= time.monotonic() - IMPORTED_AT


def test_uptime_refuses_a_file_not_in_procs_format(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("4242 (short) S 1 2\n")
    with pytest.raises(ValueError, match="field 22"):
        process_uptime_s(str(stat))


def test_uptime_is_unknown_without_the_file(tmp_path):
    assert process_uptime_s(str(tmp_path / "no-such-stat")) is None


# -- over real HTTP, in-process (the fixture attaches without a probe, as --no-warm-up does) --------

def test_the_capacity_is_absent_before_any_batch_and_each_export_appears_after_a_request(start_worker):
    worker = start_worker(max_batch_size=4)
    before = worker.metrics()
    assert not [key for key in before if key[0] in (CAPACITY, THROUGHPUT)]
    assert before[(REQUESTED, ())] == 0
    assert before[(names.STARTUP_SECONDS, ())] > 0
    response = worker.post(n=2, num_inference_steps=3)
    assert response.status_code == 200, response.text
    after = worker.metrics()
    assert after[(REQUESTED, ())] == 6
    measured = after[(THROUGHPUT, ((names.BATCH_SIZE_LABEL, "2"),))]
    # one batch of 2 images x 3 steps, timed as the busy-seconds counter times it
    assert measured == pytest.approx(6 / after[(names.BUSY_SECONDS + "_total", ())])
    assert after[(CAPACITY, ())] == measured  # no batch of 4 yet: the best smaller


def test_the_demand_counts_a_request_refused_for_a_full_queue_and_not_an_invalid_one(start_worker):
    worker = start_worker(max_batch_size=1, max_queue_images=1)
    worker.runner.hold()
    pool, running = in_background(worker, [{"prompt": "running", "num_inference_steps": 2}])
    worker.runner.entered.wait(10)
    pool2, queued = in_background(worker, [{"prompt": "queued", "num_inference_steps": 3}])
    queue_has(worker, 1)
    assert worker.post(prompt="refused", num_inference_steps=5).status_code == 429
    assert worker.post(prompt="", num_inference_steps=7).status_code == 422  # invalid for the schema
    assert worker.post(n=2, num_inference_steps=11).status_code == 422  # n over the queue: invalid here
    assert worker.post(size="1032x64", num_inference_steps=13).status_code == 422  # over --max-image-side
    assert worker.metric(REQUESTED) == 2 + 3 + 5
    worker.runner.release()
    assert running[0].result().status_code == 200 and queued[0].result().status_code == 200
    assert worker.metric(REQUESTED) == 2 + 3 + 5  # counted on arrival, once
    pool.shutdown(), pool2.shutdown()


# -- a real `python -m worker serve`: the warm-up measures the capacity before readiness -------------

def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_served_worker_is_ready_with_its_capacity_measured_and_its_startup_covering_the_load(tiny_model):
    process, url = start_process(tiny_model, "--max-batch-size", "2")
    try:
        exported = samples(url)
    finally:
        process.kill()
        process.wait()
    load, warm_up = exported[(names.MODEL_LOAD, ())], exported[(names.WARM_UP_SECONDS, ())]
    assert exported[(names.STARTUP_SECONDS, ())] >= load + warm_up and load > 0 and warm_up > 0
    probed = exported[(THROUGHPUT, ((names.BATCH_SIZE_LABEL, "2"),))]  # the probe: 2 images x 20 steps
    assert exported[(CAPACITY, ())] == probed > 0
    # the probe is not served work, and nobody asked for anything yet
    assert exported[(REQUESTED, ())] == 0 and exported[(names.IMAGES + "_total", ())] == 0


def test_the_load_and_warm_up_seconds_are_absent_until_measured_then_exported(tiny_runner):
    service = WorkerService(WorkerLimits(), WorkerMetrics(CollectorRegistry()))
    before = {family.name for family in service.metrics.registry.collect()}
    assert names.MODEL_LOAD not in before and names.WARM_UP_SECONDS not in before  # not 0: absent
    service.attach(tiny_runner, tiny_runner.defaults(), 1.5, loaded_at=time.perf_counter() - 0.25)
    after = {family.name: family.samples[0].value for family in service.metrics.registry.collect()
             if family.samples}
    assert after[names.MODEL_LOAD] == 1.5 and after[names.WARM_UP_SECONDS] >= 0.25
    service.queue.close()
    assert service.engine.join(5.0)
