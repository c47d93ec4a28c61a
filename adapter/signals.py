"""Reads one target's signals: the needed PromQL queries, run concurrently, interpreted strictly.

Interpretation is where "a missing answer never becomes 0" is enforced:

| query   | empty result      | NaN or +-Inf          | negative |
| ------- | ----------------- | --------------------- | -------- |
| queue   | 0 (no worker up)  | failure               | failure  |
| ready   | 0 (no worker up)  | failure               | failure  |
| gpu     | abstains          | abstains              | failure  |
| latency | abstains          | abstains              | failure  |

A latency of NaN is what `histogram_quantile` returns when no request finished inside the
window; +Inf when the p95 lies beyond the histogram's largest finite bucket. A failed query
fails the whole reading: the caller keeps serving the last good value instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Protocol

from adapter.config import ScalerSpec
from adapter.policy import Signals
from adapter.prometheus import QueryError


class QueryFunction(Protocol):
    def __call__(self, base_url: str, promql: str, timeout_s: float) -> float | None: ...


@dataclass(frozen=True)
class QueryOutcome:
    """One query of one reading: its raw value (None when empty) or its error."""

    name: str
    duration_s: float
    value: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Reading:
    """The signals of one refresh, or None when any needed query failed."""

    signals: Signals | None
    outcomes: tuple[QueryOutcome, ...]

    @property
    def error(self) -> str:
        return "; ".join(f"{o.name} query: {o.error}" for o in self.outcomes if o.error)


def needed_queries(spec: ScalerSpec) -> tuple[str, ...]:
    """Queue (activity) and ready replicas always; GPU and latency when enabled."""
    return ("queue", "ready") + tuple(s for s in ("gpu", "latency") if s in spec.policy.signals)


def interpret(name: str, value: float | None) -> float | None:
    """The signal's value from a query's raw answer; raises ValueError when unusable."""
    if value is None:
        return 0.0 if name in ("queue", "ready") else None
    if not math.isfinite(value):
        if name in ("queue", "ready"):
            raise ValueError(f"answered {value}; a count must be a finite number")
        return None
    if value < 0:
        raise ValueError(f"answered {value:g}; it cannot be negative")
    return value


class SignalReader:
    """Runs a target's queries on a bounded pool of threads (the HTTP client blocks)."""

    def __init__(
        self,
        query: QueryFunction,
        executor: Executor,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._query = query
        self._executor = executor
        self._clock = clock
        # Bounds queries in flight across all targets; a query's timeout starts when it
        # gets a slot, so a queue of waiting refreshes does not turn into timeouts.
        self._slots = asyncio.Semaphore(max_concurrent)

    async def _one(self, spec: ScalerSpec, name: str) -> QueryOutcome:
        promql = getattr(spec.queries, name)
        async with self._slots:
            started = self._clock()
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(self._executor, self._query, spec.prometheus_address, promql, spec.query_timeout_s)
            try:
                # The HTTP client has its own timeouts; this bound is the backstop.
                raw = await asyncio.wait_for(call, spec.query_timeout_s + 1.0)
            except QueryError as e:
                return QueryOutcome(name, self._clock() - started, error=str(e))
            except asyncio.TimeoutError:
                return QueryOutcome(name, self._clock() - started, error=f"no answer within {spec.query_timeout_s:g}s")
            except Exception as e:  # a bug in a query function must not kill the refresher
                return QueryOutcome(name, self._clock() - started, error=f"{type(e).__name__}: {e}")
            duration = self._clock() - started
        try:
            interpret(name, raw)
        except ValueError as e:
            return QueryOutcome(name, duration, value=raw, error=str(e))
        return QueryOutcome(name, duration, value=raw)

    async def read(self, spec: ScalerSpec) -> Reading:
        names = needed_queries(spec)
        outcomes = tuple(await asyncio.gather(*(self._one(spec, n) for n in names)))
        if any(o.error for o in outcomes):
            return Reading(None, outcomes)
        values = {o.name: interpret(o.name, o.value) for o in outcomes}
        signals = Signals(
            queue=values["queue"],
            ready_replicas=values["ready"],
            gpu_util_percent=values.get("gpu"),
            p95_seconds=values.get("latency"),
        )
        return Reading(signals, outcomes)
