"""Pull mode's Redis client against a real redis-server serving TLS (certificates made for the
test), as an ACL user made with a real `ACL SETUSER`: the consumer takes and finishes jobs with
the CA and its client certificate, and stays unready, saying why, without the CA or with a
wrong password; bad TLS settings exit 2 naming the flag; and `python -m worker serve` runs
with all of it and an API key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from contract import jobqueue
from contract.redisaccess import RedisAccess
from lab.localprom import free_port
from tests.conftest import add_acl_user
from worker.__main__ import main
from worker.queueconfig import QueueConfig

from .conftest import REPO
from .test_pull import Puller, ended, enqueue, job, pull_worker, wait_for

USER, PASSWORD = "worker", "worker-acl-password-42"


@pytest.fixture
def start_puller_at(tiny_runner):
    """A pull-mode worker in-process, as test_pull's, on the given URL and Redis access."""
    started: list[Puller] = []

    def start(url: str, access: RedisAccess) -> Puller:
        puller = pull_worker(tiny_runner, QueueConfig(url=url, access=access))
        started.append(puller)
        return puller

    yield start
    for puller in started:
        puller.close()


def test_pull_mode_takes_and_finishes_jobs_over_mutual_tls_as_an_acl_user(start_tls_redis, start_puller_at, tls_files):
    server = start_tls_redis(require_client_cert=True)
    add_acl_user(server, USER, PASSWORD, "diffusion:jobs*")
    with server.client() as admin:
        job_ids = [enqueue(admin, f"harbour {index}", seed=index) for index in range(3)]
        start_puller_at(server.url, RedisAccess(username=USER, password=PASSWORD, ca_file=tls_files.ca,
                                                cert_file=tls_files.client_cert, key_file=tls_files.client_key))
        wait_for(lambda: ended(admin, *job_ids), what="every job ended")
        assert [job(admin, job_id)["status"] for job_id in job_ids] == [jobqueue.DONE] * 3
        assert USER in {client["user"] for client in admin.client_list()}


@pytest.mark.parametrize(("ca", "password", "why"), [
    ("system", PASSWORD, "CERTIFICATE_VERIFY_FAILED"),
    ("other", PASSWORD, "CERTIFICATE_VERIFY_FAILED"),
    ("ours", "not-the-password-0000", "invalid username-password pair"),
])
def test_pull_mode_stays_unready_and_says_why_when_it_cannot_trust_or_log_in(
        start_tls_redis, start_puller_at, tls_files, ca, password, why):
    server = start_tls_redis()
    add_acl_user(server, USER, PASSWORD, "diffusion:jobs*")
    with server.client() as admin:
        job_id = enqueue(admin)
        ca_file = {"system": None, "other": tls_files.other_ca, "ours": tls_files.ca}[ca]
        puller = start_puller_at(server.url, RedisAccess(username=USER, password=password, ca_file=ca_file))
        wait_for(lambda: puller.service.unready_reason is not None and why in puller.service.unready_reason,
                 timeout_s=15, what=f"readiness false for {why}")
        assert "not-the-password-0000" not in puller.service.unready_reason
        assert job(admin, job_id)["status"] == jobqueue.QUEUED and puller.runner.calls == []


@pytest.mark.parametrize(("argv", "named"), [
    (["--queue", "redis://127.0.0.1/0", "--redis-ca-file", "{ca}"], "--redis-ca-file is for TLS: --queue must"),
    (["--queue", "rediss://127.0.0.1/0?ssl_cert_reqs=none"], "ssl_cert_reqs"),
    (["--queue", "rediss://127.0.0.1/0", "--redis-ca-file", "{key}"], "--redis-ca-file"),
    (["--queue", "rediss://127.0.0.1/0", "--redis-key-file", "{key}"], "--redis-key-file needs --redis-cert-file"),
    (["--queue", "rediss://127.0.0.1/0", "--redis-cert-file", "{cert}", "--redis-key-file", "{server_key}"],
     "--redis-cert-file"),
])
def test_serve_refuses_bad_redis_tls_settings_naming_the_flag(tls_files, capsys, argv, named):
    files = {"ca": tls_files.ca, "cert": tls_files.client_cert, "key": tls_files.client_key,
             "server_key": tls_files.server_key}
    assert main(["serve", "--model", "m", *[arg.format(**files) for arg in argv]]) == 2
    assert named in capsys.readouterr().err


def test_serve_pulls_over_tls_as_an_acl_user_and_its_api_wants_the_key(tiny_model, start_tls_redis, tls_files,
                                                                        tmp_path):
    server = start_tls_redis(require_client_cert=True)
    add_acl_user(server, USER, PASSWORD, "diffusion:jobs*")
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    (tmp_path / "api-keys").write_text("worker-process-key-0123456789\n")
    port = free_port()
    env = {**os.environ, "WORKER_QUEUE": server.url, "WORKER_REDIS_USERNAME": USER,
           "WORKER_REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"), "WORKER_REDIS_CA_FILE": tls_files.ca,
           "WORKER_REDIS_CERT_FILE": tls_files.client_cert, "WORKER_REDIS_KEY_FILE": tls_files.client_key,
           "WORKER_API_KEY_FILE": str(tmp_path / "api-keys")}
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--model", str(tiny_model), "--host", "127.0.0.1", "--port",
         str(port), "--device", "cpu", "--max-batch-size", "2", "--encode-processes", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, "the worker exited"
            try:
                return requests.get(f"{url}/readyz", timeout=2).status_code == 200  # the queue answers, too
            except requests.RequestException:
                return False

        wait_for(ready, timeout_s=120, what="the worker ready")
        with server.client() as admin:
            job_id = enqueue(admin)
            wait_for(lambda: ended(admin, job_id), what="the job ended")
            assert job(admin, job_id)["status"] == jobqueue.DONE
        body = {"prompt": "a red fox", "num_inference_steps": 1}
        assert requests.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 401
        answer = requests.post(f"{url}/v1/images/generations", json=body, timeout=60,
                               headers={"Authorization": "Bearer worker-process-key-0123456789"})
        assert answer.status_code == 200, answer.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "API key needed: 1 accepted" in output
    assert PASSWORD not in output and "worker-process-key-0123456789" not in output
