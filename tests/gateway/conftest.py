"""Real parts for gateway tests: a real redis-server, the real app on a real loopback port, and a
fake worker that plays the pull-mode worker's part with the contract's own scripts."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import requests
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from contract.jobqueue import FINISH, JOB_FIELD, START, QueueKeys
from gateway.config import GatewayConfig
from gateway.server import gateway_app
from lab.localprom import free_port
from lab.localredis import LocalRedis

IMAGES = [{"b64_json": base64.b64encode(b"\x89PNG not really").decode(), "seed": 7}]
BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2}


@dataclass
class FakeWorker:
    """The pull-mode worker's side of the protocol, one job at a time: XREADGROUP, START, FINISH."""

    client: redis.Redis
    keys: QueueKeys
    name: str = "fake-worker"
    result_ttl_s: int = 3600
    taken: dict[str, bytes] = field(default_factory=dict)  # job id -> stream entry id

    def take(self, block_s: float = 5.0) -> str | None:
        """The next job's id, delivered to this consumer; None when none came within `block_s`."""
        reply = self.client.xreadgroup(self.keys.group, self.name, {self.keys.stream: ">"}, count=1,
                                       block=int(block_s * 1000))
        if not reply:
            return None
        [(_, [(entry_id, fields)])] = reply
        job_id = fields[JOB_FIELD.encode()].decode()
        self.taken[job_id] = entry_id
        return job_id

    def start(self, job_id: str, max_deliveries: int = 3) -> str:
        verdict, _ = self.client.eval(START, 1, self.keys.job(job_id), self.name, time.time(), max_deliveries)
        return verdict.decode()

    def finish(self, job_id: str, status: str, field_name: str, payload: str) -> int:
        return self.client.eval(FINISH, 3, self.keys.job(job_id), self.keys.stream, self.keys.done(job_id),
                                self.keys.group, self.taken.pop(job_id), status, field_name, payload, time.time(),
                                self.result_ttl_s)

    def complete(self, images: list[dict] = IMAGES) -> str:
        """Takes, starts and finishes the next job with `images`; returns its id."""
        job_id = self.take()
        assert job_id is not None, "no job reached the worker"
        assert self.start(job_id) == "run"
        assert self.finish(job_id, "done", "result", json.dumps(images)) == 1
        return job_id

    def fail(self, error: str) -> str:
        job_id = self.take()
        assert job_id is not None, "no job reached the worker"
        assert self.start(job_id) == "run"
        assert self.finish(job_id, "failed", "error", error) == 1
        return job_id


@dataclass
class RunningGateway:
    url: str
    config: GatewayConfig
    redis: redis.Redis
    server: uvicorn.Server
    api_key: str | None = None  # sent as a Bearer token by post, get and delete, when the gateway wants one

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key is not None else {}

    @property
    def keys(self) -> QueueKeys:
        return self.config.keys

    def worker(self, name: str = "fake-worker") -> FakeWorker:
        return FakeWorker(self.redis, self.keys, name)

    def post(self, path: str = "/v1/images/generations", body: dict | None = None, key: str | None = None,
             timeout_s: float = 30) -> requests.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        return requests.post(self.url + path, json=BODY if body is None else body, headers={**self.auth, **headers},
                             timeout=timeout_s)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.auth, timeout=10)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, headers=self.auth, timeout=10)

    def job(self, job_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.job(job_id)).items()}

    def backlog(self) -> int:
        return self.redis.xlen(self.keys.stream)

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample's value from /metrics, None when the series is absent."""
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.02)


def wait_ready(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not up yet, or too busy to answer in time
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.05)


@pytest.fixture
def start_gateway(redis_server: LocalRedis) -> Iterator[Callable[..., RunningGateway]]:
    """Starts the real app (lifespan included) under uvicorn in a thread against `redis_server`."""
    started: list[tuple[uvicorn.Server, threading.Thread, redis.Redis]] = []

    def start(wait_until_ready: bool = True, api_key: str | None = None, redis_at: LocalRedis | None = None,
              **settings) -> RunningGateway:
        """`settings`: GatewayConfig's fields; `api_key`: what the returned gateway's requests send;
        `redis_at`: another server than `redis_server` (the config's URL and the test's client)."""
        port = free_port()
        target = redis_at or redis_server
        config = GatewayConfig(host="127.0.0.1", port=port, redis_url=target.url, **settings)
        server = uvicorn.Server(uvicorn.Config(gateway_app(config), host="127.0.0.1", port=port, lifespan="on",
                                               log_config=None))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        client = target.client()
        started.append((server, thread, client))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.01)
        running = RunningGateway(f"http://127.0.0.1:{port}", config, client, server, api_key)
        if wait_until_ready:
            wait_ready(running.url)
        return running

    yield start
    for server, thread, client in started:
        server.should_exit = True
        thread.join(10)
        client.close()


@pytest.fixture
def gateway(start_gateway) -> RunningGateway:
    return start_gateway()
