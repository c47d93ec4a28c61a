"""Reads one target's signals from Prometheus and interprets them strictly.

One refresh is one HTTP request: the target's queries are joined into a single PromQL
expression, each part tagged by `label_replace` with a `scaler_signal` label, so Prometheus
and the scaler each handle one request per target per refresh instead of four. If
Prometheus rejects the joined form (a query override that returns a scalar, say), the
target falls back to one request per query for good, which also names the query at fault.

Interpretation (`adapter/reading.py`) is where "a missing answer never becomes 0" is enforced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

from adapter.config import ScalerSpec
from adapter.prometheus import QueryError, Sample
from adapter.reading import QueryOutcome, Reading, needed_queries, outcome, to_reading
from contract.names import SIGNAL_LABEL

log = logging.getLogger(__name__)

class QueryFunction(Protocol):
    async def __call__(self, base_url: str, promql: str, timeout_s: float) -> list[Sample]: ...


def combined_query(spec: ScalerSpec, names: tuple[str, ...]) -> str:
    """All of `names` in one expression; each part's series carry `scaler_signal="<name>"`."""
    parts = (f'label_replace({getattr(spec.queries, n)}, "{SIGNAL_LABEL}", "{n}", "", "")' for n in names)
    return " or ".join(parts)


def _outcome(name: str, samples: list[Sample], duration_s: float) -> QueryOutcome:
    if len(samples) > 1:
        return QueryOutcome(name, duration_s, error=f"returned {len(samples)} series; aggregate it to one, e.g. with sum()")
    return outcome(name, samples[0].value if samples else None, duration_s)


class SignalReader:
    """Runs targets' queries, at most `max_concurrent` requests in flight."""

    def __init__(self, query: QueryFunction, max_concurrent: int, clock: Callable[[], float] = time.monotonic):
        self._query = query
        self._clock = clock
        # Bounds requests in flight across all targets; a request's timeout starts when it
        # gets a slot, so a backlog of refreshes does not turn into timeouts.
        self._slots = asyncio.Semaphore(max_concurrent)
        # Targets whose joined query Prometheus rejected, keyed by address and queries.
        self._separate: set[tuple] = set()

    async def _request(self, spec: ScalerSpec, promql: str) -> tuple[list[Sample] | None, str | None, bool, float]:
        """(samples, error, rejected, duration) of one instant query, bounded in time."""
        async with self._slots:
            started = self._clock()
            try:
                # The HTTP client bounds the exchange itself; this bound is the backstop.
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the query completes, and a refresher that
                # missed its cancellation kept the scaler from exiting on SIGTERM.
                async with asyncio.timeout(spec.query_timeout_s + 1.0):
                    samples = await self._query(spec.prometheus_address, promql, spec.query_timeout_s)
            except QueryError as e:
                return None, str(e), e.rejected, self._clock() - started
            except asyncio.TimeoutError:
                return None, f"no answer within {spec.query_timeout_s:g}s", False, self._clock() - started
            except Exception as e:  # a bug in a query function must not kill the refresher
                return None, f"{type(e).__name__}: {e}", False, self._clock() - started
            return samples, None, False, self._clock() - started

    async def _read_combined(self, spec: ScalerSpec, names: tuple[str, ...]) -> Reading | None:
        samples, error, rejected, duration = await self._request(spec, combined_query(spec, names))
        if rejected:
            return None
        if error is not None:
            return Reading(None, tuple(QueryOutcome(n, duration, error=error) for n in names), (("combined", duration),))
        by_name: dict[str, list[Sample]] = {n: [] for n in names}
        for sample in samples:
            name = sample.labels.get(SIGNAL_LABEL)
            if name in by_name:
                by_name[name].append(sample)
        outcomes = tuple(_outcome(n, by_name[n], duration) for n in names)
        return Reading(None, outcomes, (("combined", duration),))

    async def _read_separately(self, spec: ScalerSpec, names: tuple[str, ...]) -> Reading:
        answers = await asyncio.gather(*(self._request(spec, getattr(spec.queries, n)) for n in names))
        outcomes = []
        for name, (samples, error, _, duration) in zip(names, answers):
            outcomes.append(QueryOutcome(name, duration, error=error) if error else _outcome(name, samples, duration))
        return Reading(None, tuple(outcomes), tuple((n, a[3]) for n, a in zip(names, answers)))

    async def read(self, spec: ScalerSpec) -> Reading:
        names = needed_queries(spec)
        key = (spec.prometheus_address, spec.queries)
        reading = None
        if key not in self._separate:
            reading = await self._read_combined(spec, names)
            if reading is None:
                self._separate.add(key)
                log.info("Prometheus rejected the joined query of %s; querying one signal at a time", spec.selector or key)
        if reading is None:
            reading = await self._read_separately(spec, names)
        return to_reading(reading.outcomes, reading.requests)
