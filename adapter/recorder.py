"""The EventRecorder: Kubernetes Events on ScaledObjects, written off the event loop.

After each refresh the registry hands it the target (`observe`, on the event loop): it drafts
an Event only when what the target serves changes (`adapter.events.next_event`) and puts the
draft on a bounded queue, never waiting: a full queue drops the draft and counts it. One writer
thread takes drafts off the queue, rate-limits and aggregates them (`EventCorrelator`), and
writes them through an `EventSink` (`adapter.kubeevents`: the blocking `kubernetes` client).

Events are advice, not a dependency: nothing here can fail or delay a refresh or an RPC. A write
that fails (403: no RBAC; the API unreachable; anything else) is counted and logged once; the
log says so again only after writes have worked again and then failed again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Protocol
from weakref import WeakKeyDictionary

from adapter.events import Announced, EventCorrelator, EventDraft, Series, Write, next_event, observe
from adapter.targets import Target

log = logging.getLogger(__name__)

# What became of a draft: each a value of the events metric's `result` label (adapter.metrics).
CREATED = "created"  # a new Event
PATCHED = "patched"  # a repeat: the existing Event's count went up
RATE_LIMITED = "rate_limited"  # dropped: its ScaledObject spent its burst (EventCorrelator)
QUEUE_FULL = "queue_full"  # dropped: the writer is that far behind (an API that hangs, say)
FAILED = "failed"  # the API refused it or could not be reached
RESULTS = (CREATED, PATCHED, RATE_LIMITED, QUEUE_FULL, FAILED)

# Why a write failed (EventWriteError.reason)
FORBIDDEN, UNREACHABLE, NOT_FOUND, ERROR = "forbidden", "unreachable", "not_found", "error"

_STOP = object()


class EventWriteError(Exception):
    """The API did not take a write; `reason` is FORBIDDEN, UNREACHABLE, NOT_FOUND or ERROR."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class EventSink(Protocol):
    """Blocking writes of core/v1 Events (`adapter.kubeevents.KubernetesEventSink`); each raises EventWriteError."""

    def involved_object(self, namespace: str, name: str) -> dict:
        """The ScaledObject's object reference: apiVersion, kind, namespace, name, uid."""
        ...

    def create(self, namespace: str, body: dict) -> None: ...

    def patch(self, namespace: str, event_name: str, body: dict) -> None:
        """A strategic merge patch of the Event `event_name`; NOT_FOUND when it expired."""
        ...


def rfc3339(wall_s: float) -> str:
    """Seconds since the epoch as the API's timestamps (metav1.Time: RFC 3339, seconds, UTC)."""
    return datetime.fromtimestamp(wall_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Observes targets on the event loop; writes their Events on its own thread."""

    def __init__(
        self,
        sink: EventSink,
        *,
        component: str,
        instance: str = "",
        correlator: EventCorrelator | None = None,
        queue_size: int = 256,
        wall_clock: Callable[[], float] = time.time,
        on_result: Callable[[str, str], None] = lambda reason, result: None,
    ):
        """`component` and `instance` are the Event's source (kubectl describe's From column:
        the program and its pod); `on_result(reason, result)` counts each draft's fate (RESULTS).
        Time for the rate limit and aggregation comes with each draft from the caller's clock;
        `wall_clock` (seconds since the epoch) stamps the Events."""
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self._sink = sink
        self._component, self._instance = component, instance
        self._correlator = correlator or EventCorrelator()
        self._wall_clock = wall_clock
        self._on_result = on_result
        self._announced: WeakKeyDictionary[Target, Announced] = WeakKeyDictionary()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._failing: str | None = None  # the reason of the first failure since writes last worked
        self._crashed = False
        self._last_ns = 0  # the last Event name's time part
        self._thread = threading.Thread(target=self._run, name="kubernetes-events", daemon=True)
        self._thread.start()

    # --- the event loop's side -----------------------------------------------------------

    def observe(self, target: Target, now: float) -> None:
        """Drafts the Event `target`'s refresh at `now` calls for, if any, and queues it.
        Never raises and never blocks."""
        try:
            seen = observe(target, now)
            draft, announced = next_event(target.namespace, target.name, target.spec,
                                          self._announced.get(target), seen, now)
            if announced is None:
                self._announced.pop(target, None)
            else:
                self._announced[target] = announced
            if draft is not None:
                self.enqueue(draft, now)
        except Exception:  # a bug here must not fail the refresh that called it
            if not self._crashed:
                log.exception("drafting a Kubernetes Event failed; scaling carries on")
            self._crashed = True

    def enqueue(self, draft: EventDraft, now: float) -> None:
        """Queues `draft`, observed at `now` (monotonic seconds), or drops and counts it when the queue is full."""
        try:
            self._queue.put_nowait((draft, now))
        except queue.Full:
            self._on_result(draft.reason, QUEUE_FULL)

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stops the writer after the draft in hand; drafts still queued are dropped. Returns
        whether it stopped within `timeout_s` (a hung write holds it up to the sink's timeout)."""
        while True:
            try:
                self._queue.put_nowait(_STOP)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    pass
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Blocks until every draft queued so far is written or dropped, at most `timeout_s`;
        says whether they all were. For tests and tools: never call it on the event loop."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: not self._queue.unfinished_tasks, timeout_s)

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                draft, at = item
                self._write(draft, at)
            except Exception:  # never let one bad draft end the writer
                log.exception("writing a Kubernetes Event failed unexpectedly")
            finally:
                self._queue.task_done()

    def _write(self, draft: EventDraft, at: float) -> None:
        write = self._correlator.correlate(draft, at)
        if write is None:
            self._on_result(draft.reason, RATE_LIMITED)
            return
        try:
            series, result = self._apply(write, at)
        except EventWriteError as e:
            self._on_result(draft.reason, FAILED)
            if self._failing is None:
                log.warning("cannot record Kubernetes Events on ScaledObjects (%s: %s); scaling carries on without "
                            "them, and this is said again only after a write succeeds and another fails",
                            e.reason, e)
                self._failing = e.reason
            return
        self._correlator.written(draft, series)
        self._on_result(draft.reason, result)
        if self._failing is not None:
            log.info("Kubernetes Events are recorded again (the last failure was %s)", self._failing)
            self._failing = None

    def _apply(self, write: Write, at: float) -> tuple[Series, str]:
        draft, series = write.draft, write.series
        wall = self._wall_clock()
        stamp = rfc3339(wall)
        if series is not None:
            count = series.count + 1
            try:
                # what client-go's eventLogger patches: the count, the last time, the latest message
                self._sink.patch(draft.namespace, series.event_name,
                                 {"count": count, "lastTimestamp": stamp, "message": draft.message})
                return Series(series.event_name, count, series.first_timestamp, at), PATCHED
            except EventWriteError as e:
                if e.reason != NOT_FOUND:
                    raise
                # expired (the API server's --event-ttl, 1 h by default): start a new Event
        involved = self._sink.involved_object(draft.namespace, draft.name)
        # client-go's naming: the object's name, then the time in nanoseconds, in hex; never twice the same
        self._last_ns = max(int(wall * 1e9), self._last_ns + 1)
        name = f"{draft.name}.{self._last_ns:x}"
        self._sink.create(draft.namespace, {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": draft.namespace},
            "involvedObject": involved,
            "type": draft.type,
            "reason": draft.reason,
            "message": draft.message,
            "source": {"component": self._component, **({"host": self._instance} if self._instance else {})},
            "reportingComponent": self._component,
            **({"reportingInstance": self._instance} if self._instance else {}),
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        })
        return Series(name, 1, stamp, at), CREATED
