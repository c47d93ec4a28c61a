"""Real parts for worker tests: a tiny random-weight pipeline built by the CLI, served over real HTTP.

Faults are injected at the pipeline boundary only (`BoundaryRunner` wraps the real runner):
holding a batch to let a queue build, running out of memory above a batch size, raising above
a batch size, raising on a prompt.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from contract.apikey import ApiKeys
from lab.localprom import free_port
from worker.api import build_app
from worker.batching import BatchKey, BatchPolicy
from worker.metrics import WorkerMetrics
from worker.pipeline import DiffusionRunner
from worker.service import WorkerLimits, WorkerService

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Built once per session through the real CLI."""
    directory = tmp_path_factory.mktemp("models") / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "make-model", str(directory), "--arch", "tiny", "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="session")
def tiny_runner(tiny_model) -> DiffusionRunner:
    return DiffusionRunner.load(tiny_model, device="cpu")


class BoundaryRunner:
    """The real runner, with faults and a gate at the pipeline call; records every call."""

    def __init__(self, inner: DiffusionRunner) -> None:
        self.inner = inner
        self.calls: list[tuple[BatchKey, list[str], list[int]]] = []
        self.oom_above: int | None = None
        self.fail_above: int | None = None
        self.explode_on: str | None = None
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        """The next calls block inside the pipeline until `release`."""
        self.entered.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def generate(self, key, prompts, negative_prompts, seeds):
        self.calls.append((key, list(prompts), list(seeds)))
        self.entered.set()
        if not self._gate.wait(timeout=60):
            raise RuntimeError("test gate never released")
        if self.oom_above is not None and len(seeds) > self.oom_above:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected above {self.oom_above} images)")
        if self.fail_above is not None and len(seeds) > self.fail_above:
            raise RuntimeError(f"input too large for upsample_nearest2d (injected above {self.fail_above} images)")
        if self.explode_on is not None and self.explode_on in prompts:
            raise RuntimeError("injected pipeline failure")
        return self.inner.generate(key, prompts, negative_prompts, seeds)

    def is_out_of_memory(self, error):
        return self.inner.is_out_of_memory(error)

    def release_memory(self):
        self.inner.release_memory()


@dataclass
class RunningWorker:
    url: str
    service: WorkerService
    runner: BoundaryRunner
    api_key: str | None = None  # sent as a Bearer token by `post`, when the worker wants one

    def post(self, timeout_s: float = 60, **body) -> requests.Response:
        body.setdefault("prompt", "a lighthouse at dusk")
        body.setdefault("num_inference_steps", 2)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key is not None else {}
        return requests.post(f"{self.url}/v1/images/generations", json=body, headers=headers, timeout=timeout_s)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), float("nan"))

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.01)


@pytest.fixture
def start_worker(tiny_runner) -> Iterator[Callable[..., RunningWorker]]:
    """Starts the real HTTP server in a thread with the given batching and limits; stops it after the test."""
    started: list[tuple[uvicorn.Server, threading.Thread, WorkerService, BoundaryRunner]] = []

    def start(max_batch_size: int = 8, max_wait_s: float = 0.02, api_keys: ApiKeys | None = None,
              api_key: str | None = None, **limits) -> RunningWorker:
        """`api_keys`: what the app requires; `api_key`: what the returned worker's `post` sends."""
        batching = BatchPolicy(max_batch_size=max_batch_size, max_wait_s=max_wait_s)
        service = WorkerService(WorkerLimits(batching=batching, **limits), WorkerMetrics(CollectorRegistry()))
        runner = BoundaryRunner(tiny_runner)
        service.attach(runner, tiny_runner.defaults(), tiny_runner.load_seconds)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(build_app(service, api_keys), host="127.0.0.1", port=port, lifespan="off", log_config=None)
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread, service, runner))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.01)
        return RunningWorker(f"http://127.0.0.1:{port}", service, runner, api_key)

    yield start
    for server, thread, service, runner in started:
        runner.release()
        service.queue.close()
        server.should_exit = True
        thread.join(10)
        assert service.engine.join(10), "pipeline thread did not stop"
