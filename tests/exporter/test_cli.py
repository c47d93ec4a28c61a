"""`python -m exporter` as a real process with the real pynvml: no driver here, still up and serving."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from contract import names
from lab.localprom import free_port

REPO = Path(__file__).resolve().parents[2]


def test_the_process_serves_without_a_driver_and_stops_on_sigterm():
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    except pynvml.NVMLError:
        pass
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "exporter", "--listen-address", "127.0.0.1", "--port", str(port),
                                "--interval", "0.2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                if names.EXPORTER_COLLECTIONS + "_total" in text:
                    break
            except requests.RequestException:  # not up yet, or too busy to answer in time
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert f"{names.EXPORTER_NVML_UP} 0.0" in text
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        time.sleep(1.0)  # several collections: the error is logged once, not each time
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = process.stdout.read()
        assert log.count("NVML unavailable") == 1, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_flags_are_refused_with_the_value():
    result = subprocess.run([sys.executable, "-m", "exporter", "--interval", "0"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "must be above 0, got 0" in result.stderr
