"""The target registry's lifecycle: refreshers stop on close, even when a query misbehaves; and
IsActive's keep-warm hold where the queue is read from Redis."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from adapter.config import parse_metadata
from adapter.prometheus import Sample
from adapter.reading import QueryOutcome, to_reading
from adapter.signals import SignalReader
from adapter.targets import Target, TargetRegistry
from contract import names

META = {"prometheusAddress": "http://prom:9090", "refreshSeconds": "0.1", "queryTimeoutSeconds": "0.2"}


async def quick_answer(base_url, promql, timeout_s):
    await asyncio.sleep(random.uniform(0, 0.003))
    return [Sample({names.SIGNAL_LABEL: name}, 1.0) for name in (names.QUEUE, names.READY_REPLICAS, names.GPU)]


def test_close_stops_every_refresher_whenever_it_lands():
    # Cancellation that lands as a query completes must not be lost (Python 3.11's
    # asyncio.wait_for loses it); a lost one kept the scaler alive after SIGTERM.
    async def one_round(seed: int) -> bool:
        random.seed(seed)
        registry = TargetRegistry(SignalReader(quick_answer, max_concurrent=64))
        for i in range(50):
            registry.resolve("ns", f"so-{i}", META)
        await asyncio.sleep(random.uniform(0, 0.3))
        return await registry.close(timeout_s=2.0)

    async def rounds():
        return [await one_round(seed) for seed in range(40)]

    assert all(asyncio.run(rounds()))


def test_close_returns_in_bounded_time_when_a_query_ignores_cancellation():
    stubborn_now = True

    async def stubborn(base_url, promql, timeout_s):
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not stubborn_now:
                    raise
                # a broken client library that swallows cancellation

    async def go():
        registry = TargetRegistry(SignalReader(stubborn, max_concurrent=4))
        registry.resolve("ns", "so", META)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        clean = await registry.close(timeout_s=0.5)
        return registry, clean, time.monotonic() - started

    async def release(registry):
        nonlocal stubborn_now
        stubborn_now = False
        return await registry.close(timeout_s=2.0)

    loop = asyncio.new_event_loop()
    try:
        registry, clean, took = loop.run_until_complete(go())
        assert clean is False and took < 1.5
        assert loop.run_until_complete(release(registry))  # once it honours cancellation, it stops
    finally:
        loop.close()


def test_a_closed_registry_refreshes_no_more():
    calls = []

    async def counting(base_url, promql, timeout_s):
        calls.append(time.monotonic())
        return []

    async def go():
        registry = TargetRegistry(SignalReader(counting, max_concurrent=4))
        registry.resolve("ns", "so", META)
        await asyncio.sleep(0.35)
        assert await registry.close()
        before = len(calls)
        await asyncio.sleep(0.3)
        return before, len(calls), registry.targets()

    before, after, left = asyncio.run(go())
    assert before >= 2 and after == before and left == []


def test_a_refresh_that_crashes_every_time_is_named_not_left_pending():
    """A reader bug must not leave a target answering "the first refresh has not finished" for
    ever: the RPCs name the crash, and the refresh counts as failed."""
    from adapter.targets import Unavailable

    class CrashingReader:
        async def read(self, spec):
            raise KeyError("a reader bug")

    async def go():
        registry = TargetRegistry(CrashingReader())
        target = registry.resolve("ns", "so", META)
        await registry.first_refresh(target)
        await asyncio.sleep(0.35)  # a few more refreshes at 0.1 s
        try:
            target.current(registry.now())
        except Unavailable as error:
            message = str(error)
        else:
            message = "served a value"
        await registry.close()
        return message, target.refreshes["error"]

    message, failed = asyncio.run(go())
    assert "refresh crashed: KeyError" in message and "has not finished" not in message
    assert failed >= 2


def test_an_idle_target_forgotten_is_forgotten_by_the_kubernetes_api_reader_too():
    """Its cached count and its fallback reason go with it, so the metric counts only targets served."""

    class Replicas:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []
            self.forgotten: list[tuple[str, str]] = []

        async def replicas(self, namespace, name, now):
            self.asked.append((namespace, name))
            return None

        def forget(self, namespace, name):
            self.forgotten.append((namespace, name))

    replicas = Replicas()

    async def go():
        registry = TargetRegistry(SignalReader(quick_answer, max_concurrent=4), idle_forget_s=0.25, replicas=replicas)
        registry.resolve("ns", "idle", META)
        kept = registry.resolve("ns", "kept", META)
        for _ in range(8):
            await asyncio.sleep(0.1)
            kept.last_used_at = registry.now()
        left = [t.name for t in registry.targets()]
        await registry.close()
        return left

    assert asyncio.run(go()) == ["kept"]
    assert ("ns", "idle") in replicas.asked
    assert replicas.forgotten[0] == ("ns", "idle")


# --- the keep-warm hold on the Redis path (issue 14) ---------------------------------------------


def redis_target(**metadata: str):
    """A trigger whose queue is the stream's backlog; the hold is keepWarmMaxSeconds (60 s) until
    20 idle gaps are known, and no start-up is measured, so a cold start never meets an objective."""
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "redisAddress": "redis://r:6379/0",
                           "signals": "queue", "keepWarmMaxSeconds": "60", "staleAfterSeconds": "20", **metadata})
    return Target(("ml", "sd", ()), "ml", "sd", spec, now=0)


def backlog_reading(backlog: float, ready: float | None = 1.0, error: str | None = None):
    """The backlog from Redis and ready replicas from Prometheus (failed with `error` when given)."""
    return to_reading((QueryOutcome(names.QUEUE, 0.01, backlog),
                       QueryOutcome(names.READY_REPLICAS, 0.01, ready, error=error)), ())


def test_an_empty_backlog_stays_active_through_the_keep_warm_hold_then_lets_go():
    """IsActive on the Redis path answers from the backlog, which reads idle at once; the hold is
    the snapshot's decision, so KEDA's cooldownPeriod starts only once the hold has passed."""
    target = redis_target()
    target.apply(backlog_reading(3.0), now=0)  # the last request
    assert target.is_active(0) is True and not target.snapshot.decision.kept_warm
    for t in (10, 30, 59):
        target.apply(backlog_reading(0.0), now=t)
        assert target.activity.active is False  # the backlog alone says idle ...
        assert target.snapshot.decision.kept_warm and target.is_active(t) is True  # ... the hold keeps it active
    target.apply(backlog_reading(0.0), now=60)
    assert target.is_active(60) is False and not target.snapshot.decision.kept_warm


def test_without_the_hold_an_empty_backlog_is_inactive_at_once():
    target = redis_target(keepWarmMaxSeconds="0")
    target.apply(backlog_reading(3.0), now=0)
    target.apply(backlog_reading(0.0), now=10)
    assert target.is_active(10) is False


def test_a_hold_taken_before_a_prometheus_outage_ends_when_it_would_have():
    target = redis_target()
    target.apply(backlog_reading(3.0), now=0)
    target.apply(backlog_reading(0.0), now=10)
    assert target.is_active(10) is True  # held: 10 s after the last request
    down = "Prometheus at http://p:9090: ConnectionError: refused"
    for t in range(20, 200, 5):  # Redis answers an empty backlog; Prometheus is down
        target.apply(backlog_reading(0.0, ready=None, error=down), now=t)
    assert target.is_active(195) is False  # the 60 s hold ended long ago; the snapshot is 185 s old
