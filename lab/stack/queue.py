"""The local stack's queue mode: Redis (append-only), the gateway in front, pull-mode workers.

Clients post to the gateway, which holds each request on the Redis stream until a worker pulls
it; the scaler reads the stream's backlog, so a fleet at zero replicas still shows its demand
and KEDA's activation wakes it. `QueueFront` starts and stops the two processes that mode adds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from lab.localprom import free_port
from lab.localredis import LocalRedis

STREAM = "diffusion:local:sd-worker"  # one stream per scale target, named for its namespace and Deployment


class QueueFront:
    """A redis-server and a gateway process (`python -m gateway`) on loopback ports."""

    def __init__(self, log_dir: Path, request_timeout_s: float = 300.0) -> None:
        self.redis = LocalRedis()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = log_dir
        self._request_timeout_s = request_timeout_s
        self._gateway: subprocess.Popen | None = None

    def worker_flags(self, claim_idle_s: float = 15.0) -> tuple[str, ...]:
        """What makes a worker pull from this stack's stream."""
        return ("--queue", self.redis.url, "--stream", STREAM, "--claim-idle", f"{claim_idle_s:g}")

    def scaler_metadata(self) -> dict[str, str]:
        """The trigger metadata that points the scaler's queue signal at the stream."""
        return {"redisAddress": self.redis.url, "stream": STREAM, "activationQueue": "0"}

    def start(self, timeout_s: float = 60.0) -> None:
        self.redis.start()
        with open(self._log_dir / "gateway.log", "wb") as log:  # the child keeps its own descriptor
            self._gateway = self._spawn(log)
        deadline = time.monotonic() + timeout_s
        self._wait_ready(deadline, timeout_s)

    def _spawn(self, log) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port), "--redis-url",
             self.redis.url, "--stream", STREAM, "--request-timeout", f"{self._request_timeout_s:g}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ},
        )

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        assert self._gateway is not None
        while True:
            if self._gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self._gateway.returncode}; "
                                   f"see {self._log_dir / 'gateway.log'}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway was not ready within {timeout_s:g}s; see {self._log_dir / 'gateway.log'}")
            time.sleep(0.2)

    def close(self) -> None:
        if self._gateway is not None and self._gateway.poll() is None:
            self._gateway.send_signal(signal.SIGTERM)
            try:
                self._gateway.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._gateway.pid, signal.SIGKILL)
                self._gateway.wait()
        self.redis.close()
