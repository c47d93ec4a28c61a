"""How the worker's and the gateway's Redis clients authenticate and check TLS
(`contract.redisaccess`): what reaches redis-py, what never does, and the URL options refused
because redis-py would let them override the checks. Real TLS connections are in
tests/gateway/test_redis_tls.py and tests/worker/test_redis_tls.py."""

from __future__ import annotations

import argparse

import pytest
import redis.asyncio as aioredis

from contract.cli import Environment
from contract.jobqueue import redis_url_problem
from contract.redisaccess import RedisAccess, add_redis_flags, redis_access_from


def test_the_client_gets_the_user_the_password_and_the_tls_files_and_nothing_that_relaxes_a_check(tls_files):
    access = RedisAccess(username="gateway", password="s3cret-password", ca_file=tls_files.ca,
                         cert_file=tls_files.client_cert, key_file=tls_files.client_key)
    assert access.client_options() == {"username": "gateway", "password": "s3cret-password",
                                       "ssl_ca_certs": tls_files.ca, "ssl_certfile": tls_files.client_cert,
                                       "ssl_keyfile": tls_files.client_key}
    client = aioredis.Redis.from_url("rediss://127.0.0.1:6380/0", **access.client_options())
    connection = client.connection_pool.connection_class(**client.connection_pool.connection_kwargs)
    assert connection.cert_reqs.name == "CERT_REQUIRED" and connection.check_hostname is True
    assert "s3cret-password" not in repr(access)


def test_without_tls_files_a_plain_url_gets_only_credentials():
    access = RedisAccess(password="s3cret-password")
    access.check_url("redis://127.0.0.1/0", "--queue")
    assert access.client_options() == {"username": None, "password": "s3cret-password"}


@pytest.mark.parametrize("url", ["redis://127.0.0.1/0", "unix:///run/redis.sock"])
def test_tls_files_with_a_url_that_is_not_rediss_are_refused(tls_files, url):
    with pytest.raises(ValueError, match="--redis-ca-file is for TLS: --redis-url must then start with rediss://"):
        RedisAccess(ca_file=tls_files.ca).check_url(url, "--redis-url")


@pytest.mark.parametrize("query", ["ssl_cert_reqs=none", "ssl_check_hostname=false", "ssl_ca_certs=/etc/passwd",
                                   "db=0&ssl_keyfile=/tmp/k"])
def test_a_url_setting_tls_options_is_refused(query):
    problem = redis_url_problem(f"rediss://redis:6380/0?{query}")
    assert problem is not None and "sets TLS options in its query" in problem


def test_the_flags_come_from_the_environment_and_the_password_from_its_file_first(tmp_path, tls_files,
                                                                                 monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")
    for name, value in {"REDIS_USERNAME": "ops", "REDIS_PASSWORD_FILE": str(secret),
                        "REDIS_PASSWORD": "from-the-variable", "REDIS_CA_FILE": tls_files.ca}.items():
        monkeypatch.setenv("APP_" + name, value)
    env = Environment("APP_")
    parser = argparse.ArgumentParser()
    add_redis_flags(parser.add_argument, env)
    access = redis_access_from(parser.parse_args([]), env)
    assert (access.username, access.password, access.ca_file) == ("ops", "from-the-file", tls_files.ca)
    access = redis_access_from(parser.parse_args(["--redis-password-file", ""]), env)
    assert access.password == "from-the-variable"
    with pytest.raises(ValueError, match="--redis-password-file /no/such: cannot read it"):
        redis_access_from(parser.parse_args(["--redis-password-file", "/no/such"]), env)
