"""`python -m gateway`: its flags, their environment variables and errors, docs/GATEWAY.md kept
true to them, and the real process serving against a Redis that wants a password."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry

from contract import names
from contract.jobqueue import QueueKeys
from gateway.__main__ import build_parser, main
from gateway.metrics import GatewayMetrics
from lab.localprom import free_port
from lab.localredis import LocalRedis
from tests.gateway.conftest import wait_ready

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "GATEWAY.md").read_text()


def flags() -> list[str]:
    return [option for action in build_parser()._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def test_help_lists_every_flag_with_its_environment_variable():
    result = subprocess.run([sys.executable, "-m", "gateway", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in flags():
        assert flag in text
        assert f"GATEWAY_{flag[2:].upper().replace('-', '_')}" in text, flag


@pytest.mark.parametrize("argv, named", [
    (["--port", "70000"], "--port"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--result-ttl", "-5"], "--result-ttl"),
    (["--max-backlog", "0"], "--max-backlog"),
    (["--idempotency-ttl", "1.5"], "--idempotency-ttl"),
    (["--max-image-side", "4096"], "--max-image-side"),
    (["--max-image-side", "0"], "--max-image-side"),
    (["--redis-url", "http://127.0.0.1:6379"], "--redis-url"),
    (["--redis-url", "redis://:hunter2@127.0.0.1:6379/0"], "--redis-password-file"),
    (["--redis-url", "redis://127.0.0.1:6379/0?password=hunter2"], "--redis-password-file"),
    (["--redis-password-file", "/no/such/file"], "--redis-password-file"),
    (["--stream", "two words"], "--stream"),
    (["--log-level", "loud"], "--log-level"),
])
def test_a_bad_value_exits_2_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert named in error and "hunter2" not in error


def test_a_bad_value_from_the_environment_exits_2_naming_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_MAX_BACKLOG", "none")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "--max-backlog" in capsys.readouterr().err


def test_max_image_side_comes_from_its_flag_or_the_environment(monkeypatch):
    assert build_parser().parse_args([]).max_image_side == 1024  # the workers' --max-image-side default
    monkeypatch.setenv("GATEWAY_MAX_IMAGE_SIDE", "768")
    assert build_parser().parse_args([]).max_image_side == 768
    assert build_parser().parse_args(["--max-image-side", "512"]).max_image_side == 512


def test_every_flag_is_in_the_docs_flag_table():
    assert [flag for flag in flags() if f"| `{flag}` |" not in DOC] == []


def test_the_gateway_registers_the_contracts_metrics_and_the_docs_describe_each():
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    families = {family.name: family.type for family in registry.collect()}
    assert sorted(families) == sorted(set(names.GATEWAY_METRICS) - {names.GATEWAY_BACKLOG})  # absent until read
    exposed = [name + ("_total" if families.get(name) == "counter" else "") for name in names.GATEWAY_METRICS]
    assert [name for name in exposed if f"`{name}" not in DOC] == []


def test_the_process_serves_against_a_redis_with_a_password_from_a_file_and_stops_on_sigterm(tmp_path):
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-from-a-secret\n")
    port = free_port()
    with LocalRedis(password="s3cret-from-a-secret") as server:
        env = {**os.environ, "GATEWAY_REDIS_URL": server.url, "GATEWAY_STREAM": "proc:jobs"}
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), "--redis-password-file",
             str(secret), "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout_s=30)
            response = requests.post(f"{url}/v1/jobs", json={"prompt": "a red fox"}, timeout=10)
            assert response.status_code == 202, response.text
            with server.client() as client:
                assert client.xlen("proc:jobs") == 1
                assert client.hget(QueueKeys("proc:jobs").job(response.json()["id"]), "status") == b"queued"
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
            output = process.communicate()[0]
    assert "s3cret" not in output
