"""Pull mode against a real redis-server: the consumer feeding a real batcher and the tiny pipeline.

Jobs are enqueued with the protocol's own ENQUEUE script (what the gateway runs); consumers run
in-process on their own event loop, except for the SIGTERM test, which runs `python -m worker
serve --queue` for real. Faults are injected at the pipeline boundary (`BoundaryRunner`) and by
acting as a consumer that dies (reading entries and never acknowledging them).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
import requests
from PIL import Image
from prometheus_client import CollectorRegistry

from contract import jobqueue, names
from lab.localprom import free_port
from worker.__main__ import build_parser, main, queue_config
from worker.batching import BatchPolicy
from worker.metrics import WorkerMetrics
from worker.queue import QueueConsumer
from worker.queueconfig import QueueConfig
from worker.service import ImageSpec, WorkerLimits, WorkerService

from .conftest import REPO, BoundaryRunner

KEYS = jobqueue.QueueKeys()


def enqueue(client, prompt: str = "a lighthouse at dusk", *, request: str | None = None, deadline_s: float = 600,
            **fields) -> str:
    """Runs ENQUEUE as the gateway would; returns the new job's id."""
    job_id = uuid.uuid4().hex
    body = request if request is not None else json.dumps({"prompt": prompt, "num_inference_steps": 1, **fields})
    now = time.time()
    created = client.eval(jobqueue.ENQUEUE, 3, KEYS.job(job_id), KEYS.stream, KEYS.job(job_id),
                          job_id, body, now, now + deadline_s, 0, 0)
    assert int(created[1]) == 1
    return job_id


def job(client, job_id: str) -> dict:
    return jobqueue.decode(client.hgetall(KEYS.job(job_id)))


def wait_for(condition: Callable[[], object], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s:g} s"
        time.sleep(0.02)


def ended(client, *job_ids: str) -> bool:
    return all(job(client, job_id).get("status") in jobqueue.FINAL for job_id in job_ids)


def pending(client) -> int:
    """Entries delivered and not acknowledged; 0 before any consumer made the group."""
    try:
        return int(client.xpending(KEYS.stream, KEYS.group)["pending"])
    except redis.ResponseError as error:
        assert "NOGROUP" in str(error)
        return 0


def die_holding(client, count: int = 1, start: bool = False) -> list[str]:
    """Acts as a consumer that reads entries (and STARTs them) and dies without acknowledging."""
    try:
        client.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    except redis.ResponseError as error:
        assert "BUSYGROUP" in str(error)
    [[_, entries]] = client.xreadgroup(KEYS.group, "ghost", {KEYS.stream: ">"}, count=count)
    for _, fields in entries:
        if start:
            client.eval(jobqueue.START, 1, KEYS.job(fields[b"job"].decode()), "ghost", time.time(), 3)
    return [entry_id.decode() for entry_id, _ in entries]


