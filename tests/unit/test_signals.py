"""Signal interpretation and the concurrent reader, with a fake query function at the HTTP edge."""

from __future__ import annotations

import asyncio
import math
import re
import time

import pytest

from adapter.config import parse_metadata
from adapter.prometheus import QueryError, Sample
from adapter.reading import interpret, needed_queries
from adapter.signals import SignalReader
from contract import names


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        (names.QUEUE, None, 0.0),  # no worker up: no series, no queue
        (names.READY_REPLICAS, None, 0.0),
        (names.GPU, None, None),  # no GPU series: the signal abstains
        (names.LATENCY, None, None),
        (names.LATENCY, math.nan, None),  # no request finished inside the window
        (names.LATENCY, math.inf, None),  # beyond the largest finite bucket
        (names.GPU, math.nan, None),
        (names.QUEUE, 3.0, 3.0),
        (names.GPU, 42.5, 42.5),
    ],
)
def test_interpretation(name, raw, expected):
    assert interpret(name, raw) == expected


@pytest.mark.parametrize("name, raw", [(names.QUEUE, math.nan), (names.READY_REPLICAS, math.inf), (names.QUEUE, -1.0),
                                       (names.LATENCY, -2.0)])
def test_unusable_answers_are_failures_not_zero(name, raw):
    with pytest.raises(ValueError):
        interpret(name, raw)


def spec(**extra):
    # spareAboveLoad 0: nothing reads the capacity measurements, so these tests see the four classic queries
    return parse_metadata({"prometheusAddress": "http://prom:9090", "targetP95Seconds": "5", "spareAboveLoad": "0",
                           **extra})


def test_only_enabled_signals_are_queried():
    assert needed_queries(spec(signals=names.QUEUE)) == (names.QUEUE, names.READY_REPLICAS)
    assert needed_queries(spec()) == (names.QUEUE, names.READY_REPLICAS, names.GPU, names.LATENCY)
    assert needed_queries(spec(spareAboveLoad="0.2")) == (
        names.QUEUE, names.READY_REPLICAS, names.GPU, names.LATENCY, *names.CAPACITY_QUERIES)


JOINED_PART = re.compile(r'label_replace\((.*), "' + re.escape(names.SIGNAL_LABEL) + r'", "(\w+)", "", ""\)$')


class FakePrometheus:
    """Answers by the metric a query reads, joined queries too; records requests and how many ran at once."""

    def __init__(self, answers, delay_s=0.0, reject_joined=False):
        self.answers = answers
        self.reject_joined = reject_joined
        self.delay_s = delay_s
        self.running = 0
        self.peak = 0
        self.requests = []

    async def __call__(self, base_url, promql, timeout_s):
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.requests.append(promql)
        try:
            await asyncio.sleep(self.delay_s)
            if self.reject_joined and " or " in promql:
                raise QueryError("HTTP 400: expected type instant vector", rejected=True)
            samples = []
            for part in promql.split(" or "):
                joined = JOINED_PART.match(part)
                expression, labels = (joined.group(1), {names.SIGNAL_LABEL: joined.group(2)}) if joined else (part, {})
                samples += [Sample(labels, value) for value in await self._answer(expression)]
            return samples
        finally:
            self.running -= 1

    async def _answer(self, expression):
        for marker, answer in self.answers.items():
            if marker in expression:
                if answer == "hang":
                    await asyncio.sleep(30)  # ignores its timeout, as a wedged client would
                if isinstance(answer, Exception):
                    raise answer
                return answer if isinstance(answer, list) else [answer]
        return []


def read(fake, spec_, max_concurrent=8):
    return asyncio.run(SignalReader(fake, max_concurrent).read(spec_))


def test_a_reading_collects_every_signal():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 12.0, names.READY: 2.0, names.GPU_UTIL: 80.0,
                           names.REQUEST_DURATION: math.nan})
    reading = read(fake, spec())
    assert reading.signals.queue == 12 and reading.signals.ready_replicas == 2
    assert reading.signals.gpu_util_percent == 80 and reading.signals.p95_seconds is None
    assert reading.error == ""


def test_one_refresh_is_one_request():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 12.0, names.READY: 2.0})
    reading = read(fake, spec())
    assert len(fake.requests) == 1
    assert [name for name, _ in reading.requests] == ["combined"]


def test_a_failed_request_fails_the_whole_reading():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 12.0, names.READY: 2.0,
                           names.GPU_UTIL: QueryError("HTTP 503: overloaded")})
    reading = read(fake, spec())
    assert reading.signals is None
    assert reading.error == "queue, ready, gpu, latency queries: HTTP 503: overloaded"


def test_a_rejected_joined_query_falls_back_to_one_request_per_query_for_good():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: 12.0, names.READY: 2.0, names.GPU_UTIL: 50.0}, reject_joined=True)

    async def go():
        reader = SignalReader(fake, 4)
        first = await reader.read(spec(signals=f"{names.QUEUE},{names.GPU}"))
        second = await reader.read(spec(signals=f"{names.QUEUE},{names.GPU}"))
        return first, second

    first, second = asyncio.run(go())
    assert first.signals.gpu_util_percent == 50 and second.signals.queue == 12
    assert len(fake.requests) == 1 + 3 + 3  # the joined try once, then three a refresh
    assert [name for name, _ in second.requests] == [names.QUEUE, names.READY_REPLICAS, names.GPU]


def test_more_than_one_series_is_a_failure():
    reading = read(FakePrometheus({names.REQUESTS_IN_FLIGHT: [1.0, 2.0], names.READY: 2.0}), spec(signals=names.QUEUE))
    assert reading.signals is None
    assert "queue query: returned 2 series" in reading.error


def test_a_nan_queue_fails_the_reading():
    reading = read(FakePrometheus({names.REQUESTS_IN_FLIGHT: math.nan, names.READY: 1.0}), spec(signals=names.QUEUE))
    assert reading.signals is None and "queue query" in reading.error


def test_a_hung_query_is_abandoned_after_the_timeout():
    fake = FakePrometheus({names.REQUESTS_IN_FLIGHT: "hang", names.READY: 1.0})
    started = time.monotonic()
    reading = read(fake, spec(signals=names.QUEUE, queryTimeoutSeconds="0.2"))
    assert time.monotonic() - started < 3  # 0.2 s plus the reader's 1 s backstop
    assert reading.signals is None and "no answer within 0.2s" in reading.error


def test_queries_in_flight_are_bounded():
    fake = FakePrometheus({}, delay_s=0.05)

    async def go():
        reader = SignalReader(fake, max_concurrent=3)
        await asyncio.gather(*(reader.read(spec()) for _ in range(6)))

    asyncio.run(go())
    assert fake.peak == 3
