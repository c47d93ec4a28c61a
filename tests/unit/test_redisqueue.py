"""The queue read where it lives: a real redis-server's stream backlog, its failures, and the
reader that puts it beside the Prometheus request."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK, AccessRules, parse_networks
from adapter.config import parse_metadata
from contract.redisaccess import RedisAccess
from adapter.policy import Signals
from adapter.reading import absent_is_not_zero, needed_queries
from adapter.redisqueue import QueueFromRedis, RedisBacklog
from adapter.signals import SignalReader
from adapter.targets import Target, Unavailable
from contract import jobqueue, names
from lab.localprom import free_port
from lab.localredis import LocalRedis

from tests.conftest import add_acl_user

from .test_signals import FakePrometheus

STREAM = jobqueue.DEFAULT_STREAM
# These Redis servers run on loopback, which the scaler refuses for a ScaledObject's address by
# default (tests/unit/test_access.py attacks that rule); here loopback is allowed.
LOOPBACK_ALLOWED = parse_networks(DENIED_NETWORKS_BUT_LOOPBACK)


def backlog(password: str | None = None, redis_address: str | None = None, **kwargs) -> RedisBacklog:
    return RedisBacklog(RedisAccess(password=password),
                        rules=AccessRules(redis_address=redis_address, denied_networks=LOOPBACK_ALLOWED), **kwargs)


def spec(address: str, **extra):
    # spareAboveLoad 0: nothing reads the capacity measurements (tests/unit/test_signals.py reads them)
    return parse_metadata({"prometheusAddress": "http://prom:9090", "redisAddress": address, "spareAboveLoad": "0",
                           **extra})


def read_once(address: str, password: str | None = None, **extra):
    async def go():
        source = backlog(password, address)
        try:
            return await source.read(spec(address, **extra))
        finally:
            await source.close()

    return asyncio.run(go())


def create_stream(server: LocalRedis, stream: str = STREAM) -> None:
    """What the gateway and the workers do when they start: the group, and the stream with it."""
    with server.client() as client:
        client.xgroup_create(stream, jobqueue.DEFAULT_GROUP, id="0", mkstream=True)


def connections(server: LocalRedis) -> int:
    """Clients connected to the server, the caller's own included."""
    with server.client() as client:
        return int(client.info("clients")["connected_clients"])


# --- the backlog -----------------------------------------------------------------------------------


def test_the_backlog_is_undelivered_plus_pending_and_a_finished_job_leaves_it(redis_server):
    with redis_server.client() as client:
        client.xgroup_create(STREAM, jobqueue.DEFAULT_GROUP, id="0", mkstream=True)
        for n in range(5):
            client.xadd(STREAM, {jobqueue.JOB_FIELD: f"job-{n}"})
        [[_, taken]] = client.xreadgroup(jobqueue.DEFAULT_GROUP, "worker-a", {STREAM: ">"}, count=2)
        assert client.xpending(STREAM, jobqueue.DEFAULT_GROUP)["pending"] == 2  # 3 undelivered, 2 in hand
        assert read_once(redis_server.url).value == 5

        entry_id = taken[0][0]
        keys = jobqueue.QueueKeys()
        client.eval(jobqueue.FINISH, 3, keys.job("job-0"), STREAM, keys.done("job-0"),
                    jobqueue.DEFAULT_GROUP, entry_id, jobqueue.DONE, "result", "[]", time.time(), 60)
    outcome = read_once(redis_server.url)
    assert (outcome.value, outcome.error) == (4, None)


def test_an_existing_empty_stream_is_a_real_zero_even_after_a_busy_fleet(redis_server):
    create_stream(redis_server)
    outcome = read_once(redis_server.url)
    assert (outcome.name, outcome.value, outcome.error) == (names.QUEUE, 0.0, None)

    # Every job ended: FINISH deleted each entry, and the stream, empty, still exists.
    keys = jobqueue.QueueKeys()
    with redis_server.client() as client:
        client.xadd(STREAM, {jobqueue.JOB_FIELD: "job-0"})
        [[_, [(entry_id, _)]]] = client.xreadgroup(jobqueue.DEFAULT_GROUP, "worker-a", {STREAM: ">"}, count=1)
        client.eval(jobqueue.FINISH, 3, keys.job("job-0"), STREAM, keys.done("job-0"),
                    jobqueue.DEFAULT_GROUP, entry_id, jobqueue.DONE, "result", "[]", time.time(), 60)
        assert client.exists(STREAM) == 1

    async def go():
        fake = FakePrometheus({names.READY: 4.0})
        return await QueueFromRedis(SignalReader(fake, 4), backlog()).read(spec(redis_server.url, signals="queue"))

    reading = asyncio.run(go())
    # Everything ended: 0 is believed though 4 replicas were busy, unlike an empty PromQL answer.
    checked = absent_is_not_zero(reading, Signals(queue=40, ready_replicas=4))
    assert checked.signals == Signals(queue=0, ready_replicas=4)