@dataclass
class Puller:
    """A worker in pull mode, in-process: service, batcher, pipeline thread and consumer."""

    service: WorkerService
    runner: BoundaryRunner
    consumer: QueueConsumer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stopped: bool = False

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels)

    def jobs(self, outcome: str) -> float:
        return self.metric(names.QUEUE_JOBS + "_total", **{names.JOB_OUTCOME_LABEL: outcome})

    def counted(self, timeout_s: float = 10.0, **expected: int) -> bool:
        """Waits until the job-outcome counters read `expected` (outcome=count) and returns True.
        A job is counted just after its FINISH lands in Redis, so a test that has seen Redis's
        state may read the counter a moment early; a count that overshoots fails here too."""
        wait_for(lambda: all(self.jobs(outcome) == count for outcome, count in expected.items()), timeout_s,
                 what=f"job outcomes counted as {expected}")
        return True

    def call(self, coroutine, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """What the server does on SIGTERM: stop pulling, let the batcher finish, FINISH what is in hand."""
        async def sequence() -> bool:
            await self.consumer.stop_pulling()
            drained = await self.service.drain(timeout_s)
            return await self.consumer.finish(timeout_s) and drained

        self.stopped = True
        return self.call(sequence())

    def close(self) -> None:
        self.runner.release()
        if not self.stopped:
            self.drain()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def pull_worker(tiny_runner, config: QueueConfig, max_batch_size: int = 4, max_wait_s: float = 0.05,
                max_queue_images: int = 64) -> Puller:
    """A pull-mode worker in-process on `config`'s queue: the tiny pipeline behind the real
    service and consumer, on an event loop thread of its own."""
    service = WorkerService(WorkerLimits(batching=BatchPolicy(max_batch_size, max_wait_s),
                                         max_queue_images=max_queue_images),
                            WorkerMetrics(CollectorRegistry()))
    runner = BoundaryRunner(tiny_runner)
    service.attach(runner, tiny_runner.defaults(), tiny_runner.load_seconds)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> QueueConsumer:
        consumer = QueueConsumer(config, service)
        consumer.start()
        return consumer

    return Puller(service, runner, asyncio.run_coroutine_threadsafe(make(), loop).result(10), loop, thread)


@pytest.fixture
def start_puller(tiny_runner, redis_server):
    started: list[Puller] = []

    def start(max_batch_size: int = 4, max_wait_s: float = 0.05, max_queue_images: int = 64, **queue) -> Puller:
        puller = pull_worker(tiny_runner, QueueConfig(url=redis_server.url, **queue), max_batch_size, max_wait_s,
                             max_queue_images)
        started.append(puller)
        return puller

    yield start
    for puller in started:
        puller.close()


@pytest.fixture
def client(redis_server):
    with redis_server.client() as client:
        yield client


def test_pulled_jobs_complete_with_their_images_stored_and_their_entries_deleted(start_puller, client):
    job_ids = [enqueue(client, f"harbour {index}", seed=100 + index, n=1 + index % 2) for index in range(5)]
    puller = start_puller(result_ttl_s=120)
    wait_for(lambda: ended(client, *job_ids), what="every job ended")
    for index, job_id in enumerate(job_ids):
        stored = job(client, job_id)
        assert stored["status"] == jobqueue.DONE, stored
        assert [image["seed"] for image in stored["result"]] == [100 + index + k for k in range(1 + index % 2)]
        for image in stored["result"]:
            assert Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))).size == (64, 64)
        assert stored["attempts"] == "1" and stored["consumer"] == puller.consumer.name
        assert float(stored["started_at"]) <= float(stored["computed_at"]) <= float(stored["finished_at"])
        assert 0 < client.ttl(KEYS.job(job_id)) <= 120  # the result expires after --result-ttl
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0
    assert puller.counted(done=5)
    # the request metrics count queue jobs as they count HTTP requests
    assert puller.metric(names.REQUESTS + "_total", outcome="ok") == 5
    assert puller.metric(names.IMAGES + "_total") == 7
    assert puller.metric(names.QUEUE_IN_HAND) == 0


def test_a_busy_worker_pulls_one_batch_beyond_the_running_one_and_leaves_the_rest_undelivered(
    start_puller, client
):
    job_ids = [enqueue(client, f"field {index}", seed=index) for index in range(12)]
    puller = start_puller(max_batch_size=4, max_wait_s=0.5)
    puller.runner.hold()
    assert puller.runner.entered.wait(30), "the first batch never reached the pipeline"
    time.sleep(1.5)  # over a pull's block time: a consumer that prefetched deeper would have by now
    assert pending(client) == 8  # in hand: the batch running and the next one forming
    [group] = client.xinfo_groups(KEYS.stream)
    assert group["entries-read"] == 8  # the other four were never delivered to anyone
    assert puller.metric(names.QUEUE_IN_HAND) == 8
    puller.runner.release()
    wait_for(lambda: ended(client, *job_ids), what="every job ended")
    assert [len(seeds) for _, _, seeds in puller.runner.calls[:1]] == [4]  # the pulled jobs ran as one batch
    assert puller.metric(names.BATCH_SIZE + "_sum") == 12
    assert puller.metric(names.BATCH_SIZE + "_count") < 12  # batches of more than one job
    assert puller.counted(done=12) and client.xlen(KEYS.stream) == 0


