"""Redis down: the gateway says so (503, not ready), loses nothing it accepted, and recovers by
itself when Redis is back."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from contract import names
from gateway.jobs import OUTAGE_LOG_INTERVAL_S, OUTAGE_QUIET_S, JobQueue, OutageLog, QueueUnavailable
from lab.localredis import LocalRedis
from tests.gateway.conftest import IMAGES, wait_ready

# Holds Redis in one script for ARGV[1] microseconds: past busy-reply-threshold every other
# client is answered BUSY until it ends.
BUSY_SCRIPT = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


def groups(client: redis.Redis, stream: str) -> list[str]:
    try:
        return [group["name"].decode() for group in client.xinfo_groups(stream)]
    except (redis.ResponseError, redis.ConnectionError):
        return []


def test_with_redis_down_the_apis_and_readyz_answer_503_then_recover_when_it_is_back(gateway, redis_server):
    job_id = gateway.post("/v1/jobs").json()["id"]
    assert gateway.metric(names.GATEWAY_BACKLOG) == 1
    redis_server.stop()
    for path in ("/v1/images/generations", "/v1/jobs"):
        began = time.monotonic()
        response = gateway.post(path)
        assert response.status_code == 503, response.text
        assert time.monotonic() - began < 3
        assert "queue is unavailable" in response.json()["detail"] and int(response.headers["Retry-After"]) > 0
    assert gateway.get(f"/v1/jobs/{job_id}").status_code == 503
    assert gateway.get("/readyz").status_code == 503
    assert gateway.get("/healthz").status_code == 200
    assert gateway.metric(names.GATEWAY_REJECTED + "_total", reason="redis_unavailable") == 2
    time.sleep(1.1)  # past the backlog's refresh interval
    assert gateway.metric(names.GATEWAY_BACKLOG) is None  # unknown, not 0

    redis_server.start()
    wait_ready(gateway.url)
    assert gateway.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # accepted before: still there
    assert gateway.post("/v1/jobs").status_code == 202
    assert gateway.backlog() == 2


def test_a_gateway_started_before_redis_is_not_ready_until_redis_is_and_then_creates_the_group(
        start_gateway, redis_server):
    redis_server.stop()
    gateway = start_gateway(wait_until_ready=False)
    assert gateway.get("/healthz").status_code == 200
    assert gateway.get("/readyz").status_code == 503
    redis_server.start()
    # the lifespan's retry loop creates the group without any request asking for it
    gateway.wait_for(lambda: groups(gateway.redis, gateway.keys.stream) == [gateway.keys.group], timeout_s=10)
    assert gateway.get("/readyz").status_code == 200


def test_a_synchronous_request_waiting_through_a_redis_restart_still_gets_its_images(gateway, redis_server):
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gateway.post)
        worker = gateway.worker()
        job_id = worker.take()
        redis_server.restart(down_s=1.5)  # the append-only file keeps the job and its delivery
        assert worker.start(job_id) == "run"
        worker.finish(job_id, "done", "result", json.dumps(IMAGES))
        response = pending.result(15)
    assert response.status_code == 200 and response.json()["data"] == IMAGES


def test_a_503_names_no_redis_internals_and_an_outage_is_logged_once(gateway, redis_server, caplog):
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="gateway")
    answers = [gateway.post(path) for path in ("/v1/jobs", "/v1/images/generations", "/v1/jobs")]
    answers += [gateway.get("/v1/jobs/some-job"), gateway.get("/readyz")]
    for response in answers:
        assert response.status_code == 503 and response.json()["detail"] == "the job queue is unavailable"
        assert str(redis_server.port) not in response.text and "Error" not in response.text
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("gateway") and r.levelno >= logging.WARNING]
    assert len(logged) == 1 and str(redis_server.port) in logged[0]  # the operator gets the details


def test_the_outage_log_writes_an_outages_start_a_line_a_minute_and_its_end():
    log = logging.getLogger("test.outages")
    log.setLevel(logging.INFO)
    lines: list[str] = []
    log.addHandler(handler := logging.Handler())
    handler.emit = lambda record: lines.append(record.getMessage())
    outages = OutageLog(log)
    error = QueueUnavailable("Redis did not answer ENQUEUE (ConnectionError: refused)")
    outages.failed(error, 0.0)
    outages.failed(error, 1.0)
    outages.answered(1.5)  # a read between refused writes (out of memory): not an end
    outages.failed(error, 2.0)
    assert len(lines) == 1 and "refused" in lines[0]
    outages.failed(error, OUTAGE_LOG_INTERVAL_S + 1)
    assert len(lines) == 2 and "2 more errors" in lines[1]
    outages.answered(OUTAGE_LOG_INTERVAL_S + 1 + OUTAGE_QUIET_S)
    assert lines[2] == "the job queue answers again"
    outages.failed(error, OUTAGE_LOG_INTERVAL_S + 10)  # a new outage is logged at once
    assert len(lines) == 4 and "more errors" not in lines[3]


def test_a_redis_out_of_memory_is_503_with_retry_after_and_recovers_when_memory_is_back(gateway):
    job_id = gateway.post("/v1/jobs").json()["id"]
    gateway.redis.config_set("maxmemory-policy", "noeviction")
    gateway.redis.config_set("maxmemory", 1)  # every write is refused with OOM, reads still answer
    for path in ("/v1/jobs", "/v1/images/generations"):
        response = gateway.post(path)
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
    assert gateway.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert gateway.delete(f"/v1/jobs/{job_id}").status_code == 503
    assert gateway.backlog() == 1
    assert gateway.metric(names.GATEWAY_REJECTED + "_total", reason="redis_unavailable") == 2
    gateway.redis.config_set("maxmemory", 0)
    assert gateway.post("/v1/jobs").status_code == 202 and gateway.backlog() == 2


def hold_busy(server: LocalRedis, seconds: float) -> threading.Thread:
    """Starts a script holding `server` for `seconds`, other clients answered BUSY meanwhile."""
    with server.client() as client:
        client.config_set("busy-reply-threshold", 50)  # milliseconds

    def run() -> None:
        with server.client() as client:
            client.eval(BUSY_SCRIPT, 0, int(seconds * 1e6))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)  # past the threshold
    return thread


def test_a_busy_redis_is_503_and_a_wait_rides_it_out(gateway, redis_server):
    job_id = gateway.post("/v1/jobs").json()["id"]
    worker = gateway.worker()
    assert worker.take() == job_id and worker.start(job_id) == "run"
    busy = hold_busy(redis_server, 1.5)
    response = gateway.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0

    async def wait_through_it():
        queue = JobQueue.connect(gateway.config)  # the synchronous API's wait, on a fresh client
        try:
            with pytest.raises(QueueUnavailable):
                await queue.get(job_id)
            waiting = asyncio.ensure_future(queue.wait(job_id, time.time() + 10))
            await asyncio.to_thread(busy.join, 10)
            worker.finish(job_id, "done", "result", json.dumps(IMAGES))
            return await waiting
        finally:
            await queue.close()

    job = asyncio.run(wait_through_it())
    assert job is not None and job.status == "done" and job.result == IMAGES
