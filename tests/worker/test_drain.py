"""SIGTERM on the real `python -m worker serve` process under load: nothing accepted is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from lab.localprom import free_port

from .conftest import REPO


def start_process(model, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return process, url
            except requests.RequestException:  # not listening yet, or too busy loading to answer
                pass
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.1)
    except BaseException:
        process.kill()  # never leave a worker behind a failed start
        process.wait()
        raise


def in_flight(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("diffusion_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no diffusion_requests_in_flight in /metrics")


def test_sigterm_under_load_answers_every_accepted_request_then_exits_0(tiny_model):
    process, url = start_process(tiny_model, "--max-batch-size", "2", "--max-wait-ms", "20")
    try:
        accepted = 12
        body = {"prompt": "a busy queue", "num_inference_steps": 25, "size": "128x128"}
        with ThreadPoolExecutor(max_workers=accepted) as pool:
            futures = [
                pool.submit(requests.post, f"{url}/v1/images/generations", json={**body, "seed": index}, timeout=120)
                for index in range(accepted)
            ]
            deadline = time.monotonic() + 30
            while in_flight(url) < accepted:
                assert time.monotonic() < deadline, "the load never queued up"
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            # at once: not ready, and new work is refused with 503, while the accepted work goes on
            deadline = time.monotonic() + 5
            while requests.get(f"{url}/readyz", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "readiness stayed true after SIGTERM"
            late = requests.post(f"{url}/v1/images/generations", json=body, timeout=10)
            assert late.status_code == 503 and late.headers["Retry-After"] == "1"
            assert in_flight(url) > 0, "the drain was not under load when probed"
            responses = [future.result() for future in futures]
        assert [response.status_code for response in responses] == [200] * accepted
        assert [response.json()["data"][0]["seed"] for response in responses] == list(range(accepted))
        assert process.wait(timeout=60) == 0
        assert "drain complete" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_drain_that_outlasts_its_timeout_exits_1(tiny_model):
    process, url = start_process(tiny_model, "--max-batch-size", "1", "--drain-timeout", "0.5")
    try:
        body = {"prompt": "slow", "num_inference_steps": 40, "size": "256x256", "n": 4}
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(requests.post, f"{url}/v1/images/generations", json=body, timeout=60)
                       for _ in range(2)]
            deadline = time.monotonic() + 30
            while in_flight(url) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGTERM)
            assert process.wait(timeout=60) == 1
            for future in futures:
                try:
                    future.result()
                except requests.RequestException:
                    pass  # the connection died with the process, as it must past the timeout
        assert "drain timed out" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_a_directory_that_is_not_a_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--model", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "no model_index.json" in result.stderr and "make-model" in result.stderr