def test_a_pull_counts_each_jobs_images_so_big_requests_do_not_fill_the_hand_with_entries(start_puller, client):
    job_ids = [enqueue(client, f"triptych {index}", seed=index, n=3) for index in range(5)]
    assert [fields[b"images"] for _, fields in client.xrange(KEYS.stream)] == [b"3"] * 5
    puller = start_puller(max_batch_size=4, max_wait_s=0.5)
    puller.runner.hold()
    assert puller.runner.entered.wait(30), "the first batch never reached the pipeline"
    time.sleep(1.5)  # over a pull's block time
    # two batches are 8 images: three entries of 3 reach that (the last one over), not all five
    assert pending(client) == 3 and puller.metric(names.QUEUE_IN_HAND) == 3
    puller.runner.release()
    wait_for(lambda: ended(client, *job_ids), what="every job ended")
    assert puller.counted(done=5) and puller.metric(names.IMAGES + "_total") == 15


def test_an_entry_without_a_readable_image_count_counts_one(client):
    enqueue(client, request="{not json")
    enqueue(client, request=json.dumps({"prompt": "odd", "n": 2.5}))
    enqueue(client, n=10)
    assert [fields[b"images"] for _, fields in client.xrange(KEYS.stream)] == [b"1", b"1", b"10"]
    assert jobqueue.entry_images({}) == 1 and jobqueue.entry_images({"images": "x"}) == 1
    assert jobqueue.entry_images({"images": "4"}) == 4


def test_a_job_past_its_deadline_is_not_computed(start_puller, client):
    late = enqueue(client, "too late", deadline_s=-1)
    fine = enqueue(client, "in time")
    puller = start_puller()
    wait_for(lambda: ended(client, late, fine), what="both jobs ended")
    stored = job(client, late)
    assert stored["status"] == jobqueue.EXPIRED and "deadline" in stored["error"] and "started_at" not in stored
    assert [prompts for _, prompts, _ in puller.runner.calls] == [["in time"]]
    assert puller.metric(names.IMAGES + "_total") == 1
    assert puller.counted(expired=1, done=1)
    assert client.xlen(KEYS.stream) == 0


def test_a_job_cancelled_while_queued_is_never_computed(start_puller, client):
    cancelled = enqueue(client, "never mind")
    assert client.eval(jobqueue.CANCEL, 2, KEYS.job(cancelled), KEYS.done(cancelled), time.time(), 60) == b"queued"
    fine = enqueue(client, "go ahead")
    puller = start_puller()
    wait_for(lambda: ended(client, fine) and client.xlen(KEYS.stream) == 0, what="the stream emptied")
    assert job(client, cancelled)["status"] == jobqueue.CANCELLED
    assert [prompts for _, prompts, _ in puller.runner.calls] == [["go ahead"]]
    assert puller.counted(cancelled=1, done=1)


def test_a_job_cancelled_in_a_workers_hand_leaves_its_batcher_uncomputed(start_puller, client):
    puller = start_puller(max_batch_size=1, status_check_s=0.1)
    puller.runner.hold()
    first = enqueue(client, "first")
    assert puller.runner.entered.wait(30)
    second = enqueue(client, "cancelled behind the first")
    wait_for(lambda: job(client, second).get("status") == jobqueue.RUNNING, what="the second job started")
    assert client.eval(jobqueue.CANCEL, 2, KEYS.job(second), KEYS.done(second), time.time(), 60) == b"running"
    wait_for(lambda: puller.jobs("cancelled") == 1, what="the cancel seen by the worker")
    assert puller.metric(names.QUEUE_IN_HAND) == 1 and puller.service.queue.waiting_jobs == 0
    puller.runner.release()
    wait_for(lambda: ended(client, first) and client.xlen(KEYS.stream) == 0, what="the stream emptied")
    assert [prompts for _, prompts, _ in puller.runner.calls] == [["first"]]
    assert job(client, second)["status"] == jobqueue.CANCELLED and puller.counted(done=1)


