"""A real Prometheus server (the `prometheus` binary, e.g. Debian's package) on loopback.

Used by the integration tests, the benchmark and the local demo: a generated config with a
short scrape interval, a private data directory, and start/stop/pause/resume for fault
injection (pause is SIGSTOP: the server holds connections open and answers nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests


class PrometheusNotFound(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusNotFound(
            "the prometheus binary is not on PATH; on Debian or Ubuntu: sudo apt-get install -y prometheus"
        )
    return path


def render_config(targets: list[str], scrape_interval_s: float, job: str = "fleet") -> str:
    listed = ", ".join(f"'{t}'" for t in targets)
    interval = f"{int(scrape_interval_s * 1000)}ms"
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        "scrape_configs:\n"
        f"  - job_name: {job}\n"
        f"    scrape_timeout: {interval}\n"
        "    static_configs:\n"
        f"      - targets: [{listed}]\n"
    )


class LocalPrometheus:
    """One Prometheus process scraping `targets` (host:port strings) every `scrape_interval_s`."""

    def __init__(
        self,
        targets: list[str],
        scrape_interval_s: float = 1.0,
        port: int | None = None,
        config_text: str | None = None,
        files: dict[str, str] | None = None,
    ):
        """`config_text` replaces the generated config; `files` (name -> text) are written
        beside it, for rule files it names by relative path."""
        self.binary = find_binary()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="localprom-"))
        for name, text in (files or {}).items():
            (self._dir / name).write_text(text)
        (self._dir / "prometheus.yml").write_text(config_text or render_config(targets, scrape_interval_s))
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        self._log = open(self._dir / "prometheus.log", "ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self._dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus was not ready within {timeout_s:g}s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_for_scrapes(self, targets: int = 1, timeout_s: float = 30.0) -> None:
        """Blocks until `targets` scrape targets have been scraped once (Prometheus only
        starts scraping a few seconds after it is ready)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                answer = requests.get(f"{self.url}/api/v1/query", params={"query": "up"}, timeout=2).json()
                if len(answer["data"]["result"]) >= targets:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus scraped fewer than {targets} targets within {timeout_s:g}s")

    def log_tail(self, lines: int = 20) -> str:
        path = self._dir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def pause(self) -> None:
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stops the process; the data directory stays, so `start` again resumes its history."""
        if self._process is not None and self._process.poll() is None:
            self.resume()  # a stopped process cannot handle SIGTERM
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
