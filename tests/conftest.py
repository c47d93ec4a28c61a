"""Fixtures every test directory may use: a real Redis server (Debian's redis-server), plain or
serving TLS with certificates made for the test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.localredis import LocalRedis, RedisNotFound, ServerTls


def _local_redis(**options) -> LocalRedis:
    """A LocalRedis, not started; skips the test where redis-server is missing (fails on CI)."""
    try:
        return LocalRedis(**options)
    except RedisNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install redis-server (tools/ensure-redis.sh): {e}")
        pytest.skip(str(e))


@pytest.fixture
def redis_server():
    """A fresh redis-server on a loopback port with its own append-only data; closed after the test."""
    server = _local_redis().start()
    yield server
    server.close()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, the server's certificate (127.0.0.1 and localhost) and a client's, both
    signed by it, and another CA that signed neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    from tests.integration.certs import CertificateAuthority

    directory: Path = tmp_path_factory.mktemp("tls")
    ca, other = CertificateAuthority("redis-test-ca"), CertificateAuthority("someone-elses-ca")
    (directory / "ca.pem").write_bytes(ca.pem)
    (directory / "other-ca.pem").write_bytes(other.pem)
    server_cert, server_key = ca.write_server_files(directory)
    client_cert, client_key = ca.issue("diffusion-client", client=True)
    (directory / "client.crt").write_bytes(client_cert)
    (directory / "client.key").write_bytes(client_key)
    return TlsFiles(str(directory / "ca.pem"), server_cert, server_key, str(directory / "client.crt"),
                    str(directory / "client.key"), str(directory / "other-ca.pem"))


REDIS_ADMIN_PASSWORD = "admin-password-of-the-default-user"


@pytest.fixture
def start_tls_redis(tls_files) -> Iterator[Callable[..., LocalRedis]]:
    """Starts redis-servers serving TLS only, the default user's password REDIS_ADMIN_PASSWORD;
    `require_client_cert` makes it mutual TLS. `server.client()` is the admin's client."""
    started: list[LocalRedis] = []

    def start(require_client_cert: bool = False) -> LocalRedis:
        tls = ServerTls(tls_files.server_cert, tls_files.server_key, tls_files.ca, require_client_cert,
                        tls_files.client_cert, tls_files.client_key)
        server = _local_redis(password=REDIS_ADMIN_PASSWORD, tls=tls)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


def add_acl_user(server: LocalRedis, user: str, password: str, key_pattern: str) -> None:
    """`ACL SETUSER`: a user with `password` that may run any command on keys matching
    `key_pattern` only."""
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{key_pattern}", "+@all")
