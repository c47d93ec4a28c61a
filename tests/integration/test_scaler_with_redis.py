"""Scale from zero on a real queue: the scaler over real gRPC, the queue signal from a real
redis-server's stream, ready replicas from a real Prometheus that has no worker to scrape.
A stream that does not exist is missing data; Prometheus down does not stop the waking."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest

from contract import jobqueue, names

from .conftest import eventually, eventually_fails, metrics_request, ref, scaler_labels
from .test_scaler_with_prometheus import sample

pytestmark = pytest.mark.integration

KEYS = jobqueue.QueueKeys(jobqueue.namespaced_stream("ml", "sd-worker"))  # a stream of ref()'s namespace


def enqueue(server, jobs: int) -> None:
    """`jobs` jobs through the gateway's script (the protocol of contract/jobqueue.py), in one
    transaction, so no refresh sees part of them."""
    with server.client() as client, client.pipeline(transaction=True) as pipe:
        for _ in range(jobs):
            job_id = uuid.uuid4().hex
            now = time.time()
            request = json.dumps({"prompt": "a lighthouse at dusk"})
            pipe.eval(jobqueue.ENQUEUE, 3, KEYS.job(job_id), KEYS.stream, KEYS.job(job_id),
                      job_id, request, now, now + 600, 0, 0)
        pipe.execute()


def create_stream(server) -> None:
    """What the gateway and the workers do when they start: the group, and the stream with it."""
    with server.client() as client:
        try:
            client.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
        except Exception as error:  # BUSYGROUP: created already
            assert "BUSYGROUP" in str(error)


def work_off(server, jobs: int) -> list:
    """A worker takes `jobs` jobs in hand (delivered, not yet acknowledged); returns their entries."""
    create_stream(server)
    with server.client() as client:
        [[_, entries]] = client.xreadgroup(KEYS.group, "worker-0", {KEYS.stream: ">"}, count=jobs)
    return entries


def finish(server, entries: list) -> None:
    with server.client() as client:
        for entry_id, fields in entries:
            job_id = fields[jobqueue.JOB_FIELD.encode()].decode()
            client.eval(jobqueue.FINISH, 3, KEYS.job(job_id), KEYS.stream, KEYS.done(job_id),
                        KEYS.group, entry_id, jobqueue.DONE, "result", "[]", time.time(), 60)


def test_a_backlog_wakes_an_empty_fleet_and_redis_down_is_missing_data_never_zero(
    prometheus, redis_server, scaler, deployment
):
    labels = scaler_labels(deployment)
    so = ref(deployment, prometheus.url, redisAddress=redis_server.url, stream=KEYS.stream, targetQueuePerReplica="4",
             scaleDownWindowSeconds="60", staleAfterSeconds="3")

    def value() -> float:
        return scaler.stub.GetMetrics(metrics_request(so)).metricValues[0].metricValueFloat

    def active() -> bool:
        return scaler.stub.IsActive(so).result

    def refreshes_since(count: float, more: int):
        assert sample(scaler, names.SCALER_REFRESHES + "_total", result="ok", **labels) >= count + more

    def is_active(expected: bool):
        def check():
            assert active() is expected

        return check

    # No stream yet (no gateway has started): not an empty queue but missing data, named.
    error = eventually_fails(active, timeout_s=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"Redis at {redis_server.url}, stream '{KEYS.stream}': no such stream. Is `stream` the gateway's" \
        in error.details()

    # The gateway starts (creating the stream); zero workers, nothing queued: inactive, so KEDA
    # keeps the fleet at zero.
    create_stream(redis_server)
    eventually(is_active(False))
    assert value() == 0.0

    # 12 jobs wait and no worker exists: KEDA's activation takes the fleet 0 -> 1, and the HPA
    # (AverageValue 1) is then asked for ceil(12 / targetQueuePerReplica) = 3 replicas.
    enqueue(redis_server, 12)

    def woken():
        assert active() is True
        answer = scaler.stub.GetMetrics(metrics_request(so)).metricValues[0]
        assert (answer.metricValueFloat, answer.metricValue) == (3.0, 3)

    eventually(woken, timeout_s=10)
    assert sample(scaler, names.SCALER_QUEUE, **labels) == 12
    assert sample(scaler, names.SCALER_READY, **labels) == 0  # from Prometheus: no worker series at all

    # Jobs in hand (delivered, not acknowledged) still count: the backlog is undelivered + pending.
    in_hand = work_off(redis_server, 12)
    refreshed = sample(scaler, names.SCALER_REFRESHES + "_total", result="ok", **labels)
    eventually(lambda: refreshes_since(refreshed, 2))
    assert active() is True and sample(scaler, names.SCALER_QUEUE, **labels) == 12

    # All finished: IsActive answers from the live backlog at once, while the scale-down window
    # still holds the HPA's value (KEDA's cooldownPeriod, not this window, then takes 1 -> 0).
    finish(redis_server, in_hand)
    eventually(is_active(False), timeout_s=10)
    assert value() == 3.0
    assert sample(scaler, names.SCALER_HOLD, reason="scale_down_window", **labels) == 1

    # Redis goes away with 5 jobs waiting: the last good value and activity are served, never 0 ...
    enqueue(redis_server, 5)
    eventually(is_active(True), timeout_s=10)
    before = value()
    redis_server.stop()
    stopped_at = time.monotonic()

    def failed_a_read():
        assert sample(scaler, names.SCALER_QUERY_FAILURES + "_total", query=names.QUEUE, **labels) >= 1

    eventually(failed_a_read, timeout_s=2)
    assert value() == before and active() is True

    # ... until staleAfterSeconds, then UNAVAILABLE so KEDA's fallback engages, naming the source.
    error = eventually_fails(value, timeout_s=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - stopped_at >= 2.0  # not before staleAfterSeconds (3 s from the last good read)
    assert f"queue query: Redis at {redis_server.url}, stream '{KEYS.stream}': ConnectionError" in error.details()
    assert eventually_fails(active, timeout_s=1).code() == grpc.StatusCode.UNAVAILABLE
    assert sample(scaler, names.SCALER_STALE, **labels) == 1
    assert sample(scaler, names.SCALER_QUERY_FAILURES + "_total", query=names.READY_REPLICAS, **labels) == 0

    # Redis back (its append-only file kept the 5 jobs): served again.
    redis_server.start()
    eventually(is_active(True), timeout_s=10)
    assert value() == before
    assert sample(scaler, names.SCALER_STALE, **labels) == 0
    assert sample(scaler, names.SCALER_QUEUE, **labels) == 5


def test_a_backlog_wakes_the_fleet_while_prometheus_is_down_and_redis_down_too_is_unavailable(
    own_prometheus, redis_server, scaler, deployment
):
    labels = scaler_labels(deployment)
    so = ref(deployment, own_prometheus.url, redisAddress=redis_server.url, stream=KEYS.stream, targetQueuePerReplica="4",
             staleAfterSeconds="3")
    create_stream(redis_server)

    def value() -> float:
        return scaler.stub.GetMetrics(metrics_request(so)).metricValues[0].metricValueFloat

    def active() -> bool:
        return scaler.stub.IsActive(so).result

    def is_active(expected: bool):
        def check():
            assert active() is expected

        return check

    # Zero workers, nothing queued, both sources answering.
    eventually(is_active(False))
    assert value() == 0.0

    # Prometheus goes away, then 12 jobs arrive: ready replicas cannot be read, but the backlog
    # can, and it alone decides IsActive, so KEDA still takes the fleet 0 -> 1.
    own_prometheus.stop()

    def ready_failed():
        assert sample(scaler, names.SCALER_QUERY_FAILURES + "_total", query=names.READY_REPLICAS, **labels) >= 1

    eventually(ready_failed, timeout_s=5)
    enqueue(redis_server, 12)
    eventually(is_active(True), timeout_s=5)
    assert sample(scaler, names.SCALER_ACTIVE, **labels) == 1

    # GetMetrics keeps the strict rule: the last good value, then UNAVAILABLE (KEDA's fallback)
    # naming Prometheus; IsActive stays true on the fresh backlog all along.
    error = eventually_fails(value, timeout_s=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"ready, gpu, demand, arrivals, capacity, startup queries: request to {own_prometheus.url} failed" in error.details()
    assert active() is True
    assert sample(scaler, names.SCALER_STALE, **labels) == 1

    # Redis goes away too: the last good backlog until staleAfterSeconds, then UNAVAILABLE.
    redis_server.stop()
    stopped_at = time.monotonic()
    error = eventually_fails(active, timeout_s=10)
    assert time.monotonic() - stopped_at >= 2.0  # not before staleAfterSeconds (3 s from the last good read)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "last good backlog" in error.details() and "queue query: Redis at" in error.details()
