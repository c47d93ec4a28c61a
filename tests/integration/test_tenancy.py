"""Multi-tenant safety over real gRPC (docs/SECURITY.md): a ScaledObject in tenant-b attacks the
scaler with its metadata, against real HTTP and TCP servers on loopback that record what reaches
them. Each rule's attack: the credentials never arrive, a redirect is not followed, a denied
address is never connected to, another namespace is never read, one namespace cannot fill the
scaler, and an error carries only an excerpt of what a server answered."""

from __future__ import annotations

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from adapter._proto import externalscaler_pb2 as pb
from adapter.access import DEFAULT_DENIED_NETWORKS
from adapter.prometheus import PrometheusAuth
from contract.jobqueue import namespaced_stream
from contract.redisaccess import RedisAccess

from .conftest import eventually, eventually_fails, metrics_request

pytestmark = pytest.mark.integration

TOKEN = "the-scalers-own-token"
ANSWER = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "1"]}]}}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # a refresh sends its queries side by side; the default 5 resets some
    daemon_threads = True


class RecordingServer:
    """An HTTP server on loopback that records each request's path, query and headers and answers
    `answer` (a Prometheus API body), or `status` with `headers`."""

    def __init__(self, answer: dict | None = None, status: int = 200, headers: dict[str, str] | None = None):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                recorder.requests.append({"path": parts.path, "query": parse_qs(parts.query),
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                body = json.dumps(answer if answer is not None else ANSWER).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def servers():
    started: list[RecordingServer] = []

    def start(**kwargs) -> RecordingServer:
        started.append(RecordingServer(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def tenant_ref(name: str, namespace: str = "tenant-b", **metadata) -> pb.ScaledObjectRef:
    meta = {"scalerAddress": "scaler.keda:6000", "refreshSeconds": "0.3", "staleAfterSeconds": "0.3",
            "spareAboveLoad": "0", **metadata}
    return pb.ScaledObjectRef(name=name, namespace=namespace, scalerMetadata=meta)


def until(condition, timeout_s: float = 15.0) -> None:
    """Waits for `condition()` to be true; fails at the deadline."""
    def check():
        assert condition()

    eventually(check, timeout_s=timeout_s)


def invalid(scaler, ref: pb.ScaledObjectRef) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.GetMetricSpec(ref)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


# -- credentials go only where the operator said -----------------------------------------------------

@pytest.mark.parametrize("kind", ["bearer", "basic"])
def test_a_tenants_prometheus_address_never_receives_the_scalers_token_or_password(start_scaler, servers, token_file,
                                                                                    kind):
    home, attacker = servers(), servers()
    auth = PrometheusAuth(bearer_token_file=token_file) if kind == "bearer" \
        else PrometheusAuth(username="scaler", password="basic-secret")
    scaler = start_scaler(prometheus_address=home.url, prometheus_auth=auth)
    victim = tenant_ref("sd-worker", namespace="tenant-a")  # no prometheusAddress: the operator's
    thief = tenant_ref("thief", prometheusAddress=attacker.url)
    for ref in (victim, thief):
        scaler.stub.GetMetricSpec(ref)
        scaler.stub.GetMetrics(metrics_request(ref))
    until(lambda: len(attacker.requests) >= 10 and len(home.requests) >= 10)

    expected = f"Bearer {TOKEN}" if kind == "bearer" else "Basic " + base64.b64encode(b"scaler:basic-secret").decode()
    assert all(r["headers"].get("authorization") == expected for r in home.requests)
    # Both credentials are headers; neither may reach the tenant's server, in any form.
    leaked = [r for r in attacker.requests if "authorization" in r["headers"]
              or any(TOKEN in v or "basic-secret" in v for v in r["headers"].values())]
    assert not leaked
    assert all(r["path"] == "/api/v1/query" for r in attacker.requests)


def test_the_operator_may_refuse_every_address_but_its_own(start_scaler, servers, token_file):
    home, attacker = servers(), servers()
    scaler = start_scaler(prometheus_address=home.url, allowed_prometheus_urls=(home.url,),
                          prometheus_auth=PrometheusAuth(bearer_token_file=token_file))
    error = invalid(scaler, tenant_ref("thief", prometheusAddress=attacker.url))
    assert "prometheusAddress" in error.details() and "only queries addresses within" in error.details()
    scaler.stub.GetMetricSpec(tenant_ref("fine", prometheusAddress=home.url + "/"))
    assert attacker.requests == []


def test_credentials_without_the_operators_address_are_refused_at_start_up(token_file):
    from adapter.__main__ import build_parser, config_from_args

    args = build_parser().parse_args(["--prometheus-bearer-token-file", token_file])
    with pytest.raises(ValueError, match="--prometheus-address"):
        config_from_args(args)


def test_a_tenants_redis_address_never_receives_the_scalers_redis_password(start_scaler, redis_server):
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    while chunk := connection.recv(4096):
                        received.extend(chunk)
                        connection.sendall(b"-ERR not a Redis\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        scaler = start_scaler(redis_address=redis_server.url, redis_access=RedisAccess(password="redis-secret"),
                              prometheus_address="http://127.0.0.1:9")
        thief = tenant_ref("thief", redisAddress=f"redis://127.0.0.1:{port}/0",
                           stream=namespaced_stream("tenant-b", "sd-worker"))
        scaler.stub.GetMetricSpec(thief)
        until(lambda: len(received) > 0)
        eventually_fails(lambda: scaler.stub.GetMetrics(metrics_request(thief)), timeout_s=5)
        assert b"redis-secret" not in received and b"AUTH" not in received.upper()
    finally:
        listener.close()


# -- addresses are checked -------------------------------------------------------------------------

def test_a_redirect_is_not_followed_from_a_tenants_server_nor_from_the_operators(start_scaler, servers, token_file):
    target = servers()
    tenant = servers(status=302, headers={"Location": target.url + "/api/v1/query?query=up"})
    home = servers(status=307, headers={"Location": target.url + "/api/v1/query?query=up"})
    scaler = start_scaler(prometheus_address=home.url, prometheus_auth=PrometheusAuth(bearer_token_file=token_file))
    for name, metadata in (("redirected", {"prometheusAddress": tenant.url}), ("home", {})):
        ref = tenant_ref(name, **metadata)
        scaler.stub.GetMetricSpec(ref)
        error = eventually_fails(lambda: scaler.stub.GetMetrics(metrics_request(ref)), timeout_s=5)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "redirect to " + target.url in error.details() and "not followed" in error.details()
    assert tenant.requests and home.requests and target.requests == []


def test_a_link_local_address_in_metadata_is_refused_naming_the_key(start_scaler):
    scaler = start_scaler(denied_networks=DEFAULT_DENIED_NETWORKS)
    for address in ("http://169.254.169.254", "http://[fd00:ec2::254]:80", "http://127.0.0.1:9102"):
        error = invalid(scaler, tenant_ref("imds", prometheusAddress=address))
        assert "prometheusAddress" in error.details() and "--denied-networks" in error.details()


def test_a_name_that_resolves_into_a_denied_network_is_never_connected_to(start_scaler, servers):
    """`localhost` is no IP literal, so the parser lets it by; the check at connect time holds."""
    listening = servers()
    scaler = start_scaler(denied_networks=DEFAULT_DENIED_NETWORKS)
    ref = tenant_ref("rebinding", prometheusAddress=f"http://localhost:{listening.port}")
    scaler.stub.GetMetricSpec(ref)
    error = eventually_fails(lambda: scaler.stub.GetMetrics(metrics_request(ref)), timeout_s=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "resolves to 127.0.0.1" in error.details() and "--denied-networks" in error.details()
    assert listening.requests == []


def test_an_error_carries_only_an_excerpt_of_what_a_server_answered(start_scaler, servers):
    chatty = servers(answer={"status": "error", "errorType": "bad_data", "error": "S" * 100_000}, status=400)
    scaler = start_scaler()
    ref = tenant_ref("chatty", prometheusAddress=chatty.url)
    scaler.stub.GetMetricSpec(ref)
    error = eventually_fails(lambda: scaler.stub.GetMetrics(metrics_request(ref)), timeout_s=5)
    assert "S" * 200 + "..." in error.details() and "S" * 201 not in error.details()
    assert len(error.details()) < 4000


# -- namespaces are confined -------------------------------------------------------------------------

def test_every_builtin_query_reads_only_the_scaledobjects_namespace(start_scaler, servers):
    home = servers()
    scaler = start_scaler(prometheus_address=home.url)
    ref = tenant_ref("sd-worker", selector='deployment="sd-worker"', signals="queue,gpu,latency,capacity",
                     targetP95Seconds="10")
    scaler.stub.GetMetricSpec(ref)
    until(lambda: len(home.requests) >= 8)
    queries = {q for r in home.requests for q in r["query"]["query"]}
    assert queries and all('namespace="tenant-b"' in q for q in queries), queries


@pytest.mark.parametrize("key, value", [
    ("selector", 'namespace="tenant-a",deployment="sd-worker"'),
    ("selector", 'namespace=~"tenant-.*"'),
    ("queueQuery", 'sum(diffusion_requests_in_flight{namespace="tenant-a"})'),
    ("gpuUtilizationQuery", "avg(DCGM_FI_DEV_GPU_UTIL)"),
    ("latencyQuery", 'histogram_quantile(0.95, sum by (le) (rate(x_bucket{namespace="tenant-b"}[1m]))) + count(up)'),
    ("stream", "diffusion:tenant-a:sd-worker"),
])  # fmt: skip
def test_metadata_reading_another_namespace_is_refused_naming_the_key(start_scaler, servers, key, value):
    home = servers()
    scaler = start_scaler(prometheus_address=home.url)
    metadata = {key: value}
    if key == "stream":
        metadata["redisAddress"] = "redis://redis.tenant-a:6379/0"
    error = invalid(scaler, tenant_ref("nosy", **metadata))
    assert f"trigger metadata {key}:" in error.details()
    assert home.requests == []  # refused before anything is read


def test_a_trusted_cluster_may_allow_cross_namespace_reads(start_scaler, servers):
    home = servers()
    scaler = start_scaler(prometheus_address=home.url, allow_cross_namespace=True)
    scaler.stub.GetMetricSpec(tenant_ref("platform", selector='namespace=~"tenant-.*"'))
    until(lambda: any('namespace=~"tenant-.*"' in q for r in home.requests for q in r["query"]["query"]))


# -- bounded per namespace ----------------------------------------------------------------------------

def test_one_namespace_filling_its_cap_leaves_room_for_the_others(start_scaler, servers):
    home = servers()
    scaler = start_scaler(prometheus_address=home.url, max_scaled_objects_per_namespace=2)
    for n in range(2):
        scaler.stub.GetMetricSpec(tenant_ref(f"a{n}", namespace="tenant-a"))
    with pytest.raises(grpc.RpcError) as raised:
        scaler.stub.GetMetricSpec(tenant_ref("a2", namespace="tenant-a"))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "namespace tenant-a" in raised.value.details()
    assert "--max-scaled-objects-per-namespace" in raised.value.details()
    # Another trigger of a full namespace's ScaledObject is refused too (the key is the metadata).
    with pytest.raises(grpc.RpcError):
        scaler.stub.GetMetricSpec(tenant_ref("a0", namespace="tenant-a", window="2m"))
    assert scaler.stub.GetMetricSpec(tenant_ref("b0", namespace="tenant-b")).metricSpecs
