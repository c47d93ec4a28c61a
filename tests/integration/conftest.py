"""Real parts for integration tests: Prometheus from its package, the scaler on real ports."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import Callable, TypeVar

import grpc
import requests
import pytest

from adapter._proto import externalscaler_pb2 as pb
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from contract import names
from lab.localprom import LocalPrometheus, PrometheusNotFound, find_binary
from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK
from adapter.server import ScalerServer, ServerConfig
from lab.synthetic import SyntheticPods

T = TypeVar("T")


def require_prometheus() -> None:
    try:
        find_binary()
    except PrometheusNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install Prometheus: {e}")
        pytest.skip(str(e))


def eventually(check: Callable[[], T], timeout_s: float = 15.0, interval_s: float = 0.1) -> T:
    """Retries `check` until it returns without raising; re-raises its last error at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, grpc.RpcError, requests.RequestException):
            if time.monotonic() > deadline:
                raise
        time.sleep(interval_s)


def eventually_fails(call: Callable[[], object], timeout_s: float = 15.0) -> grpc.RpcError:
    """Calls until the RPC fails, and returns its error; fails the test if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
        except grpc.RpcError as error:
            return error
        if time.monotonic() > deadline:
            raise AssertionError(f"the call still succeeds after {timeout_s:g}s")
        time.sleep(0.1)


def wait_until_scraped(prometheus: LocalPrometheus, deployment: str, timeout_s: float = 15.0) -> None:
    """Blocks until Prometheus holds the deployment's series (pods appear one scrape later)."""

    def has_series():
        answer = requests.get(
            f"{prometheus.url}/api/v1/query", params={"query": f'{names.READY}{{deployment="{deployment}"}}'}, timeout=2
        ).json()
        assert answer["data"]["result"], f"no series of {deployment} yet"

    eventually(has_series, timeout_s)


@pytest.fixture(scope="session")
def fleet():
    fleet = SyntheticPods()
    port = fleet.start()
    fleet.address = f"127.0.0.1:{port}"
    yield fleet
    fleet.stop()


@pytest.fixture(scope="session")
def prometheus(fleet):
    require_prometheus()
    with LocalPrometheus([fleet.address], scrape_interval_s=1.0) as prom:
        yield prom


@pytest.fixture
def own_prometheus(fleet):
    """A Prometheus this test may stop, pause and restart."""
    require_prometheus()
    prom = LocalPrometheus([fleet.address], scrape_interval_s=1.0).start()
    yield prom
    prom.close()


class RunningScaler:
    """A ScalerServer on its own event loop thread, with a real gRPC client."""

    def __init__(self, config: ServerConfig, kubernetes_configuration=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ScalerServer(config, kubernetes_configuration=kubernetes_configuration)
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.grpc_port}"
        self.channel = grpc.insecure_channel(self.address) if not config.tls_cert_file else None
        self.stub = pb_grpc.ExternalScalerStub(self.channel) if self.channel else None

    def call(self, coroutine, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def start_scaler():
    started: list[RunningScaler] = []

    def start(**overrides) -> RunningScaler:
        # No real cluster is ever read: tests of the API pass their own fake (test_kube_api.py).
        # Every server here runs on loopback, which a cluster's scaler refuses for metadata's
        # addresses (tests/integration/test_tenancy.py attacks the default).
        config = ServerConfig(**{"listen_address": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                                 "kubernetes_api": "off", "denied_networks": DENIED_NETWORKS_BUT_LOOPBACK, **overrides})
        scaler = RunningScaler(config)
        started.append(scaler)
        return scaler

    yield start
    for scaler in started:
        scaler.close()


@pytest.fixture
def scaler(start_scaler) -> RunningScaler:
    return start_scaler()


@pytest.fixture
def deployment() -> str:
    """A deployment name no other test uses, so tests share one Prometheus without crosstalk."""
    return "sd-" + uuid.uuid4().hex[:8]


def ref(deployment: str, prometheus_url: str, name: str | None = None, **metadata) -> pb.ScaledObjectRef:
    meta = {
        "scalerAddress": "scaler.keda:6000",
        "prometheusAddress": prometheus_url,
        "selector": f'namespace="ml",deployment="{deployment}"',
        "refreshSeconds": "0.5",
        "scaleDownWindowSeconds": "0",
        # the instant queue and IsActive without the keep-warm hold: these tests follow a reading
        # through the scaler at once; the 30 s mean and the hold are the policy's, tested in
        # tests/unit/test_policy.py and tests/unit/test_targets.py
        "queueSmoothingSeconds": "0",
        "keepWarmMaxSeconds": "0",
        **metadata,
    }
    return pb.ScaledObjectRef(name=name or deployment, namespace="ml", scalerMetadata=meta)


def scaler_labels(deployment: str, metric: str | None = None) -> dict[str, str]:
    """The scaler's labels for the ScaledObject `ref` registers; `metric` too when given."""
    values = ("ml", deployment) if metric is None else ("ml", deployment, metric)
    return dict(zip(names.SCALER_LABELS, values))


def metrics_request(so_ref: pb.ScaledObjectRef, metric: str = "composite") -> pb.GetMetricsRequest:
    return pb.GetMetricsRequest(scaledObjectRef=so_ref, metricName=metric)
