"""Redis down: the gateway says so (503, not ready), loses nothing it accepted, and recovers by
itself when Redis is back."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from contract import names
from tests.gateway.conftest import IMAGES, wait_ready


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
