"""The scaler process: TLS and mTLS, gRPC health and reflection, HTTP endpoints, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from contract import names
from lab.localprom import free_port

from .certs import CertificateAuthority
from .conftest import eventually, metrics_request, ref

pytestmark = pytest.mark.integration

SPEC_REF = ref("sd", "http://127.0.0.1:9")  # GetMetricSpec needs no Prometheus answer


def test_health_reports_serving_for_the_server_and_the_scaler_service(scaler):
    health = health_pb2_grpc.HealthStub(scaler.channel)
    for service in ("", "externalscaler.ExternalScaler"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(scaler):
    stub = reflection_pb2_grpc.ServerReflectionStub(scaler.channel)
    [answer] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"externalscaler.ExternalScaler", "grpc.health.v1.Health"} <= names


def test_http_serves_metrics_healthz_and_404(scaler):
    base = f"http://127.0.0.1:{scaler.server.http_port}"
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    metrics = requests.get(f"{base}/metrics", timeout=5)
    assert metrics.status_code == 200 and names.SCALER_GRPC_REQUESTS + "_total" in metrics.text
    assert requests.get(f"{base}/", timeout=5).status_code == 404


def test_metrics_pass_promtool_lint(prometheus, scaler):
    scaler.stub.GetMetricSpec(ref("sd-lint", prometheus.url))
    eventually(lambda: _assert_in(names.SCALER_DESIRED, _metrics_text(scaler)))
    text = _metrics_text(scaler)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tls_serves_clients_that_trust_the_ca(tmp_path, start_scaler):
    ca = CertificateAuthority()
    cert, key = ca.write_server_files(tmp_path)
    scaler = start_scaler(tls_cert_file=cert, tls_key_file=key)
    with grpc.secure_channel(scaler.address, grpc.ssl_channel_credentials(root_certificates=ca.pem)) as channel:
        spec = pb_grpc.ExternalScalerStub(channel).GetMetricSpec(SPEC_REF, timeout=5)
    assert spec.metricSpecs[0].targetSizeFloat == 1.0
    with grpc.insecure_channel(scaler.address) as plaintext:
        with pytest.raises(grpc.RpcError):
            pb_grpc.ExternalScalerStub(plaintext).GetMetricSpec(SPEC_REF, timeout=2)


def test_mtls_refuses_clients_without_a_certificate_from_the_client_ca(tmp_path, start_scaler):
    ca = CertificateAuthority()
    cert, key = ca.write_server_files(tmp_path)
    (tmp_path / "client-ca.pem").write_bytes(ca.pem)
    scaler = start_scaler(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=str(tmp_path / "client-ca.pem"))

    client_cert, client_key = ca.issue("keda-operator", client=True)
    good = grpc.ssl_channel_credentials(ca.pem, private_key=client_key, certificate_chain=client_cert)
    with grpc.secure_channel(scaler.address, good) as channel:
        assert pb_grpc.ExternalScalerStub(channel).GetMetricSpec(SPEC_REF, timeout=5).metricSpecs

    stranger_cert, stranger_key = CertificateAuthority("other-ca").issue("intruder", client=True)
    for credentials in (
        grpc.ssl_channel_credentials(ca.pem),  # no client certificate
        grpc.ssl_channel_credentials(ca.pem, private_key=stranger_key, certificate_chain=stranger_cert),
    ):
        with grpc.secure_channel(scaler.address, credentials) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                pb_grpc.ExternalScalerStub(channel).GetMetricSpec(SPEC_REF, timeout=3)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rotated_certificate_files_are_used_for_new_connections(tmp_path, start_scaler):
    old_ca, new_ca = CertificateAuthority("old-ca"), CertificateAuthority("new-ca")
    cert, key = old_ca.write_server_files(tmp_path)
    scaler = start_scaler(tls_cert_file=cert, tls_key_file=key)
    with grpc.secure_channel(scaler.address, grpc.ssl_channel_credentials(old_ca.pem)) as channel:
        pb_grpc.ExternalScalerStub(channel).GetMetricSpec(SPEC_REF, timeout=5)

    time.sleep(0.01)  # a new mtime
    new_ca.write_server_files(tmp_path)  # same paths, as cert-manager rotates a Secret

    def new_certificate_is_served():
        with grpc.secure_channel(scaler.address, grpc.ssl_channel_credentials(new_ca.pem)) as channel:
            pb_grpc.ExternalScalerStub(channel).GetMetricSpec(SPEC_REF, timeout=3)

    eventually(new_certificate_is_served, timeout_s=10)


def test_the_command_line_serves_until_sigterm_then_exits_cleanly(prometheus):
    grpc_port, http_port = free_port(), free_port()
    # Loopback is denied to metadata by default; here the operator allows it, as the lab does.
    env = {**os.environ, "SCALER_HTTP_PORT": str(http_port), "PYTHONUNBUFFERED": "1",
           "SCALER_DENIED_NETWORKS": ",".join(DENIED_NETWORKS_BUT_LOOPBACK)}
    process = subprocess.Popen(
        [sys.executable, "-m", "adapter", "--listen-address", "127.0.0.1", "--grpc-port", str(grpc_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        eventually(lambda: _assert_equal(requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code, 200))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            assert stub.GetMetricSpec(SPEC_REF, timeout=5).metricSpecs
            # refreshers busy against a real Prometheus when the signal lands
            for i in range(40):
                stub.GetMetrics(metrics_request(ref(f"sd-{i}", prometheus.url, refreshSeconds="0.1")), timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert f"serving ExternalScaler on 127.0.0.1:{grpc_port} (plaintext)" in output
    assert "shutting down" in output


def test_the_command_line_rejects_half_a_tls_configuration():
    result = subprocess.run(
        [sys.executable, "-m", "adapter", "--tls-cert-file", "/tmp/x.crt"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--tls-cert-file and --tls-key-file go together" in result.stderr


def test_the_command_line_reports_a_busy_port_and_exits_1():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "adapter", "--listen-address", "127.0.0.1", "--grpc-port", str(port), "--http-port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr


def _metrics_text(scaler) -> str:
    return requests.get(f"http://127.0.0.1:{scaler.server.http_port}/metrics", timeout=5).text


def _assert_in(needle, haystack):
    assert needle in haystack


def _assert_equal(a, b):
    assert a == b


