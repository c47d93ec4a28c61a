"""The Kubernetes API part of "absent is not zero": the scale target's replicas, read with the real
`kubernetes` client from a fake API server at the HTTP boundary (loopback, threaded)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from adapter import kube
from adapter.policy import Signals
from adapter.reading import QueryOutcome, absent_is_not_zero, to_reading
from contract import names
from lab.localprom import free_port


class FakeApiServer:
    """The few REST paths the scaler uses: it reads a ScaledObject and its scale target, and
    creates and patches core/v1 Events.

    `replicas` is every target's status.replicas and `ready` its status.readyReplicas (left out
    when 0, as the API server does; `replicas` when None); ScaledObjects named in `missing`
    answer 404; `status` other than 200 answers every request with that code (a 403 as the API
    server words it), `event_status` only the writes of Events; `delay_s` holds each answer back.
    Events written are kept in `events` (name -> the stored Event); a strategic merge patch
    replaces the fields it names, as the API server does for an Event's scalar fields;
    `requests` lists (method, path, Content-Type) of every request."""

    def __init__(self, replicas: int = 4, scale_target_ref: dict | None = None, ready: int | None = None):
        self.replicas = replicas
        self.ready = ready
        self.scale_target_ref = scale_target_ref if scale_target_ref is not None else {"name": "sd"}
        self.missing: set[str] = set()
        self.status = 200
        self.event_status = 200
        self.delay_s = 0.0
        self.paths: list[str] = []
        self.requests: list[tuple[str, str, str]] = []
        self.events: dict[str, dict] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._serve(None)

            def do_POST(self):
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_PATCH(self):
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def _serve(self, sent):
                fake.paths.append(self.path)
                fake.requests.append((self.command, self.path.split("?")[0], self.headers.get("Content-Type", "")))
                time.sleep(fake.delay_s)
                if self.command == "GET":
                    code, body = fake.answer(self.path.split("?")[0])
                else:
                    code, body = fake.write(self.command, self.path.split("?")[0], sent)
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout under test)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @staticmethod
    def failure(status: int, path: str) -> tuple[int, dict]:
        return status, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                        "reason": "Forbidden" if status == 403 else "NotFound" if status == 404 else "Error",
                        "message": f"{path} is forbidden: User \"system:serviceaccount:ml:diffusion-scaler\""}

    def write(self, method: str, path: str, sent: dict) -> tuple[int, dict]:
        """POST /api/v1/namespaces/{ns}/events, PATCH /api/v1/namespaces/{ns}/events/{name}."""
        for status in (self.status, self.event_status):
            if status != 200:
                return self.failure(status, path)
        parts = path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "events":
            return self.failure(405, path)
        namespace = parts[3]
        if method == "POST" and len(parts) == 5:
            name = sent["metadata"]["name"]
            if sent["metadata"].get("namespace", namespace) != namespace or name in self.events:
                return self.failure(409 if name in self.events else 400, path)
            self.events[name] = {**sent, "metadata": {**sent["metadata"], "namespace": namespace,
                                                      "uid": f"event-{len(self.events)}"}}
            return 201, self.events[name]
        if method == "PATCH" and len(parts) == 6:
            if parts[5] not in self.events:
                return self.failure(404, path)
            self.events[parts[5]] = {**self.events[parts[5]], **sent}
            return 200, self.events[parts[5]]
        return self.failure(405, path)

    def answer(self, path: str) -> tuple[int, dict]:
        if self.status != 200:
            return self.failure(self.status, path)
        parts = path.strip("/").split("/")
        # /apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects/{name}
        if parts[:3] == ["apis", "keda.sh", "v1alpha1"] and parts[3] == "namespaces" and parts[5] == "scaledobjects":
            if parts[6] in self.missing:
                return 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": f"{path} not found"}
            return 200, {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                         "metadata": {"namespace": parts[4], "name": parts[6], "uid": self.uid(parts[6])},
                         "spec": {"scaleTargetRef": self.scale_target_ref}}
        # /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}: the scale target
        if parts[0] == "apis" and parts[3] == "namespaces" and len(parts) == 7:
            ready = self.replicas if self.ready is None else self.ready
            status = {"replicas": self.replicas, **({"readyReplicas": ready} if ready else {})}
            return 200, {"apiVersion": f"{parts[1]}/{parts[2]}", "kind": parts[5][:-1].capitalize(),
                         "metadata": {"namespace": parts[4], "name": parts[6]},
                         "spec": {"replicas": self.replicas}, "status": status}
        return 404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": f"{path} not found"}

    @staticmethod
    def uid(scaled_object: str) -> str:
        """The uid of the ScaledObject named so (one per name, as long as it is not re-created)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, scaled_object))

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


def counts(**by_reason: int) -> dict[str, int]:
    """What on_fallback gets: ScaledObjects per fallback reason, every reason present."""
    return {**dict.fromkeys(kube.FALLBACK_REASONS, 0), **by_reason}


