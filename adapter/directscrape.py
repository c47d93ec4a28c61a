"""The signals without Prometheus: scrape the pods' /metrics directly and compute them here.

A second source for the built-in queries of `adapter/promql.py` (metric names from `contract.names`), for a machine with no
Prometheus (the local stack) and as a low-latency option. Each scrape is parsed with
prometheus_client's parser and kept per series for the query window; the signals are the
same expressions evaluated the way Prometheus evaluates them:

| signal  | PromQL (adapter/promql.py)                                            | here |
| ------- | --------------------------------------------------------------------- | ---- |
| queue   | `sum(diffusion_requests_in_flight{sel})`                              | sum of each series' latest sample |
| ready   | `sum(diffusion_ready{sel})`                                           | the same |
| gpu     | `avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{sel}[w]))`                    | mean of each series' samples in the window, averaged over series |
| latency | `histogram_quantile(0.95, sum by (le) (rate(..._bucket{sel}[w])))`    | each bucket's increase over the window (counter resets handled), summed by `le`, then Prometheus' interpolation |
| demand, arrivals | `sum(rate(diffusion_requested_image_steps_total{sel}[w]))`, `sum(rate(diffusion_requests_total{sel}[w]))` | each series' increase over the span of its samples in the window, per second, summed |
| capacity, startup | `avg(diffusion_capacity_image_steps_per_second{sel})`, `avg(diffusion_startup_seconds{sel})` | mean of each series' latest sample |

`rate` divides by the window and extrapolates to its edges; a quantile is unchanged by a
common factor, so increases give the same p95 when the series are scraped together.
Series not seen for `stale_after_s` drop out, as Prometheus' lookback does.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import deque
from itertools import pairwise
from collections.abc import Callable, Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

from adapter.config import parse_duration_seconds
from adapter.promql import parse_selector
from adapter.reading import QueryOutcome, Reading, needed_queries, outcome, to_reading
from contract import names

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
KEEPALIVE_S = 2.0  # idle connections to the pods live this long: under uvicorn's 5 s keep-alive

def matches(labels: Mapping[str, str], matchers: Iterable[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        actual = labels.get(name, "")
        if op == "=" and actual != value or op == "!=" and actual == value:
            return False
        if op == "=~" and not re.fullmatch(value, actual) or op == "!~" and re.fullmatch(value, actual):
            return False
    return True


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][0] != math.inf:
        return math.nan
    # Prometheus repairs non-monotonic cumulative counts (scrape races) by carrying the max.
    fixed, highest = [], 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        fixed.append((bound, highest))
    total = fixed[-1][1]
    if total == 0 or math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    index = next(i for i, (_, count) in enumerate(fixed) if count >= rank)
    if index == len(fixed) - 1:
        return fixed[-2][0] if len(fixed) > 1 else math.nan  # beyond the last finite bucket
    start, below = (0.0, 0.0) if index == 0 else fixed[index - 1]
    end, count = fixed[index]
    if index == 0 and end <= 0:
        return end
    return start + (end - start) * (rank - below) / (count - below)


def increase(samples: Iterable[tuple[float, float]]) -> float | None:
    """A counter's growth over its samples, across resets; None with fewer than two samples."""
    values = [value for _, value in samples]
    if len(values) < 2:
        return None
    grown = 0.0
    for before, after in pairwise(values):
        grown += after - before if after >= before else after  # a reset starts again from 0
    return grown


def extrapolated_rate(samples: list[tuple[float, float]], since: float, now: float) -> float | None:
    """Prometheus' `rate` of a counter over the window (since, now] from its samples inside it
    (promql/functions.go `extrapolatedRate`): the increase across resets, extrapolated from the
    sampled span to the window's edges (fully where a sample lies within 1.1 average intervals of
    an edge, else half an interval; never below the counter's zero), per second of the window.
    None with fewer than two samples."""
    grown = increase(samples)
    if grown is None:
        return None
    (first_t, first_v), (last_t, _) = samples[0], samples[-1]
    sampled = last_t - first_t
    if sampled <= 0:
        return None
    to_start, to_end = first_t - since, now - last_t
    average = sampled / (len(samples) - 1)
    if grown > 0 and first_v >= 0:  # a counter does not extrapolate below zero
        to_start = min(to_start, sampled * (first_v / grown))
    threshold = average * 1.1
    span = sampled + (to_start if to_start < threshold else average / 2) + (to_end if to_end < threshold else average / 2)
    return grown * (span / sampled) / (now - since)