def test_a_stream_that_does_not_exist_is_a_failed_read_naming_the_likely_misconfiguration(redis_server):
    outcome = read_once(redis_server.url, stream="diffusion:typo")
    assert (outcome.name, outcome.value) == (names.QUEUE, None)
    assert outcome.error.startswith(f"Redis at {redis_server.url}, stream 'diffusion:typo': no such stream. "
                                    "Is `stream` the gateway's --stream")
    assert "The gateway and the workers create the stream when they start" in outcome.error


def test_a_stream_that_vanishes_is_missing_data_last_good_value_then_unavailable(redis_server):
    """Redis lost its data (restarted without its append-only file, say) with 12 jobs waiting:
    the target serves its last good value and activity, never 0, until staleAfterSeconds."""
    with redis_server.client() as client:
        for n in range(12):
            client.xadd(STREAM, {jobqueue.JOB_FIELD: f"job-{n}"})
    fake = FakePrometheus({names.READY: 0.0})
    so = spec(redis_server.url, signals="queue", targetQueuePerReplica="4", staleAfterSeconds="20")

    async def read():
        reader = QueueFromRedis(SignalReader(fake, 4), backlog())
        try:
            return await reader.read(so)
        finally:
            await reader.queue.close()

    target = Target(("ml", "sd", ()), "ml", "sd", so, now=0)
    target.apply(asyncio.run(read()), now=0)
    assert (target.current(0).decision.value, target.is_active(0)) == (3, True)

    with redis_server.client() as client:
        client.flushall()
    target.apply(asyncio.run(read()), now=10)
    assert target.snapshot.signals.queue == 12 and "no such stream" in target.last_error
    assert (target.current(20).decision.value, target.is_active(20)) == (3, True)  # the last good ones, not 0
    with pytest.raises(Unavailable, match="no such stream"):
        target.current(21)
    with pytest.raises(Unavailable, match="no such stream"):
        target.is_active(21)


def test_the_stream_key_names_which_stream(redis_server):
    create_stream(redis_server)
    with redis_server.client() as client:
        client.xadd("other:jobs", {jobqueue.JOB_FIELD: "a"})
        client.xadd("other:jobs", {jobqueue.JOB_FIELD: "b"})
    assert read_once(redis_server.url, stream="other:jobs").value == 2
    assert read_once(redis_server.url).value == 0


# --- failures are missing data, never 0 -------------------------------------------------------------


def test_redis_down_is_a_failed_read_that_names_the_source_at_once():
    address = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    outcome = read_once(address)
    assert time.monotonic() - started < 1.0  # none of redis-py's default retries with backoff
    assert outcome.value is None
    assert outcome.error.startswith(f"Redis at {address}, stream '{STREAM}': ConnectionError: ")
    assert "Connect call failed" in outcome.error


def test_a_key_of_another_type_under_the_streams_name_is_a_failed_read(redis_server):
    with redis_server.client() as client:
        client.set(STREAM, "not a stream")
    outcome = read_once(redis_server.url)
    assert outcome.value is None and "ResponseError: WRONGTYPE" in outcome.error


def test_a_password_is_sent_from_the_scalers_settings_and_a_refusal_is_a_failed_read(redis_server):
    with LocalRedis(password="s3cret") as locked:
        create_stream(locked)
        assert "AuthenticationError: Authentication required" in read_once(locked.url).error
        refused = read_once(locked.url, password="wrong")
        assert "AuthenticationError: invalid username-password pair" in refused.error
        assert read_once(locked.url, password="s3cret").value == 0


def test_the_operators_mutual_tls_redis_is_read_as_its_acl_user_and_a_tenants_copy_gets_no_credentials(
    start_tls_redis, tls_files
):
    """The scaler's --redis-username, password and client certificate reach --redis-address; the
    same server named another way (localhost for 127.0.0.1) is a tenant's address: no AUTH, no
    client certificate, so a mutual-TLS server refuses it."""
    server = start_tls_redis(require_client_cert=True)
    create_stream(server)
    add_acl_user(server, "scaler", "scaler-acl-password", "diffusion:*")
    access = RedisAccess(username="scaler", password="scaler-acl-password", ca_file=tls_files.ca,
                         cert_file=tls_files.client_cert, key_file=tls_files.client_key)

    async def go(address: str):
        source = RedisBacklog(access, rules=AccessRules(redis_address=server.url, denied_networks=LOOPBACK_ALLOWED))
        try:
            return await source.read(spec(address))
        finally:
            await source.close()

    assert asyncio.run(go(server.url)).value == 0
    refused = asyncio.run(go(server.url.replace("127.0.0.1", "localhost")))
    assert refused.error is not None and "scaler-acl-password" not in refused.error


