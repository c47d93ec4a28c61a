"""Fixtures every test directory may use: a real Redis server (Debian's redis-server)."""

from __future__ import annotations

import os

import pytest

from lab.localredis import LocalRedis, RedisNotFound


@pytest.fixture
def redis_server():
    """A fresh redis-server on a loopback port with its own append-only data; closed after the test."""
    try:
        server = LocalRedis().start()
    except RedisNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install redis-server (tools/ensure-redis.sh): {e}")
        pytest.skip(str(e))
    yield server
    server.close()