class ScrapeStore:
    """Samples per series from scraped exposition text, kept for `retain_s`."""

    def __init__(self, retain_s: float = 600.0, stale_after_s: float = 300.0) -> None:
        self.retain_s = retain_s
        self.stale_after_s = stale_after_s
        self._series: dict[SeriesKey, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def record(self, now: float, text: str, extra_labels: Mapping[str, str] | None = None) -> int:
        """Adds one scrape's samples taken at `now`; returns how many."""
        added = 0
        with self._lock:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = {**sample.labels, **(extra_labels or {})}
                    key = (sample.name, tuple(sorted(labels.items())))
                    self._series.setdefault(key, deque()).append((now, float(sample.value)))
                    added += 1
            self._forget(now)
        return added

    def mark_stale(self, instance: str, now: float) -> None:
        """Prometheus' staleness marker: the instance's series stop answering instant lookups."""
        with self._lock:
            for (_, labels), window in self._series.items():
                if ("instance", instance) in labels and window and not math.isnan(window[-1][1]):
                    window.append((now, math.nan))

    def instances(self) -> set[str]:
        with self._lock:
            return {value for (_, labels) in self._series for name, value in labels if name == "instance"}

    def _forget(self, now: float) -> None:
        for key in list(self._series):
            window = self._series[key]
            while window and window[0][0] < now - self.retain_s:
                window.popleft()
            if not window:
                del self._series[key]

    def _select(self, name: str, matchers) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        with self._lock:
            return [(dict(labels), list(samples)) for (series, labels), samples in self._series.items()
                    if series == name and matches(dict(labels), matchers)]

    def _latest(self, name: str, matchers, now: float) -> list[float]:
        return [samples[-1][1] for _, samples in self._select(name, matchers)
                if samples and now - self.stale_after_s <= samples[-1][0] <= now and not math.isnan(samples[-1][1])]

    def _latest_sum(self, name: str, matchers, now: float) -> float | None:
        values = self._latest(name, matchers, now)
        return sum(values) if values else None

    def _latest_mean(self, name: str, matchers, now: float) -> float | None:
        values = self._latest(name, matchers, now)
        return sum(values) / len(values) if values else None

    def _rate_sum(self, name: str, matchers, since: float, now: float) -> float | None:
        """`sum(rate(name[w]))`: each series' `extrapolated_rate` over its samples inside the
        window, summed; None when no series has two samples."""
        rates = []
        for _, samples in self._select(name, matchers):
            inside = [(stamp, value) for stamp, value in samples if since < stamp <= now and not math.isnan(value)]
            rate = extrapolated_rate(inside, since, now)
            if rate is not None:
                rates.append(rate)
        return sum(rates) if rates else None

    def answers(self, selector: str, window_s: float, now: float, quantile: float = 0.95) -> dict[str, float | None]:
        """Each built-in query's raw answer at `now`, by query name, as Prometheus would give it
        (None where the query returns nothing)."""
        matchers = parse_selector(selector)
        since = now - window_s
        gpu_means = []
        for _, samples in self._select(names.GPU_UTIL, matchers):
            inside = [value for stamp, value in samples if since < stamp <= now and not math.isnan(value)]
            if inside:
                gpu_means.append(sum(inside) / len(inside))
        buckets: dict[float, float] = {}
        for labels, samples in self._select(names.REQUEST_DURATION + "_bucket", matchers):
            grown = increase((stamp, value) for stamp, value in samples if since < stamp <= now and not math.isnan(value))
            if grown is not None:
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + grown
        return {
            names.QUEUE: self._latest_sum(names.REQUESTS_IN_FLIGHT, matchers, now),
            names.READY_REPLICAS: self._latest_sum(names.READY, matchers, now),
            names.GPU: sum(gpu_means) / len(gpu_means) if gpu_means else None,
            names.LATENCY: histogram_quantile(quantile, buckets.items()) if buckets else None,
            names.DEMAND: self._rate_sum(names.REQUESTED_IMAGE_STEPS + "_total", matchers, since, now),
            names.ARRIVALS: self._rate_sum(names.REQUESTS + "_total", matchers, since, now),
            names.CAPACITY: self._latest_mean(names.CAPACITY_IMAGE_STEPS, matchers, now),
            names.STARTUP: self._latest_mean(names.STARTUP_SECONDS, matchers, now),
        }


def read_targets_file(path: str) -> list[tuple[str, dict[str, str]]]:
    """(address, labels) of every target in a Prometheus file_sd JSON file."""
    with open(path) as handle:
        groups = json.load(handle)
    if not isinstance(groups, list):
        raise ValueError("a file_sd file holds a JSON list of {targets, labels} groups")
    return [(str(address), {str(k): str(v) for k, v in (group.get("labels") or {}).items()})
            for group in groups for address in group.get("targets", [])]


class DirectSignalReader:
    """The `SignalReader` contract over direct scrapes: each read scrapes every target in the
    spec's file once, records the samples, and evaluates the built-in signals at that instant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._stores: dict[str, ScrapeStore] = {}
        self._session = None

    async def _fetch(self, address: str, timeout_s: float) -> str | None:
        import aiohttp

        if self._session is None:
            # Idle connections are dropped after 2 s, before a uvicorn worker's 5 s keep-alive closes
            # them from its side: a scrape every 5 s would otherwise race that close and lose a scrape.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S))
        try:  # aiohttp itself tries a GET once more when the connection closes before an answer
            async with self._session.get(f"http://{address}/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as answer:
                return await answer.text() if answer.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def read(self, spec) -> Reading:
        wanted = needed_queries(spec)
        started = self._clock()
        try:
            targets = read_targets_file(spec.scrape_targets_file)
        except (OSError, ValueError) as error:
            duration = self._clock() - started
            message = f"cannot read {spec.scrape_targets_file}: {error}"
            return Reading(None, tuple(QueryOutcome(n, duration, error=message) for n in wanted), (("scrape", duration),))
        store = self._stores.setdefault(spec.scrape_targets_file, ScrapeStore())
        texts = await asyncio.gather(*(self._fetch(address, spec.query_timeout_s) for address, _ in targets))
        now = self._wall()
        listed = set()
        for (address, labels), text in zip(targets, texts, strict=True):
            listed.add(address)
            if text is None:
                store.mark_stale(address, now)  # a failed scrape, as Prometheus marks it
                continue
            try:
                store.record(now, text, {**labels, "instance": address})
            except ValueError:
                store.mark_stale(address, now)
        for gone in store.instances() - listed:
            store.mark_stale(gone, now)
        answers = store.answers(spec.selector, parse_duration_seconds(spec.window), now)
        duration = self._clock() - started
        outcomes = []
        for name in wanted:
            value = answers[name]
            if name == names.LATENCY and value is not None and math.isnan(value):
                value = None  # no request finished in the window: abstain, as histogram_quantile's NaN does
            outcomes.append(outcome(name, value, duration))
        return to_reading(tuple(outcomes), (("scrape", duration),))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class SignalRouter:
    """Sends each target's read to Prometheus or to direct scraping, by its spec."""

    def __init__(self, prometheus, direct: DirectSignalReader) -> None:
        self.prometheus = prometheus
        self.direct = direct

    async def read(self, spec) -> Reading:
        return await (self.direct if spec.scrape_targets_file else self.prometheus).read(spec)
