"""The Kubernetes API part of "absent is not zero": the scale target's replicas, read with the real
`kubernetes` client from a fake API server at the HTTP boundary (loopback, threaded)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from adapter import kube
from adapter.policy import Signals
from adapter.reading import QueryOutcome, absent_is_not_zero, to_reading
from contract import names
from lab.localprom import free_port


class FakeApiServer:
    """The few REST paths the scaler reads: a ScaledObject, and the scale of its target.

    `replicas` is every target's status.replicas; `status` other than 200 answers every request
    with that code (a 403 as the API server words it); `delay_s` holds each answer back."""

    def __init__(self, replicas: int = 4, scale_target_ref: dict | None = None):
        self.replicas = replicas
        self.scale_target_ref = scale_target_ref if scale_target_ref is not None else {"name": "sd"}
        self.status = 200
        self.delay_s = 0.0
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.paths.append(self.path)
                time.sleep(fake.delay_s)
                code, body = fake.answer(self.path.split("?")[0])
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, dict]:
        if self.status != 200:
            return self.status, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.status,
                                 "reason": "Forbidden" if self.status == 403 else "Error",
                                 "message": f"{path} is forbidden: User \"system:serviceaccount:ml:diffusion-scaler\""}
        parts = path.strip("/").split("/")
        # /apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects/{name}
        if parts[:3] == ["apis", "keda.sh", "v1alpha1"] and parts[3] == "namespaces" and parts[5] == "scaledobjects":
            return 200, {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                         "metadata": {"namespace": parts[4], "name": parts[6]},
                         "spec": {"scaleTargetRef": self.scale_target_ref}}
        # /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale
        if parts[:3] == ["apis", "apps", "v1"] and parts[3] == "namespaces" and parts[-1] == "scale":
            return 200, {"apiVersion": "autoscaling/v1", "kind": "Scale",
                         "metadata": {"namespace": parts[4], "name": parts[6]},
                         "spec": {"replicas": self.replicas}, "status": {"replicas": self.replicas}}
        return 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": f"{path} not found"}

    def configuration(self) -> client.Configuration:
        configuration = client.Configuration()
        configuration.host = self.host
        return configuration

    def __enter__(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def down_configuration() -> client.Configuration:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens
    return configuration


def ask(source: kube.KubernetesReplicas, now: float = 0.0, namespace: str = "ml", name: str = "sd-so"):
    return asyncio.run(source.replicas(namespace, name, now))


def test_the_replicas_come_from_the_scaledobjects_target_scale_subresource():
    with FakeApiServer(replicas=4) as api:
        assert ask(kube.KubernetesReplicas(api.configuration())) == 4
    assert api.paths == ["/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/sd-so",
                         "/apis/apps/v1/namespaces/ml/deployments/sd/scale"]


def test_a_statefulset_target_is_read_through_its_own_scale_subresource():
    with FakeApiServer(replicas=3, scale_target_ref={"name": "sd", "kind": "StatefulSet", "apiVersion": "apps/v1"}) as api:
        assert ask(kube.KubernetesReplicas(api.configuration())) == 3
    assert api.paths[-1] == "/apis/apps/v1/namespaces/ml/statefulsets/sd/scale"


def test_a_count_is_cached_for_the_ttl_per_scaledobject():
    with FakeApiServer(replicas=4) as api:
        source = kube.KubernetesReplicas(api.configuration(), ttl_s=30)
        assert ask(source, now=0) == 4
        api.replicas = 0
        assert ask(source, now=29) == 4  # cached
        assert len(api.paths) == 2
        assert ask(source, now=30) == 0  # asked again
        assert ask(source, now=30, name="other") == 0  # another ScaledObject has its own entry
    assert len(api.paths) == 6


@pytest.mark.parametrize(
    ("status", "reason"),
    [(403, kube.FORBIDDEN), (401, kube.FORBIDDEN), (404, kube.ERROR), (500, kube.ERROR)],
)
def test_an_error_answer_gives_no_count_and_says_why_once(status, reason, caplog):
    reported: list[str | None] = []
    with FakeApiServer() as api:
        api.status = status
        source = kube.KubernetesReplicas(api.configuration(), ttl_s=1, on_fallback=reported.append)
        with caplog.at_level(logging.WARNING, logger=kube.__name__):
            assert [ask(source, now=t) for t in range(5)] == [None] * 5
        assert len(api.paths) == 5  # asked on every TTL, not given up on
        api.status = 200
        assert ask(source, now=5) == 4
    assert reported == [None, reason, None]
    [record] = [r for r in caplog.records if r.name == kube.__name__]
    assert f"HTTP {status}" in record.getMessage() and "history rule" in record.getMessage()


def test_an_unreachable_api_gives_no_count_within_the_timeout():
    reported: list[str | None] = []
    source = kube.KubernetesReplicas(down_configuration(), timeout_s=1, on_fallback=reported.append)
    assert ask(source) is None
    assert reported == [None, kube.UNREACHABLE]


def test_a_hung_api_gives_no_count_after_the_timeout_and_the_event_loop_keeps_running():
    with FakeApiServer() as api:
        api.delay_s = 3.0
        reported: list[str | None] = []
        source = kube.KubernetesReplicas(api.configuration(), timeout_s=0.5, on_fallback=reported.append)

        async def scenario():
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            replicas = await source.replicas("ml", "sd-so", 0.0)
            elapsed = time.monotonic() - started
            ticker.cancel()
            return replicas, elapsed, ticks

        replicas, elapsed, ticks = asyncio.run(scenario())
    assert replicas is None and reported[-1] == kube.UNREACHABLE
    assert elapsed < 1.5
    assert ticks >= 20  # the loop ran while the client blocked (on its thread)


def test_without_a_configuration_the_api_is_never_asked_and_the_reason_is_reported():
    reported: list[str | None] = []
    source = kube.KubernetesReplicas(None, unavailable=kube.OFF, on_fallback=reported.append)
    assert ask(source) is None
    assert reported == [kube.OFF]


def test_outside_a_cluster_there_is_no_in_cluster_configuration(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kube.in_cluster_configuration() is None


def reading(queue: float | None, ready: float | None):
    return to_reading((QueryOutcome(names.QUEUE, 0.01, queue), QueryOutcome(names.READY_REPLICAS, 0.01, ready)), ())


@pytest.mark.parametrize(
    ("api_replicas", "last_good", "believed"),
    [
        (4, None, False),  # the API says 4: missing data even on the first reading
        (4, Signals(queue=0, ready_replicas=0), False),  # and even after a reading of ready 0
        (0, Signals(queue=40, ready_replicas=4), True),  # the API says 0: scaled to zero, believed
        (0, None, True),
        (None, None, True),  # the API cannot say: the history decides
        (None, Signals(queue=40, ready_replicas=4), False),
    ],
)
def test_the_api_count_decides_whether_an_empty_answer_is_zero(api_replicas, last_good, believed):
    checked = absent_is_not_zero(reading(None, None), last_good, api_replicas)
    assert (checked.signals is not None) == believed
    if not believed:
        assert "missing data, not zero" in checked.error
    if api_replicas:
        assert f"the Kubernetes API reports {api_replicas} replicas" in checked.error