def test_a_job_whose_deadline_passes_in_the_batcher_ends_expired_uncomputed(start_puller, client):
    puller = start_puller(max_batch_size=1)
    puller.runner.hold()
    first = enqueue(client, "first")
    assert puller.runner.entered.wait(30)
    late = enqueue(client, "waits past its deadline", deadline_s=1.0)
    wait_for(lambda: job(client, late).get("status") == jobqueue.RUNNING, what="the job started in time")
    time.sleep(1.5)
    puller.runner.release()
    wait_for(lambda: ended(client, first, late), what="both jobs ended")
    stored = job(client, late)
    assert stored["status"] == jobqueue.EXPIRED and "before its batch started" in stored["error"]
    assert "result" not in stored and "computed_at" not in stored
    assert [prompts for _, prompts, _ in puller.runner.calls] == [["first"]]
    assert puller.counted(expired=1, done=1)
    assert puller.metric(names.REQUESTS + "_total", outcome="timeout") == 1


def test_a_poison_job_fails_alone_and_the_others_of_its_batch_complete(start_puller, client):
    invalid = enqueue(client, request=json.dumps({"prompt": "", "num_inference_steps": 1}))
    not_json = enqueue(client, request="{not json")
    poison = enqueue(client, "poison")
    fine = [enqueue(client, f"fine {index}") for index in range(3)]
    puller = start_puller(max_batch_size=4, max_wait_s=0.3)
    puller.runner.explode_on = "poison"
    wait_for(lambda: ended(client, invalid, not_json, poison, *fine), what="every job ended")
    assert job(client, invalid)["status"] == jobqueue.FAILED
    assert job(client, invalid)["error"].startswith("invalid request: prompt:")
    assert job(client, not_json)["error"].startswith("invalid request: ")
    assert job(client, poison)["status"] == jobqueue.FAILED
    assert "injected pipeline failure" in job(client, poison)["error"]
    assert [job(client, job_id)["status"] for job_id in fine] == [jobqueue.DONE] * 3
    assert puller.counted(failed=3, done=3)
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0


def test_the_demand_counts_each_pulled_job_once_while_it_waits_out_a_full_batcher_and_no_invalid_one(
    start_puller, client
):
    requested = names.REQUESTED_IMAGE_STEPS + "_total"
    puller = start_puller(max_batch_size=1, max_wait_s=0.0, max_queue_images=1)
    puller.runner.hold()

    def direct(prompt: str):  # a request of the direct API, 1 image at 2 steps
        return asyncio.run_coroutine_threadsafe(puller.service.generate(
            ImageSpec(prompt, None, 1, None, None, 2, 7.5, 1), lambda: asyncio.sleep(3600)), puller.loop)

    running = direct("running")
    assert puller.runner.entered.wait(30), "the first request never reached the pipeline"
    waiting = direct("filling the batcher")
    wait_for(lambda: puller.service.queue.waiting_images == 1, what="the batcher full")
    invalid = enqueue(client, request=json.dumps({"prompt": "", "num_inference_steps": 9}))
    pulled = enqueue(client, "pulled", num_inference_steps=5)
    wait_for(lambda: puller.metric(names.REQUESTS + "_total", outcome="rejected") >= 2, what="two tries refused")
    assert puller.metric(requested) == 2 + 2 + 5
    puller.runner.release()
    wait_for(lambda: ended(client, pulled, invalid), what="both jobs ended")
    assert job(client, pulled)["status"] == jobqueue.DONE and job(client, invalid)["status"] == jobqueue.FAILED
    assert [len(future.result(30).images) for future in (running, waiting)] == [1, 1]
    assert puller.metric(requested) == 2 + 2 + 5  # once however many tries; the invalid job not at all


