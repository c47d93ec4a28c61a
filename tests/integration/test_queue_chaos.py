"""No lost or doubled work: 1,000 jobs through three pull-mode workers (`python -m worker serve
--queue`, tiny model, CPU) while workers are killed with SIGKILL at random and restarted, and
Redis crashes (SIGKILL; append-only file, fsync always) and comes back once.

Every accepted job (ENQUEUE answered for its id) must end exactly once (FINISH counts its
writes in the job's `completions`): done, with its own images, or, for the jobs given a
deadline of a few seconds (one in ten, and every job enqueued around the Redis crash), expired
with no result. None may start, or begin computing, after its deadline. The figures (kills,
reclaims, duplicates computed, expired jobs, wall time) are printed for the record; run with
`-s` to see them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from contract import jobqueue, names
from lab.localprom import free_port
from tests.worker.conftest import REPO, tiny_model  # noqa: F401 - the model fixture, built by the real CLI

pytestmark = pytest.mark.integration

JOBS = 1_000
WORKERS = 3
ARRIVALS_S = 40.0  # the jobs arrive evenly over this long, through the Redis crash
KILL_EVERY_S = (4.0, 8.0)  # a random pause between kills
CLAIM_IDLE_S = 3.0
SHORT_DEADLINE_S = (2.0, 5.0)  # the deadlines that fall inside a kill's reclaim or the Redis crash
CRASH_AT = JOBS // 2  # Redis crashes once this many jobs are accepted
KEYS = jobqueue.QueueKeys()


@dataclass
class Worker:
    """One `python -m worker serve --queue` process, its log in a file."""

    process: subprocess.Popen
    url: str
    started_at: float

    def samples(self) -> list:
        """Its metric samples now ([] if it does not answer)."""
        try:
            text = requests.get(f"{self.url}/metrics", timeout=2).text
        except requests.RequestException:
            return []
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def figures(self) -> dict[str, float]:
        """Its reclaims and its jobs by outcome, so far."""
        figures: dict[str, float] = {}
        for sample in self.samples():
            if sample.name == names.QUEUE_RECLAIMED + "_total":
                figures["reclaimed"] = sample.value
            elif sample.name == names.QUEUE_JOBS + "_total":
                figures[sample.labels[names.JOB_OUTCOME_LABEL]] = sample.value
        return figures

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def in_hand(self) -> float:
        return next((sample.value for sample in self.samples() if sample.name == names.QUEUE_IN_HAND), 0.0)


def spawn(model: Path, redis_url: str, log: Path, index: int) -> Worker:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOSTNAME": f"chaos-{index}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--no-warm-up", "--max-batch-size", "8", "--max-wait-ms", "50",
         "--queue", redis_url, "--claim-idle", str(CLAIM_IDLE_S), "--max-deliveries", "20", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
    )
    return Worker(process, f"http://127.0.0.1:{port}", time.monotonic())


@dataclass
class Enqueuer:
    """Enqueues the jobs at a steady pace, retrying through the Redis outage with an
    idempotency key, so a retry whose first try landed is the same job, not a second one."""

    client: redis.Redis
    chance: random.Random
    accepted: dict[str, int] = field(default_factory=dict)  # job id -> its seed
    short: set[str] = field(default_factory=set)  # the jobs with a deadline of a few seconds
    retries: int = 0  # ENQUEUE calls that met the outage
    error: BaseException | None = None
    started: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted_ids(self) -> list[str]:
        with self.lock:
            return list(self.accepted)

    def run(self) -> None:
        try:
            for index in range(JOBS):
                due = self.started + index * ARRIVALS_S / JOBS
                time.sleep(max(0.0, due - time.monotonic()))
                around_crash = CRASH_AT - 10 <= index < CRASH_AT + 20
                deadline_s = self.chance.uniform(*SHORT_DEADLINE_S) if index % 10 == 7 or around_crash else 600.0
                self._enqueue(f"chaos-{index:04d}", index, deadline_s)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def start(self) -> threading.Thread:
        self.started = time.monotonic()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def _enqueue(self, job_id: str, seed: int, deadline_s: float) -> None:
        # one step without classifier-free guidance: the least compute a real pipeline call takes
        request = json.dumps({"prompt": f"job {seed}", "seed": seed, "num_inference_steps": 1, "guidance_scale": 1.0})
        while True:
            now = time.time()
            deadline = now + deadline_s
            try:
                created_id, created = self.client.eval(
                    jobqueue.ENQUEUE, 3, KEYS.job(job_id), KEYS.stream, KEYS.idempotency(job_id),
                    job_id, request, now, deadline, 3600, 0)
            except (redis.ConnectionError, redis.TimeoutError):
                self.retries += 1
                time.sleep(0.2)
                continue
            # 0: the idempotency key's job, this very one, created by a try whose answer was lost
            assert created_id.decode() == job_id and int(created) in (0, 1)
            with self.lock:
                self.accepted[job_id] = seed
                if deadline_s < 600:
                    self.short.add(job_id)
            return


def statuses(client: redis.Redis, job_ids: list[str]) -> list[str | None]:
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(KEYS.job(job_id), "status")
    return [value.decode() if value else None for value in pipe.execute()]


@pytest.mark.timeout(600)
def test_a_thousand_jobs_through_killed_workers_and_a_redis_crash_end_exactly_once(tiny_model, redis_server, tmp_path):
    chaos = random.Random(13)  # which busy worker dies
    logs = [tmp_path / f"worker-{index}.log" for index in range(WORKERS)]
    workers = [spawn(tiny_model, redis_server.url, logs[index], index) for index in range(WORKERS)]
    client = redis.Redis.from_url(redis_server.url)
    enqueuer = Enqueuer(redis.Redis.from_url(redis_server.url), random.Random(7))
    figures = {"reclaimed": 0.0, "duplicate": 0.0}
    kills = 0
    restarted_redis = False
    try:
        deadline = time.monotonic() + 240
        while not all(worker.ready() for worker in workers):
            assert time.monotonic() < deadline, "the workers never became ready"
            time.sleep(0.5)
        began = time.monotonic()
        feeding = enqueuer.start()
        next_report = began
        next_kill = began + chaos.uniform(*KILL_EVERY_S)
        while True:
            time.sleep(0.5)
            assert enqueuer.error is None, enqueuer.error
            now = time.monotonic()
            for index, worker in enumerate(workers):
                assert worker.process.poll() is None, f"worker {index} exited by itself: {logs[index].read_text()}"
            try:
                ids = enqueuer.accepted_ids()
                now_statuses = statuses(client, ids)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            done = now_statuses.count(jobqueue.DONE)
            if not feeding.is_alive() and all(status in jobqueue.FINAL for status in now_statuses):
                break
            if now >= next_report:
                print(f"{now - began:5.0f} s: {len(ids)} accepted, {done} done, {kills} kills", flush=True)
                next_report = now + 10
            assert now - began < 480, f"only {done} of {len(ids)} accepted jobs done after 480 s; see {tmp_path}"
            if not restarted_redis and len(ids) >= CRASH_AT:  # mid-way through the arrivals
                redis_server.restart(down_s=1.0, crash=True)
                restarted_redis = True
            # a worker with jobs in hand, so that every kill strands work to reclaim; never the last
            # ready one, so the fleet is not all loading the model at once
            if now >= next_kill and sum(worker.ready() for worker in workers) >= 2:
                busy = [index for index, worker in enumerate(workers) if worker.in_hand() > 0]
                if busy:
                    next_kill = now + chaos.uniform(*KILL_EVERY_S)
                    victim = chaos.choice(busy)
                    for key, value in workers[victim].figures().items():
                        figures[key] = figures.get(key, 0.0) + value
                    workers[victim].process.send_signal(signal.SIGKILL)
                    workers[victim].process.wait()
                    kills += 1
                    workers[victim] = spawn(tiny_model, redis_server.url, logs[victim], victim)
        wall_s = time.monotonic() - began
        for worker in workers:
            for key, value in worker.figures().items():
                figures[key] = figures.get(key, 0.0) + value
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    # every accepted job ended exactly once: done with its own image, started and computed by its
    # deadline, or (a short deadline only) expired uncomputed
    assert len(enqueuer.accepted) == JOBS
    pipe = client.pipeline(transaction=False)
    for job_id in enqueuer.accepted:
        pipe.hgetall(KEYS.job(job_id))
    jobs = {job_id: jobqueue.decode(stored) for job_id, stored in zip(enqueuer.accepted, pipe.execute(), strict=True)}
    allowed = {job_id: (jobqueue.DONE, jobqueue.EXPIRED) if job_id in enqueuer.short else (jobqueue.DONE,)
               for job_id in jobs}
    assert {job_id: stored.get("status") for job_id, stored in jobs.items()
            if stored.get("status") not in allowed[job_id]} == {}
    assert {job_id: stored["completions"] for job_id, stored in jobs.items() if stored["completions"] != "1"} == {}
    done = {job_id: stored for job_id, stored in jobs.items() if stored["status"] == jobqueue.DONE}
    expired = {job_id: stored for job_id, stored in jobs.items() if stored["status"] == jobqueue.EXPIRED}
    assert all([image["seed"] for image in stored["result"]] == [enqueuer.accepted[job_id]]
               for job_id, stored in done.items())
    late = {job_id: (stored["deadline"], stored["started_at"], stored["computed_at"]) for job_id, stored in done.items()
            if not float(stored["started_at"]) <= float(stored["computed_at"]) <= float(stored["deadline"])}
    assert late == {}
    assert [job_id for job_id, stored in expired.items() if "result" in stored or "computed_at" in stored] == []
    assert len(enqueuer.short) >= JOBS // 10
    assert client.xlen(KEYS.stream) == 0 and int(client.xpending(KEYS.stream, KEYS.group)["pending"]) == 0
    assert client.xlen(KEYS.dead) == 0
    assert restarted_redis and kills >= 3 and figures["reclaimed"] >= 1  # the chaos did strand work
    redeliveries = sum(int(stored["attempts"]) for stored in jobs.values()) - JOBS
    print(f"\nchaos: {JOBS} jobs accepted, each ended exactly once: {len(done)} done, {len(expired)} of the "
          f"{len(enqueuer.short)} with a deadline of {SHORT_DEADLINE_S[0]:g} to {SHORT_DEADLINE_S[1]:g} s expired "
          f"uncomputed; {kills} SIGKILLs of {WORKERS} workers, 1 Redis crash (SIGKILL, {enqueuer.retries} enqueue "
          f"retries); {figures['reclaimed']:.0f} entries reclaimed, {redeliveries} redeliveries (deliveries beyond "
          f"one per job), {figures['duplicate']:.0f} deliveries found already ended (duplicates), in {wall_s:.1f} s "
          f"({JOBS / wall_s:.1f} jobs/s)")
