"""Collects in the background on a fixed period, so a scrape never waits on NVML.

Each collection runs on a dedicated thread and is awaited for at most `timeout_s`. A
collection that overruns (a hung NVML call) is counted as a timeout and the last snapshot is
marked stale, which withholds its device series; while the hung call has not returned, later
periods are skipped and counted, never stacked on top of it. Every period ends by publishing a
`PollState`: `on_state` gets it first (on this thread; the exporter renders its exposition
there), then `state` holds it, so whoever sees a state in `state` finds it rendered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Protocol

from .devices import DeviceIdentity
from .podresources import PodRef
from .snapshot import Snapshot

log = logging.getLogger("exporter.poller")


class Reader(Protocol):
    def collect(self) -> Snapshot: ...


Attribution = Callable[[DeviceIdentity], tuple[PodRef, ...]]


@dataclass(frozen=True)
class PollState:
    """What the collector serves: the latest snapshot, its owners, and the poller's counts."""

    snapshot: Snapshot | None = None
    owners: Mapping[str, tuple[PodRef, ...]] = field(default_factory=dict)  # by UUID
    stale: bool = False
    collections: int = 0
    timeouts: int = 0
    skipped: int = 0
    failures: int = 0


class Poller:
    """Runs `reader.collect()` every `interval_s`, each bounded by `timeout_s`, and publishes a `PollState`."""

    def __init__(
        self,
        reader: Reader,
        interval_s: float,
        timeout_s: float,
        attribution: Attribution | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[PollState], None] | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError(f"interval_s and timeout_s must be above 0, got {interval_s} and {timeout_s}")
        self.reader = reader
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.attribution = attribution
        self.clock = clock
        self.on_state = on_state
        self._on_state_failing = False
        self.state = PollState()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._running: Future | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="poller", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 1)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            self.poll_once()
            next_at += self.interval_s
            now = self.clock()
            if next_at < now:  # fell behind (a slow collection): keep the period, skip the backlog
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    def poll_once(self) -> PollState:
        """One period: collect (bounded by the timeout), attribute, publish."""
        state = self.state
        if self._running is not None and not self._running.done():
            return self._publish(replace(state, stale=True, skipped=state.skipped + 1))
        self._running = self._executor.submit(self._collect)
        try:
            snapshot, owners = self._running.result(timeout=self.timeout_s)
        except FutureTimeout:
            log.error("collection overran its %.2f s timeout; serving no device values until one completes",
                      self.timeout_s)
            return self._publish(replace(state, stale=True, timeouts=state.timeouts + 1))
        except Exception:  # noqa: BLE001 - the loop must survive a bug in one collection
            log.exception("collection failed")
            return self._publish(replace(state, stale=True, failures=state.failures + 1))
        return self._publish(PollState(snapshot=snapshot, owners=owners, stale=False,
                                       collections=state.collections + 1, timeouts=state.timeouts,
                                       skipped=state.skipped, failures=state.failures))

    def _publish(self, state: PollState) -> PollState:
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # noqa: BLE001 - as above: the loop outlives a bug in what it feeds
                # The exporter keeps serving what it rendered before, which goes stale by its age.
                # One traceback per run of failures, not one per period.
                if not self._on_state_failing:
                    log.exception("on_state failed; logged again only after it has succeeded")
                self._on_state_failing = True
            else:
                self._on_state_failing = False
        self.state = state
        return state

    def _collect(self) -> tuple[Snapshot, dict[str, tuple[PodRef, ...]]]:
        snapshot = self.reader.collect()
        owners: dict[str, tuple[PodRef, ...]] = {}
        if self.attribution is not None:
            for reading in snapshot.devices:
                owners[reading.identity.uuid] = self.attribution(reading.identity)
        return snapshot, owners
