"""The gateway's Redis client against a real redis-server serving TLS (certificates made for the
test), as an ACL user made with a real `ACL SETUSER`: it connects with the CA, fails clearly
without it, with another CA, without its client certificate under mutual TLS or with a wrong
password; bad TLS settings exit 2 naming the flag; and the real process serves with all of it
and an API key."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from contract.jobqueue import QueueKeys
from contract.redisaccess import RedisAccess
from gateway.__main__ import main
from lab.localprom import free_port
from tests.conftest import add_acl_user

from .conftest import wait_ready

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "gateway", "gateway-acl-password-42"


def connected_users(server) -> set[str]:
    """The ACL users of the clients connected to `server` now (CLIENT LIST's `user=`)."""
    with server.client() as admin:
        return {client["user"] for client in admin.client_list()}


def test_the_gateway_reaches_a_mutual_tls_redis_with_its_ca_and_certificate_as_an_acl_user(
        start_tls_redis, start_gateway, tls_files):
    server = start_tls_redis(require_client_cert=True)
    add_acl_user(server, USER, PASSWORD, "diffusion:jobs*")
    access = RedisAccess(username=USER, password=PASSWORD, ca_file=tls_files.ca, cert_file=tls_files.client_cert,
                         key_file=tls_files.client_key)
    gateway = start_gateway(redis_at=server, redis_access=access)  # waits for /readyz: Redis answered
    submitted = gateway.post("/v1/jobs")
    assert submitted.status_code == 202, submitted.text
    assert gateway.job(submitted.json()["id"])["status"] == "queued"
    assert gateway.backlog() == 1
    assert USER in connected_users(server)


def unready_for(gateway, caplog, seconds: float = 3.0) -> str:
    """Checks /readyz stays 503 for `seconds`; returns the gateway's log of why."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = gateway.get("/readyz")
        assert answer.status_code == 503 and answer.json() == {"detail": "the job queue is unavailable"}
        time.sleep(0.2)
    assert gateway.post("/v1/jobs").status_code == 503
    return "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("gateway"))


@pytest.mark.parametrize("ca", ["system", "other"])
def test_without_the_servers_ca_the_gateway_refuses_the_server_and_logs_why(
        start_tls_redis, start_gateway, tls_files, caplog, ca):
    server = start_tls_redis()
    access = RedisAccess(password="admin-password-of-the-default-user",
                         ca_file=None if ca == "system" else tls_files.other_ca)
    with caplog.at_level(logging.WARNING):
        gateway = start_gateway(wait_until_ready=False, redis_at=server, redis_access=access)
        logged = unready_for(gateway, caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in logged
    assert server.client().xlen(QueueKeys().stream) == 0


def test_without_its_client_certificate_a_mutual_tls_redis_refuses_the_gateway(
        start_tls_redis, start_gateway, tls_files, caplog):
    server = start_tls_redis(require_client_cert=True)
    access = RedisAccess(password="admin-password-of-the-default-user", ca_file=tls_files.ca)
    with caplog.at_level(logging.WARNING):
        gateway = start_gateway(wait_until_ready=False, redis_at=server, redis_access=access)
        logged = unready_for(gateway, caplog)
    # TLS 1.3 sends the server's alert after the handshake: read, it names the cause; when the
    # client was writing, the connection just ends, or the server resets it (seen on CI)
    assert any(refusal in logged for refusal in
               ("CERTIFICATE_REQUIRED", "EOF occurred in violation of protocol", "Connection reset by peer"))


def test_a_wrong_acl_password_is_refused_and_never_logged(start_tls_redis, start_gateway, tls_files, caplog):
    server = start_tls_redis()
    add_acl_user(server, USER, PASSWORD, "diffusion:jobs*")
    access = RedisAccess(username=USER, password="not-the-password-0000", ca_file=tls_files.ca)
    with caplog.at_level(logging.WARNING):
        gateway = start_gateway(wait_until_ready=False, redis_at=server, redis_access=access)
        logged = unready_for(gateway, caplog)
    assert "invalid username-password pair" in logged or "WRONGPASS" in logged
    assert "not-the-password-0000" not in logged and PASSWORD not in logged


@pytest.mark.parametrize(("argv", "named"), [
    (["--redis-ca-file", "{ca}"], "--redis-ca-file is for TLS: --redis-url must then start with rediss://"),
    (["--redis-url", "redis://127.0.0.1:6379/0", "--redis-cert-file", "{cert}", "--redis-key-file", "{key}"],
     "--redis-cert-file is for TLS"),
    (["--redis-url", "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none"], "ssl_cert_reqs"),
    (["--redis-url", "rediss://127.0.0.1:6379/0?ssl_check_hostname=false"], "ssl_check_hostname"),
    (["--redis-url", "rediss://127.0.0.1/0", "--redis-ca-file", "{cert_dir}/nothing.pem"], "--redis-ca-file"),
    (["--redis-url", "rediss://127.0.0.1/0", "--redis-ca-file", "{key}"], "--redis-ca-file"),  # a key, not a CA
    (["--redis-url", "rediss://127.0.0.1/0", "--redis-key-file", "{key}"], "--redis-key-file needs --redis-cert-file"),
    (["--redis-url", "rediss://127.0.0.1/0", "--redis-cert-file", "{cert}", "--redis-key-file", "{server_key}"],
     "--redis-cert-file"),  # a key that is not this certificate's
    (["--redis-username", "two words"], "--redis-username"),
])
def test_bad_redis_tls_settings_exit_2_naming_the_flag(tls_files, capsys, argv, named):
    files = {"ca": tls_files.ca, "cert": tls_files.client_cert, "key": tls_files.client_key,
             "server_key": tls_files.server_key, "cert_dir": str(Path(tls_files.ca).parent)}
    with pytest.raises(SystemExit) as exited:
        main([arg.format(**files) for arg in argv])
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_the_process_serves_with_tls_an_acl_user_and_an_api_key_from_files(start_tls_redis, tls_files, tmp_path):
    server = start_tls_redis(require_client_cert=True)
    add_acl_user(server, USER, PASSWORD, "proc:jobs*")
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    (tmp_path / "api-keys").write_text("process-api-key-0123456789\n")
    port = free_port()
    env = {**os.environ, "GATEWAY_REDIS_URL": server.url, "GATEWAY_STREAM": "proc:jobs",
           "GATEWAY_REDIS_USERNAME": USER, "GATEWAY_REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"),
           "GATEWAY_REDIS_CA_FILE": tls_files.ca, "GATEWAY_REDIS_CERT_FILE": tls_files.client_cert,
           "GATEWAY_REDIS_KEY_FILE": tls_files.client_key, "GATEWAY_API_KEY_FILE": str(tmp_path / "api-keys")}
    process = subprocess.Popen([sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=30)
        assert requests.post(f"{url}/v1/jobs", json={"prompt": "a red fox"}, timeout=10).status_code == 401
        answer = requests.post(f"{url}/v1/jobs", json={"prompt": "a red fox"}, timeout=10,
                               headers={"Authorization": "Bearer process-api-key-0123456789"})
        assert answer.status_code == 202, answer.text
        with server.client() as admin:
            assert admin.hget(QueueKeys("proc:jobs").job(answer.json()["id"]), "status") == b"queued"
        assert USER in connected_users(server)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "API key needed: 1 accepted" in output
    assert PASSWORD not in output and "process-api-key-0123456789" not in output