def test_a_job_that_keeps_killing_its_consumers_is_dead_lettered(start_puller, client):
    poison = enqueue(client, "kills every worker")
    die_holding(client)
    client.hset(KEYS.job(poison), "attempts", 3)  # three consumers died on it already
    puller = start_puller(claim_idle_s=0.5, max_deliveries=3)
    wait_for(lambda: ended(client, poison), what="the job ended")
    stored = job(client, poison)
    assert stored["status"] == jobqueue.FAILED
    assert stored["error"].startswith("dead-lettered after 4 deliveries (more than --max-deliveries 3)")
    [(_, letter)] = client.xrange(KEYS.dead)
    assert letter[b"job"].decode() == poison and letter[b"attempts"] == b"4"
    assert letter[b"error"].decode() == stored["error"]
    assert puller.runner.calls == []
    assert puller.counted(dead_lettered=1) and puller.metric(names.QUEUE_RECLAIMED + "_total") == 1
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0


def test_a_job_whose_hash_is_gone_is_dead_lettered_and_counted_missing(start_puller, client):
    lost = enqueue(client, "evicted")
    client.delete(KEYS.job(lost))  # what an eviction policy other than noeviction does under memory pressure
    fine = enqueue(client, "kept")
    puller = start_puller()
    wait_for(lambda: ended(client, fine) and client.xlen(KEYS.stream) == 0, what="the stream emptied")
    [(_, letter)] = client.xrange(KEYS.dead)
    assert letter[b"job"].decode() == lost and b"maxmemory-policy noeviction" in letter[b"error"]
    assert puller.counted(missing=1, done=1) and pending(client) == 0


def finish(client, job_id: str, entry_id: str, status: str = jobqueue.FAILED, dead_letter: bool = True) -> int:
    keys = [KEYS.job(job_id), KEYS.stream, KEYS.done(job_id)] + ([KEYS.dead] if dead_letter else [])
    args = [KEYS.group, entry_id, status, "error", "poison", time.time(), 60, ""]
    return client.eval(jobqueue.FINISH, len(keys), *keys, *args, *([job_id, 4, 100] if dead_letter else []))


def test_finish_dead_letters_only_a_job_it_ends_and_only_once(client):
    ended_elsewhere, poison, lost = enqueue(client, "a"), enqueue(client, "b"), enqueue(client, "c")
    entries = dict(zip((ended_elsewhere, poison, lost), die_holding(client, count=3)))
    client.hset(KEYS.job(ended_elsewhere), "status", jobqueue.DONE)
    client.delete(KEYS.job(lost))
    for _ in range(2):  # the second call is a retry after a lost reply
        finish(client, ended_elsewhere, entries[ended_elsewhere])
        finish(client, poison, entries[poison])
        finish(client, lost, entries[lost])
    letters = [(letter[b"job"].decode(), letter[b"attempts"]) for _, letter in client.xrange(KEYS.dead)]
    assert letters == [(poison, b"4"), (lost, b"4")]
    assert job(client, poison)["status"] == jobqueue.FAILED and job(client, ended_elsewhere)["status"] == jobqueue.DONE
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0
    # without the dead-letter key, FINISH is what it was: no dead letter
    plain = enqueue(client, "d")
    [entry] = die_holding(client)
    assert finish(client, plain, entry, dead_letter=False) == 1 and client.xlen(KEYS.dead) == 2


def start(client, job_id: str, consumer: str, *delivery: str) -> list:
    return client.eval(jobqueue.START, 1, KEYS.job(job_id), consumer, time.time(), 3, *delivery)


