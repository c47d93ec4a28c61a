"""Signal interpretation and the concurrent reader, with a fake query function at the HTTP edge."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapter.config import parse_metadata
from adapter.prometheus import QueryError
from adapter.signals import SignalReader, interpret, needed_queries


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("queue", None, 0.0),  # no worker up: no series, no queue
        ("ready", None, 0.0),
        ("gpu", None, None),  # no GPU series: the signal abstains
        ("latency", None, None),
        ("latency", math.nan, None),  # no request finished inside the window
        ("latency", math.inf, None),  # beyond the largest finite bucket
        ("gpu", math.nan, None),
        ("queue", 3.0, 3.0),
        ("gpu", 42.5, 42.5),
    ],
)
def test_interpretation(name, raw, expected):
    assert interpret(name, raw) == expected


@pytest.mark.parametrize("name, raw", [("queue", math.nan), ("ready", math.inf), ("queue", -1.0), ("latency", -2.0)])
def test_unusable_answers_are_failures_not_zero(name, raw):
    with pytest.raises(ValueError):
        interpret(name, raw)


def spec(**extra):
    return parse_metadata({"prometheusAddress": "http://prom:9090", "targetP95Seconds": "5", **extra})


def test_only_enabled_signals_are_queried():
    assert needed_queries(spec(signals="queue")) == ("queue", "ready")
    assert needed_queries(spec()) == ("queue", "ready", "gpu", "latency")


class FakePrometheus:
    """Answers by query kind; records how many queries ran at once."""

    def __init__(self, answers, delay_s=0.0):
        self.answers = answers
        self.delay_s = delay_s
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self, base_url, promql, timeout_s):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.delay_s)
            for marker, answer in self.answers.items():
                if marker in promql:
                    if answer == "hang":
                        self.release.wait(30)
                    if isinstance(answer, Exception):
                        raise answer
                    return answer
            return None
        finally:
            with self.lock:
                self.running -= 1


def read(fake, spec_, max_concurrent=8):
    async def go():
        with ThreadPoolExecutor(8) as pool:
            try:
                return await SignalReader(fake, pool, max_concurrent).read(spec_)
            finally:
                fake.release.set()  # let a hung fake call end so the pool can shut down

    return asyncio.run(go())


def test_a_reading_collects_every_signal():
    fake = FakePrometheus({"in_flight": 12.0, "diffusion_ready": 2.0, "GPU_UTIL": 80.0, "duration": math.nan})
    reading = read(fake, spec())
    assert reading.signals.queue == 12 and reading.signals.ready_replicas == 2
    assert reading.signals.gpu_util_percent == 80 and reading.signals.p95_seconds is None
    assert reading.error == ""


def test_one_failed_query_fails_the_whole_reading_and_says_which():
    fake = FakePrometheus({"in_flight": 12.0, "diffusion_ready": 2.0, "GPU_UTIL": QueryError("HTTP 503: overloaded")})
    reading = read(fake, spec())
    assert reading.signals is None
    assert reading.error == "gpu query: HTTP 503: overloaded"


def test_a_nan_queue_fails_the_reading():
    reading = read(FakePrometheus({"in_flight": math.nan, "diffusion_ready": 1.0}), spec(signals="queue"))
    assert reading.signals is None and "queue query" in reading.error


def test_a_hung_query_is_abandoned_after_the_timeout():
    fake = FakePrometheus({"in_flight": "hang", "diffusion_ready": 1.0})
    started = time.monotonic()
    reading = read(fake, spec(signals="queue", queryTimeoutSeconds="0.2"))
    assert time.monotonic() - started < 3  # 0.2 s plus the reader's 1 s backstop
    assert reading.signals is None and "no answer within 0.2s" in reading.error


def test_queries_in_flight_are_bounded():
    fake = FakePrometheus({}, delay_s=0.05)

    async def go():
        with ThreadPoolExecutor(16) as pool:
            reader = SignalReader(fake, pool, max_concurrent=3)
            await asyncio.gather(*(reader.read(spec()) for _ in range(6)))

    asyncio.run(go())
    assert fake.peak == 3
