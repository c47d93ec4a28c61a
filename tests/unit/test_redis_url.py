"""One rule for every Redis URL the project takes (the gateway's --redis-url, the worker's
--queue, the scaler's redisAddress): no credentials anywhere in it, a Redis scheme, a host."""

from __future__ import annotations

import pytest

from adapter.config import MetadataError, parse_metadata
from contract.jobqueue import CARRIES_PASSWORD, redis_url_problem
from gateway.config import check_redis_url
from worker.queueconfig import QueueConfig


@pytest.mark.parametrize("url", ["redis://redis.ml.svc:6379/0", "rediss://cache:6380", "unix:///run/redis.sock"])
def test_a_plain_address_is_accepted(url):
    assert redis_url_problem(url) is None


@pytest.mark.parametrize("url", ["redis://:hunter2@redis:6379/0", "redis://admin:hunter2@redis/0",
                                 "redis://admin@redis/0", "redis://redis/0?password=hunter2",
                                 "redis://redis/0?username=admin&password=hunter2"])
def test_credentials_are_refused_wherever_they_sit(url):
    assert redis_url_problem(url) == CARRIES_PASSWORD
    with pytest.raises(ValueError, match="--redis-url carries a password") as gateway:
        check_redis_url(url)
    with pytest.raises(ValueError, match="--queue carries a password") as worker:
        QueueConfig(url=url)
    with pytest.raises(MetadataError, match="credentials never go in metadata") as scaler:
        parse_metadata({"prometheusAddress": "http://prometheus:9090", "redisAddress": url})
    for refused in (gateway, worker, scaler):
        assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(("url", "problem"), [("http://redis:6379", "must start with"), ("redis:///0", "names no host"),
                                              ("redis://redis:99999/0", "not a valid URL")])
def test_a_url_that_names_no_redis_is_refused_with_the_reason(url, problem):
    assert problem in redis_url_problem(url)
    with pytest.raises(ValueError, match=problem):
        check_redis_url(url)
    with pytest.raises(ValueError, match=problem):
        QueueConfig(url=url)
