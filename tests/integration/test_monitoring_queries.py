"""Every PromQL expression of the dashboard and the rules returns data from a real local stack.

Real parts: Prometheus (Debian package) with our rule file loaded, scraping the worker (real
tiny pipeline over HTTP), the exporter (fake NVML at the pynvml boundary) and the scaler
(real gRPC, registered the way KEDA registers a ScaledObject). The load is arranged so every
panel has something to show: finished requests for latency and throughput, a held batch with
a queue behind it, and a ScaledObject held at its max replicas.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import uvicorn
import yaml
from prometheus_client import CollectorRegistry

from lab.localprom import LocalPrometheus, free_port
from exporter.__main__ import Exporter, build_parser
from exporter.config import ExporterConfig
from tests.exporter.fakenvml import FakeGpu, FakeNvml
from tests.worker.conftest import BoundaryRunner
from worker.api import build_app
from worker.batching import BatchPolicy
from worker.metrics import WorkerMetrics
from worker.modelbuild import make_model
from worker.pipeline import DiffusionRunner
from worker.service import WorkerLimits, WorkerService

from .conftest import eventually, metrics_request, require_prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "manifests" / "monitoring" / "rules" / "diffusion-autoscaler.rules.yaml"
DASHBOARD = ROOT / "manifests" / "monitoring" / "dashboards" / "diffusion-autoscaler.json"
VARIABLES = {"$namespace": "ml", "$scaledobject": "sd-worker", "$deployment": "sd-worker", "$__rate_interval": "1m"}


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((f"panel {panel['title']!r} {target['refId']}", expr))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    """Recording rules as they are; alert conditions without their threshold, so a healthy
    stack still shows that the series behind each alert exist."""
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            if "record" in rule:
                found.append((f"record {rule['record']}", rule["record"]))
                continue
            expr = re.sub(r"^absent\((.*)\)$", r"\1", expr.strip(), flags=re.S)
            expr = re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.]+(?=\s*($|\n|and|or|unless))", "", expr)
            found.append((f"alert {rule['alert']}", expr))
    return found


def fast_rules() -> str:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"  # the test cannot wait 15 s per evaluation
    return yaml.safe_dump(rules)


def prometheus_config(worker: str, exporter: str, scaler: str) -> str:
    def job(name: str, target: str, labels: dict[str, str], honor: bool) -> dict:
        return {"job_name": name, "honor_labels": honor, "scrape_interval": "1s", "scrape_timeout": "1s",
                "static_configs": [{"targets": [target], "labels": labels}]}

    return yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            job("diffusion-worker", worker, {"namespace": "ml", "deployment": "sd-worker", "pod": "sd-worker-0"}, False),
            job("diffusion-gpu-exporter", exporter, {"deployment": "sd-worker"}, True),
            job("diffusion-scaler", scaler, {}, True),
        ],
    })


@pytest.fixture
def worker(tmp_path):
    runner = BoundaryRunner(DiffusionRunner.load(make_model(tmp_path / "tiny", "tiny"), device="cpu"))
    service = WorkerService(WorkerLimits(batching=BatchPolicy(max_batch_size=2, max_wait_s=0.01)),
                            WorkerMetrics(CollectorRegistry()))
    service.attach(runner, runner.inner.defaults(), runner.inner.load_seconds)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, lifespan="off",
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"127.0.0.1:{port}", runner
    runner.release()
    service.queue.close()
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def exporter():
    # One XID event, so the XID alert's counter has a series to read.
    gpu = FakeGpu("GPU-6a0f7ad8-5b8a-4c1b-9b3c-1f0e2d3c4b5a", samples=[(t, 60) for t in range(1, 4000)], xids=[31])
    args = build_parser().parse_args(["--listen-address", "127.0.0.1", "--port", str(free_port()), "--interval", "0.5"])
    running = Exporter(ExporterConfig.from_args(args), environ={"POD_NAME": "sd-worker-0", "POD_NAMESPACE": "ml", "CONTAINER_NAME": "worker"},
                       nvml=FakeNvml([gpu]))
    running.start()
    yield f"127.0.0.1:{running.server.port}"
    running.stop()


def test_every_dashboard_and_rule_expression_returns_data(worker, exporter, start_scaler):
    require_prometheus()
    worker_address, runner = worker
    scaler = start_scaler()
    files = {"rules.yaml": fast_rules()}
    config = prometheus_config(worker_address, exporter, f"127.0.0.1:{scaler.server.http_port}")
    with LocalPrometheus([], config_text=config, files=files) as prometheus, ThreadPoolExecutor(8) as pool:
        url = f"http://{worker_address}/v1/images/generations"
        body = {"prompt": "a lighthouse", "num_inference_steps": 2}
        assert all(f.result().status_code == 200 for f in [pool.submit(requests.post, url, json=body, timeout=60)
                                                           for _ in range(6)])
        runner.hold()  # a batch stays running and a queue builds behind it
        held = [pool.submit(requests.post, url, json=body, timeout=120) for _ in range(5)]
        from tests.integration.conftest import ref

        so = ref("sd-worker", prometheus.url, targetQueuePerReplica="1", maxReplicas="1", minReplicas="1",
                 window="30s")
        so.name = "sd-worker"
        scaler.stub.GetMetricSpec(so)

        def query(expr: str) -> list:
            answer = requests.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=5).json()
            assert answer["status"] == "success", answer
            return answer["data"]["result"]

        expressions = dashboard_expressions() + rule_expressions()
        assert len(expressions) >= 25

        def all_have_data():
            scaler.stub.GetMetrics(metrics_request(so))  # KEDA's polling keeps the target alive
            empty = [f"{where}: {expr}" for where, expr in expressions if not query(expr)]
            assert not empty, "no data for:\n" + "\n".join(empty)

        eventually(all_have_data, timeout_s=90, interval_s=1.0)
        runner.release()
        assert all(f.result().status_code == 200 for f in held)
