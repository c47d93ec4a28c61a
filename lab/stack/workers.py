"""Worker processes on one machine, scaled like a Deployment, behind a least-loaded balancer.

`WorkerFleet` starts `python -m worker serve` processes (one port each), reports how many are
ready (`/readyz`), and scales to a count: new workers start at once, surplus ones get SIGTERM
and drain (the newest first, as a ReplicaSet prefers the youngest pods). Every process is
in its own session and is killed on `close()`, so a failed run leaves no orphans.

`Balancer` is the Service in front: an HTTP proxy that sends each generation request to the
ready worker with the fewest requests in flight.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests
from aiohttp import web

from lab.localprom import free_port

log = logging.getLogger("lab.stack.workers")


@dataclass
class WorkerProcess:
    name: str
    port: int
    process: subprocess.Popen
    started_at: float
    ready: bool = False
    ready_at: float | None = None  # when /readyz first answered 200
    draining: bool = False
    in_flight: int = 0  # requests the balancer has sent and not yet seen answered
    gpu: int | None = None  # the GPU this worker owns (CUDA_VISIBLE_DEVICES)
    exporter: subprocess.Popen | None = None  # its exporter sidecar, when GPUs are exported
    exporter_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def exporter_address(self) -> str | None:
        return f"127.0.0.1:{self.exporter_port}" if self.exporter_port else None


@dataclass
class WorkerFleet:
    model: Path
    flags: tuple[str, ...] = ()
    log_dir: Path | None = None
    device: str = "cpu"
    gpus: tuple[int, ...] = ()  # with GPUs: one worker per GPU, each with an exporter beside it
    exporters: bool = False
    workers: list[WorkerProcess] = field(default_factory=list)
    startup_delays: list[float] = field(default_factory=list)  # seconds from start to first ready, per worker
    _serial: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- scaling ----------------------------------------------------------------------------

    def scale_to(self, replicas: int) -> None:
        """Starts or drains workers to reach `replicas`; with GPUs, never more than one per GPU."""
        with self._lock:
            serving = [w for w in self.workers if not w.draining and w.alive()]
            if self.gpus:
                replicas = min(replicas, len(self.gpus))
            for _ in range(replicas - len(serving)):
                gpu = self._free_gpu()
                if self.gpus and gpu is None:
                    break  # a draining worker still holds the GPU; the next sync retries
                self.workers.append(self._start(gpu))
            for worker in sorted(serving, key=lambda w: w.started_at, reverse=True)[: max(0, len(serving) - replicas)]:
                self._drain(worker)

    def _free_gpu(self) -> int | None:
        if not self.gpus:
            return None
        taken = {w.gpu for w in self.workers if w.alive()}
        return next((gpu for gpu in self.gpus if gpu not in taken), None)

    def _start(self, gpu: int | None) -> WorkerProcess:
        self._serial += 1
        name = f"worker-{self._serial}"
        port = free_port()
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        command = [sys.executable, "-m", "worker", "serve", "--model", str(self.model), "--host", "127.0.0.1",
                   "--port", str(port), "--device", self.device, *self.flags]
        process = subprocess.Popen(command, stdout=self._log(name), stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        worker = WorkerProcess(name, port, process, time.monotonic(), gpu=gpu)
        if self.exporters:
            # The sidecar of this worker: its GPU only, labelled with the worker's name as the pod.
            worker.exporter_port = free_port()
            exporter_env = {**os.environ, "POD_NAME": name, "POD_NAMESPACE": "local", "CONTAINER_NAME": "worker"}
            worker.exporter = subprocess.Popen(
                [sys.executable, "-m", "exporter", "--listen-address", "127.0.0.1", "--port", str(worker.exporter_port),
                 "--visible-devices", str(gpu) if gpu is not None else "all"],
                stdout=self._log(f"{name}-exporter"), stderr=subprocess.STDOUT, env=exporter_env,
                start_new_session=True,
            )
        log.info("started %s on port %d%s", name, port, f" (GPU {gpu})" if gpu is not None else "")
        return worker

    def _log(self, name: str):
        return open(self.log_dir / f"{name}.log", "wb") if self.log_dir else subprocess.DEVNULL

    def _drain(self, worker: WorkerProcess) -> None:
        worker.draining = True
        worker.ready = False
        if worker.alive():
            worker.process.send_signal(signal.SIGTERM)
            log.info("draining %s", worker.name)

    # -- state ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Polls readiness and forgets workers that have exited (drained or crashed)."""
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            if not worker.alive():
                if not worker.draining:
                    log.warning("%s exited with %s", worker.name, worker.process.returncode)
                _stop(worker.exporter)
                with self._lock:
                    self.workers.remove(worker)
                continue
            if worker.draining:
                continue
            try:
                worker.ready = requests.get(f"http://{worker.address}/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                worker.ready = False
            if worker.ready and worker.ready_at is None:
                worker.ready_at = time.monotonic()
                self.startup_delays.append(worker.ready_at - worker.started_at)

    @property
    def desired(self) -> int:
        return sum(1 for w in self.workers if not w.draining)

    @property
    def ready(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.ready and not w.draining]

    def ready_count(self) -> int:
        return len(self.ready)

    def addresses(self) -> list[str]:
        """Every live worker's metrics address, draining ones included (they still report)."""
        return [w.address for w in self.workers if w.alive()]

    def exporter_addresses(self) -> list[tuple[str, str]]:
        """(address, worker name) of every live worker's exporter."""
        return [(w.exporter_address, w.name) for w in self.workers if w.alive() and w.exporter_address]

    # -- teardown ---------------------------------------------------------------------------

    def close(self, drain_s: float = 10.0) -> None:
        """SIGTERM to all, then SIGKILL to whatever is left after `drain_s`; reaps every process."""
        with self._lock:
            workers = list(self.workers)
        for worker in workers:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_s
        for worker in workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
            _stop(worker.exporter)
        with self._lock:
            self.workers.clear()


class Balancer:
    """Routes POST /v1/images/generations to the ready worker with the fewest requests in flight."""

    def __init__(self, fleet: WorkerFleet) -> None:
        self.fleet = fleet
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, port: int = 0) -> int:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self._forward)
        # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive closes them from
        # the worker's side: a request sent on a connection the worker is closing at that moment
        # is lost ("Server disconnected"; one CI run failed a request so).
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                              connector=aiohttp.TCPConnector(keepalive_timeout=2.0))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self.port

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        for _ in range(3):  # a worker that began draining after it was picked answers 503
            ready = self.fleet.ready
            if not ready:
                return web.json_response({"detail": "no worker is ready"}, status=503, headers={"Retry-After": "1"})
            worker = min(ready, key=lambda w: (w.in_flight, w.started_at))
            worker.in_flight += 1
            try:
                async with self._session.post(f"http://{worker.address}/v1/images/generations", data=body,
                                              headers={"Content-Type": "application/json"}) as answer:
                    payload = await answer.read()
                    if answer.status == 503 and worker.draining:
                        continue
                    return web.Response(body=payload, status=answer.status, content_type="application/json",
                                        headers={k: v for k, v in answer.headers.items() if k == "Retry-After"})
            except aiohttp.ServerDisconnectedError as error:
                # closed before an answer: a keep-alive connection the worker was closing, or a worker
                # that exited (refresh() will see it); the request goes to another try, as a client
                # would retry it (a worker that died mid-batch may then have run it twice)
                log.warning("%s closed the connection before answering; trying again: %s", worker.name, error)
            except aiohttp.ClientError as error:
                log.warning("%s failed a request: %s", worker.name, error)
                worker.ready = False
            finally:
                worker.in_flight -= 1
        return web.json_response({"detail": "no worker answered"}, status=502)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


def _stop(process: subprocess.Popen | None) -> None:
    """SIGTERM, a short wait, then SIGKILL: an exporter has nothing to drain."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
