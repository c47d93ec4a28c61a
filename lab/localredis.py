"""A real Redis server (Debian's `redis-server`, 7.x) on loopback, with persistence.

Used by the tests, the benchmark and the local stack: a private directory, append-only file
with `appendfsync always` (an accepted job survives a crash of the server, not just a clean
restart), `maxmemory-policy noeviction` (a full server refuses writes rather than drop a job),
no RDB snapshots, and start/stop/kill/restart for fault injection. The data directory
outlives a restart, so what was acknowledged before it is there after it. With `ServerTls` it
serves TLS only (`rediss://`), optionally requiring client certificates.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from lab.localprom import free_port


class RedisNotFound(RuntimeError):
    pass


def find_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisNotFound(
            "the redis-server binary is not on PATH; on Debian or Ubuntu: sudo apt-get install -y redis-server"
        )
    return path


@dataclass(frozen=True)
class ServerTls:
    """TLS for a LocalRedis, PEM files: the server's certificate and key, the CA that signed it
    and checks clients' certificates, and whether clients must present one (mutual TLS). The
    server's own client (its readiness check, `client()`) presents `client_cert_file` and
    `client_key_file` when given."""

    cert_file: str
    key_file: str
    ca_file: str
    require_client_cert: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None


class LocalRedis:
    """One redis-server process on 127.0.0.1:`port`, its data in a private directory; with
    `tls`, TLS only on that port (and `url` is rediss://)."""

    def __init__(self, port: int | None = None, password: str | None = None, tls: ServerTls | None = None):
        self.binary = find_binary()
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="localredis-"))
        self._process: subprocess.Popen | None = None

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"port {0 if self.tls else self.port}",
            f"dir {self.dir}",
            "appendonly yes",
            "appendfsync always",
            "maxmemory-policy noeviction",  # an evicted job hash is a lost job (contract.jobqueue)
            'save ""',
            "daemonize no",
            "protected-mode yes",
            f"logfile {self.dir / 'redis.log'}",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.tls:
            lines += [f"tls-port {self.port}", f"tls-cert-file {self.tls.cert_file}",
                      f"tls-key-file {self.tls.key_file}", f"tls-ca-cert-file {self.tls.ca_file}",
                      f"tls-auth-clients {'yes' if self.tls.require_client_cert else 'no'}"]
        return "\n".join(lines) + "\n"

    def client(self) -> redis.Redis:
        """A client as the default user (with the password, if any), trusting the server's CA."""
        if self.tls is None:
            return redis.Redis.from_url(self.url, password=self.password)
        return redis.Redis.from_url(self.url, password=self.password, ssl_ca_certs=self.tls.ca_file,
                                    ssl_certfile=self.tls.client_cert_file, ssl_keyfile=self.tls.client_key_file)

    def start(self, timeout_s: float = 15.0) -> LocalRedis:
        config = self.dir / "redis.conf"
        config.write_text(self._config())
        self._process = subprocess.Popen([self.binary, str(config)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if self._process.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {self._process.returncode}; "
                                           f"see {self.dir / 'redis.log'}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s:g}s") from None
                time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """A clean shutdown (SIGTERM: the append-only file is flushed)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: a crash; with appendfsync always, every acknowledged write is on disk."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self, down_s: float = 0.0, crash: bool = False) -> None:
        """Stops (or kills) the server, waits `down_s`, and starts it on the same port and data."""
        self.kill() if crash else self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