def ask(source: kube.KubernetesReplicas, now: float = 0.0, namespace: str = "ml", name: str = "sd-so"):
    return asyncio.run(source.replicas(namespace, name, now))


def test_the_count_is_the_scaledobjects_targets_ready_replicas():
    with FakeApiServer(replicas=4, ready=3) as api:
        assert ask(kube.KubernetesReplicas(api.configuration())) == 3
    assert api.paths == ["/apis/keda.sh/v1alpha1/namespaces/ml/scaledobjects/sd-so",
                         "/apis/apps/v1/namespaces/ml/deployments/sd"]


def test_replicas_created_but_not_ready_count_0_as_the_api_omits_a_zero_ready_count():
    """A replica still loading its model has no series yet: that empty answer is not an outage."""
    with FakeApiServer(replicas=2, ready=0) as api:
        assert ask(kube.KubernetesReplicas(api.configuration())) == 0


def test_a_statefulset_target_is_read_as_itself():
    with FakeApiServer(replicas=3, scale_target_ref={"name": "sd", "kind": "StatefulSet", "apiVersion": "apps/v1"}) as api:
        assert ask(kube.KubernetesReplicas(api.configuration())) == 3
    assert api.paths[-1] == "/apis/apps/v1/namespaces/ml/statefulsets/sd"


ROLLOUT = {"name": "sd", "kind": "Rollout", "apiVersion": "argoproj.io/v1alpha1"}


def test_another_kind_is_read_at_its_own_path_and_without_ready_replicas_gives_no_count():
    """Only the apps kinds are known to leave out a zero readyReplicas; elsewhere its absence
    says nothing, and the history rule decides instead."""
    reported: list = []
    with FakeApiServer(replicas=5, ready=5, scale_target_ref=ROLLOUT) as api:
        source = kube.KubernetesReplicas(api.configuration(), ttl_s=1, on_fallback=reported.append)
        assert ask(source, now=0) == 5
        assert api.paths[-1] == "/apis/argoproj.io/v1alpha1/namespaces/ml/rollouts/sd"
        api.ready = 0
        assert ask(source, now=1) is None
    assert reported[-1] == {**dict.fromkeys(kube.FALLBACK_REASONS, 0), kube.ERROR: 1}


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
    assert reported == [counts(**{reason: 1}), counts()]
    [record] = [r for r in caplog.records if r.name == kube.__name__ and r.levelno >= logging.WARNING]
    assert f"HTTP {status}" in record.getMessage() and "history rule" in record.getMessage()
    assert "ScaledObject ml/sd-so" in record.getMessage()


def test_each_scaledobject_keeps_its_own_reason_logged_once_per_change_and_forgotten_with_it(caplog):
    """One ScaledObject that cannot be read must neither flap another's state nor log each refresh."""
    reported: list[dict] = []
    with FakeApiServer(replicas=2) as api, caplog.at_level(logging.INFO, logger=kube.__name__):
        api.missing = {"gone"}
        source = kube.KubernetesReplicas(api.configuration(), ttl_s=1, on_fallback=reported.append)
        for t in range(4):
            assert ask(source, now=t, name="sd-so") == 2
            assert ask(source, now=t, name="gone") is None
        assert reported[-1] == counts(error=1)
        [record] = [r for r in caplog.records if r.name == kube.__name__ and r.levelno >= logging.WARNING]
        assert "ScaledObject ml/gone" in record.getMessage() and "HTTP 404" in record.getMessage()
        source.forget("ml", "gone")
        assert reported[-1] == counts()
        asked = len(api.paths)
        assert ask(source, now=3.5, name="sd-so") == 2  # the other's cache is kept
        assert len(api.paths) == asked


def test_an_unreachable_api_gives_no_count_within_the_timeout():
    reported: list[str | None] = []
    source = kube.KubernetesReplicas(down_configuration(), timeout_s=1, on_fallback=reported.append)
    assert ask(source) is None
    assert reported == [counts(unreachable=1)]


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
    assert replicas is None and reported[-1] == counts(unreachable=1)
    assert elapsed < 1.5
    assert ticks >= 20  # the loop ran while the client blocked (on its thread)


def test_the_timeout_bounds_both_requests_together():
    """0.4 s per answer, 0.6 s for the read: the second request gets what the first left."""
    with FakeApiServer() as api:
        api.delay_s = 0.4
        source = kube.KubernetesReplicas(api.configuration(), timeout_s=0.6)
        started = time.monotonic()
        assert ask(source) is None
        assert time.monotonic() - started < 1.0  # two 0.6 s timeouts would take 1.0 s
        assert len(api.paths) == 2


def test_without_a_configuration_the_api_is_never_asked_and_the_reason_is_reported():
    reported: list[str | None] = []
    source = kube.KubernetesReplicas(None, unavailable=kube.OFF, on_fallback=reported.append)
    assert ask(source) is None
    assert ask(source, name="other") is None
    assert reported == [counts(off=1), counts(off=2)]


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
        assert f"the Kubernetes API reports {api_replicas} ready replicas" in checked.error
