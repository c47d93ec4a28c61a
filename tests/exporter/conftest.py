"""The exporter served over real HTTP on a free port, reading a fake NVML."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from lab.localprom import free_port
from exporter.__main__ import Exporter, build_parser
from exporter.config import ExporterConfig

from .fakenvml import FakeGpu, FakeNvml

H100 = "GPU-6a0f7ad8-5b8a-4c1b-9b3c-1f0e2d3c4b5a"
SECOND = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


class Running:
    def __init__(self, exporter: Exporter, nvml: FakeNvml) -> None:
        self.exporter = exporter
        self.nvml = nvml
        self.url = f"http://127.0.0.1:{exporter.server.port}"

    def text(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=5).text

    def samples(self) -> list:
        return [s for family in text_string_to_metric_families(self.text()) for s in family.samples]

    def value(self, name: str, **labels: str) -> float | None:
        for sample in self.samples():
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        return None

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.02)


@pytest.fixture
def start_exporter() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(gpus: list[FakeGpu] | None = None, flags: list[str] | None = None, environ: dict | None = None,
              nvml: FakeNvml | None = None) -> Running:
        nvml = nvml or FakeNvml(gpus if gpus is not None else [FakeGpu(H100, samples=[(1, 50)])])
        args = build_parser().parse_args(["--listen-address", "127.0.0.1", "--port", str(free_port()),
                                          "--interval", "0.1", "--hostname", "node-a", *(flags or [])])
        exporter = Exporter(ExporterConfig.from_args(args), environ=environ or {}, nvml=nvml)
        exporter.start()
        running = Running(exporter, nvml)
        started.append(running)
        running.wait_for(lambda: exporter.poller.state.collections > 0)
        return running

    yield start
    for running in started:
        for event in running.nvml.hangs.values():
            event.set()
        running.exporter.stop()