def test_start_counts_a_delivery_once_however_often_it_is_retried(client):
    job_id = enqueue(client)
    assert start(client, job_id, "worker-a") == [b"run", 1]
    assert start(client, job_id, "worker-a") == [b"run", 1]  # a retry after a lost reply: the same delivery
    assert start(client, job_id, "worker-b") == [b"run", 2]  # reclaimed by another consumer
    assert start(client, job_id, "worker-b", "worker-b/1") == [b"run", 3]  # a new delivery token
    assert start(client, job_id, "worker-b", "worker-b/1") == [b"run", 3]
    assert start(client, job_id, "worker-b", "worker-b/2") == [b"dead", 4]  # reclaimed by itself: counts
    assert job(client, job_id)["consumer"] == "worker-b"


def test_a_dead_consumers_job_is_reclaimed_after_the_claim_idle_time(start_puller, client):
    orphan = enqueue(client, "orphan", seed=5)
    died_at = time.time()
    die_holding(client, start=True)  # it died computing: status running, one attempt
    puller = start_puller(claim_idle_s=1.0)
    wait_for(lambda: ended(client, orphan), what="the orphan ended")
    stored = job(client, orphan)
    assert stored["status"] == jobqueue.DONE and stored["consumer"] == puller.consumer.name
    assert stored["attempts"] == "2"
    assert float(stored["started_at"]) - died_at >= 1.0  # not taken before it was idle for --claim-idle
    assert puller.metric(names.QUEUE_RECLAIMED + "_total") == 1 and puller.counted(done=1)
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0


def test_a_slow_live_worker_keeps_its_job_through_the_heartbeat(start_puller, client):
    slow = start_puller(claim_idle_s=1.0)
    slow.runner.hold()
    job_id = enqueue(client, "takes a while")
    assert slow.runner.entered.wait(30)
    other = start_puller(claim_idle_s=1.0)
    time.sleep(3.5)  # three and a half claim-idle times with the job in one pipeline call
    [entry] = client.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
    assert entry["consumer"].decode() == slow.consumer.name and entry["times_delivered"] == 1
    slow.runner.release()
    wait_for(lambda: ended(client, job_id), what="the job ended")
    assert job(client, job_id)["attempts"] == "1" and job(client, job_id)["consumer"] == slow.consumer.name
    assert other.runner.calls == [] and other.metric(names.QUEUE_RECLAIMED + "_total") == 0
    assert slow.counted(done=1) and other.counted(duplicate=0)


def test_the_heartbeat_never_takes_back_an_entry_another_consumer_reclaimed(start_puller, client):
    stalled = start_puller(claim_idle_s=3.0)
    stalled.runner.hold()
    job_id = enqueue(client, "taken over")
    assert stalled.runner.entered.wait(30)
    [entry] = client.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
    # another consumer took it over, as if this one had stalled past --claim-idle
    client.xclaim(KEYS.stream, KEYS.group, "rescuer", 0, [entry["message_id"]], justid=True)
    time.sleep(2.0)  # two heartbeat periods, less than --claim-idle: nobody may reclaim it from the rescuer
    [entry] = client.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
    assert entry["consumer"] == b"rescuer"
    stalled.runner.release()
    wait_for(lambda: ended(client, job_id), what="the job ended")
    assert stalled.counted(done=1) and client.xlen(KEYS.stream) == 0 and pending(client) == 0