def test_a_hung_redis_times_out_within_the_query_timeout():
    async def go():
        async def never_answer(reader, writer):
            await reader.read()  # holds the connection open and says nothing

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        source = backlog()
        started = time.monotonic()
        outcome = await source.read(spec(f"redis://127.0.0.1:{port}/0", queryTimeoutSeconds="0.3"))
        elapsed = time.monotonic() - started
        await source.close()
        server.close()
        return outcome, elapsed

    outcome, elapsed = asyncio.run(go())
    assert outcome.value is None and outcome.error.endswith(": no answer within 0.3s")
    assert 0.25 < elapsed < 1.0


def test_a_restarted_redis_is_read_again_on_the_next_refresh(redis_server):
    create_stream(redis_server)

    async def go():
        source = backlog()
        first = await source.read(spec(redis_server.url))
        await asyncio.to_thread(redis_server.restart)
        with redis_server.client() as client:
            client.xadd(STREAM, {jobqueue.JOB_FIELD: "after"})
        again = await source.read(spec(redis_server.url))  # the pooled connection broke: the pool reconnects
        await source.close()
        return first, again

    first, again = asyncio.run(go())
    assert (first.value, again.value, again.error) == (0, 1, None)


# --- clients: one per address, closed -----------------------------------------------------------


def test_scaled_objects_naming_one_address_share_one_client_and_close_closes_it(redis_server):
    async def go():
        source = backlog()
        await asyncio.gather(*(source.read(spec(redis_server.url, stream=f"s{n}")) for n in range(3)))
        await source.read(spec(redis_server.url, stream="s0"))
        during = await asyncio.to_thread(connections, redis_server)
        await source.close()
        return during

    alone = connections(redis_server)
    # Three reads at once may open up to three pooled connections; none beyond them.
    assert alone < asyncio.run(go()) <= alone + 3
    assert connections(redis_server) == alone


def test_a_client_unused_past_its_idle_time_is_closed_when_another_is_created(redis_server):
    now = [1000.0]

    async def go():
        source = backlog(idle_close_s=900.0, clock=lambda: now[0])
        await source.read(spec(redis_server.url))
        one = await asyncio.to_thread(connections, redis_server)
        now[0] += 901.0
        await source.read(spec(redis_server.url.removesuffix("/0") + "/1"))  # another address: another client
        after = await asyncio.to_thread(connections, redis_server)
        await source.close()
        return one, after

    one, after = asyncio.run(go())
    assert after == one  # the first client's connection closed as the second's opened


# --- beside the Prometheus request ---------------------------------------------------------------


def test_prometheus_is_not_asked_for_the_queue_when_redis_answers_it(redis_server):
    with redis_server.client() as client:
        for n in range(12):
            client.xadd(STREAM, {jobqueue.JOB_FIELD: f"job-{n}"})
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 99.0, names.READY: 0.0})

    async def go():
        return await QueueFromRedis(SignalReader(fake, 4), backlog()).read(spec(redis_server.url))

    reading = asyncio.run(go())
    assert needed_queries(spec(redis_server.url)) == (names.READY_REPLICAS, names.GPU)
    assert all(names.REQUESTS_IN_FLIGHT not in query for query in fake.requests)
    assert reading.signals == Signals(queue=12, ready_replicas=0, gpu_util_percent=None)
    assert [o.name for o in reading.outcomes] == [names.QUEUE, names.READY_REPLICAS, names.GPU]


def test_the_redis_read_runs_beside_the_prometheus_request_and_its_failure_is_named():
    fake = FakePrometheus({names.READY: 2.0}, delay_s=0.4)

    async def go():
        async def never_answer(reader, writer):
            await reader.read()

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        address = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        reader = QueueFromRedis(SignalReader(fake, 4), backlog())
        started = time.monotonic()
        reading = await reader.read(spec(address, signals="queue", queryTimeoutSeconds="0.4"))
        elapsed = time.monotonic() - started
        await reader.queue.close()
        server.close()
        return reading, elapsed, address

    reading, elapsed, address = asyncio.run(go())
    assert elapsed < 0.7  # 0.4 s each, side by side: not 0.8 s in a row
    assert reading.signals is None
    assert reading.error == f"queue query: Redis at {address}, stream '{STREAM}': no answer within 0.4s"


def test_a_spec_without_redis_is_read_by_the_other_source_alone():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 7.0, names.READY: 1.0})

    async def go():
        return await QueueFromRedis(SignalReader(fake, 4), backlog()).read(
            parse_metadata({"prometheusAddress": "http://prom:9090", "signals": "queue"}))

    assert asyncio.run(go()).signals == Signals(queue=7, ready_replicas=1)