def test_a_redis_outage_keeps_the_job_in_hand_and_its_result_lands_after(start_puller, client, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="worker.queue")
    puller = start_puller(max_batch_size=2)
    puller.runner.hold()
    job_id = enqueue(client, "through the outage", seed=9)
    assert puller.runner.entered.wait(30)
    redis_server.stop()
    wait_for(lambda: (puller.service.unready_reason or "").startswith("job queue unreachable"), timeout_s=30,
             what="readiness false while Redis is down")
    assert not puller.service.ready
    puller.runner.release()
    wait_for(lambda: puller.metric(names.IMAGES + "_total") == 1, what="the image computed")
    time.sleep(1.0)  # its FINISH retries against a dead server
    redis_server.start()
    wait_for(lambda: ended(client, job_id), timeout_s=30, what="the result stored after the outage")
    stored = job(client, job_id)
    assert stored["status"] == jobqueue.DONE and [image["seed"] for image in stored["result"]] == [9]
    assert client.xlen(KEYS.stream) == 0 and pending(client) == 0
    wait_for(lambda: puller.service.ready, what="ready again")
    outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outages) == 1, [r.getMessage() for r in outages]  # logged once per outage
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_sigterm_finishes_the_jobs_in_hand_leaves_the_rest_queued_and_exits_0(tiny_model, client, redis_server):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--model", str(tiny_model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--no-warm-up", "--max-batch-size", "2", "--max-wait-ms", "20",
         "--queue", redis_server.url, "--claim-idle", "30"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        job_ids = [enqueue(client, f"slow {index}", seed=index, num_inference_steps=12, size="128x128")
                   for index in range(8)]
        wait_for(lambda: process.poll() is not None or pending(client) > 0, timeout_s=120, what="jobs in hand")
        assert process.poll() is None, process.stdout.read()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 503, timeout_s=2,
                 what="readiness false at once")
        assert process.wait(timeout=60) == 0
        statuses = [job(client, job_id) for job_id in job_ids]
        done = [stored for stored in statuses if stored["status"] == jobqueue.DONE]
        queued = [stored for stored in statuses if stored["status"] == jobqueue.QUEUED]
        assert len(done) + len(queued) == 8 and 1 <= len(done) <= 4 and queued
        assert all(stored["attempts"] == "0" for stored in queued)  # never delivered: left for others
        assert pending(client) == 0 and client.xlen(KEYS.stream) == len(queued)
        assert client.xinfo_consumers(KEYS.stream, KEYS.group) == []  # it left the group holding nothing
        assert "drain complete" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flags", [["--claim-idle", "0"], ["--max-deliveries", "0"], ["--result-ttl", "-5"],
                                   ["--claim-idle", "soon"]])
def test_serve_refuses_bad_pull_mode_values(flags, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", "m", "--queue", "redis://127.0.0.1:6379/0", *flags])
    assert exit.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_serve_refuses_a_queue_url_with_a_password_and_never_echoes_it(capsys):
    assert main(["serve", "--model", "m", "--queue", "redis://:hunter2@127.0.0.1:6379/0"]) == 2
    err = capsys.readouterr().err
    assert "--queue carries a password" in err and "--redis-password-file" in err and "hunter2" not in err
    assert main(["serve", "--model", "m", "--queue", "http://127.0.0.1:6379"]) == 2
    assert "redis://" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--queue", "redis://127.0.0.1/0", "--redis-password-file", "/no/such"]) == 2
    assert "--redis-password-file /no/such" in capsys.readouterr().err


def test_pull_mode_flags_come_from_the_environment_and_the_password_from_a_file(monkeypatch, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    for name, value in {"QUEUE": "redis://redis:6379/2", "STREAM": "jobs:sd15", "GROUP": "pool",
                        "CLAIM_IDLE": "30", "MAX_DELIVERIES": "5", "RESULT_TTL": "600",
                        "REDIS_PASSWORD_FILE": str(secret), "REDIS_PASSWORD": "from-env"}.items():
        monkeypatch.setenv(f"WORKER_{name}", value)
    config = queue_config(build_parser().parse_args(["serve", "--model", "m"]))
    assert (config.url, config.stream, config.group, config.claim_idle_s, config.max_deliveries,
            config.result_ttl_s, config.access.password) == ("redis://redis:6379/2", "jobs:sd15", "pool", 30.0, 5, 600,
                                                       "s3cret")
    assert "s3cret" not in repr(config)
    monkeypatch.delenv("WORKER_REDIS_PASSWORD_FILE")
    assert queue_config(build_parser().parse_args(["serve", "--model", "m"])).access.password == "from-env"
    monkeypatch.delenv("WORKER_QUEUE")
    assert queue_config(build_parser().parse_args(["serve", "--model", "m"])) is None
