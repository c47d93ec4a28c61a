"""Registered triggers, their background refreshers and the cache the RPCs answer from.

A trigger is registered on first contact, keyed by namespace, name and the whole metadata
map, so an edited ScaledObject becomes a new target and the old one is forgotten once idle.
Each target refreshes on its own task every `refreshSeconds`; RPCs read the last good
snapshot and never wait on Prometheus or the Kubernetes API, except for a target's very
first call. A target whose queue is read from Redis also keeps its last good backlog on its
own (`Activity`), so IsActive, which needs nothing else, survives a Prometheus outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from adapter.access import AccessRules
from adapter.config import ScalerSpec, parse_metadata
from adapter.policy import Decision, PolicyState, Signals, decide, queue_active
from adapter.reading import QueryOutcome, Reading, absent_is_not_zero, silent_signals
from adapter.signals import SignalReader
from contract.names import QUEUE

log = logging.getLogger(__name__)

TargetKey = tuple[str, str, tuple[tuple[str, str], ...]]


class ReplicaCounter(Protocol):
    """The scale target's replica count from the Kubernetes API (`adapter.kube.KubernetesReplicas`)."""

    async def replicas(self, namespace: str, name: str, now: float) -> int | None:
        """The ScaledObject's target's ready replicas; None when the API cannot say. Never raises."""
        ...

    def forget(self, namespace: str, name: str) -> None:
        """The scaler no longer serves this ScaledObject."""
        ...


class Unavailable(Exception):
    """No value may be served: none yet, or the last good one is older than staleAfterSeconds."""


class TooManyTargets(Exception):
    """The registry is full; protects the scaler from unbounded metadata churn."""


@dataclass(frozen=True)
class Snapshot:
    """The last good decision and the signals it came from."""

    decision: Decision
    signals: Signals
    at: float  # clock time of the reading


@dataclass(frozen=True)
class Activity:
    """IsActive's answer from the queue alone: the last good backlog read from Redis."""

    active: bool  # backlog > activationQueue
    backlog: float  # jobs waiting or in hand
    at: float  # clock time of the read


class Target:
    """One trigger of one ScaledObject: spec, policy state, last good snapshot, statistics."""

    def __init__(self, key: TargetKey, namespace: str, name: str, spec: ScalerSpec, now: float):
        self.key = key
        self.namespace = namespace
        self.name = name
        self.spec = spec
        self.created_at = now
        self.last_used_at = now
        self.state = PolicyState()
        self.snapshot: Snapshot | None = None
        self.activity: Activity | None = None  # only with redis_address
        self.last_error: str | None = None
        self.last_outcomes: tuple[QueryOutcome, ...] = ()
        self.refreshes: Counter[str] = Counter()  # by result: ok, error
        self.query_failures: Counter[str] = Counter()  # by query name
        self.silent: tuple[str, ...] = ()  # enabled signals answering no series on a serving fleet
        self.open_streams = 0
        self.first_attempt = asyncio.Event()
        self._changed = asyncio.Event()

    def apply(self, reading: Reading, now: float, api_replicas: int | None = None) -> None:
        """Records a refresh; a successful one advances the policy and replaces the snapshot.
        Count series that vanished from a target with replicas fail the refresh (absent is not
        zero); `api_replicas` is the Kubernetes API's count, None when it cannot say."""
        reading = absent_is_not_zero(reading, self.snapshot.signals if self.snapshot else None, api_replicas)
        self.last_outcomes = reading.outcomes
        for outcome in reading.outcomes:
            if outcome.error:
                self.query_failures[outcome.name] += 1
            elif outcome.name == QUEUE and self.spec.redis_address is not None and outcome.value is not None:
                # The backlog needs nothing from Prometheus, so a good one is kept even when
                # the other queries fail: IsActive, and waking from zero, depend on Redis alone.
                self.activity = Activity(queue_active(self.spec.policy, outcome.value), outcome.value, now)
        if reading.signals is None:
            self.refreshes["error"] += 1
            self.last_error = reading.error
        else:
            decision = decide(self.spec.policy, reading.signals, self.state, now)
            self.state = decision.state
            self.snapshot = Snapshot(decision, reading.signals, now)
            self.silent = silent_signals(reading)
            self.refreshes["ok"] += 1
            self.last_error = None
        self.first_attempt.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, timeout_s: float) -> None:
        """Returns after the next refresh, or after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    def current(self, now: float) -> Snapshot:
        """The snapshot to serve at `now`; raises Unavailable when there is none or it is stale."""
        if self.snapshot is None:
            reason = self.last_error or "the first refresh has not finished"
            raise Unavailable(f"no value yet for {self.namespace}/{self.name}: {reason}")
        age = now - self.snapshot.at
        if age > self.spec.stale_after_s:
            raise Unavailable(
                f"last good value for {self.namespace}/{self.name} is {age:.0f}s old "
                f"(staleAfterSeconds={self.spec.stale_after_s:g}); last error: {self.last_error}"
            )
        return self.snapshot

    def is_active(self, now: float) -> bool:
        """IsActive's answer at `now`. With the queue read from Redis, the last good backlog
        while it is no older than staleAfterSeconds, even when the snapshot is stale or missing
        (the other queries failed): it is never older than the snapshot, and a Prometheus outage
        must not strand a backlog at zero replicas. Otherwise, and once the backlog is stale too,
        the snapshot's (`current`: raises Unavailable)."""
        activity = self.activity
        if activity is not None and now - activity.at <= self.spec.stale_after_s:
            # the keep-warm hold (adapter/policy.py keep_warm_s) is the snapshot's, while it is fresh:
            # a hold decided before an outage must not keep an idle fleet up for the whole outage
            snapshot = self.snapshot
            held = snapshot is not None and snapshot.decision.kept_warm and now - snapshot.at <= self.spec.stale_after_s
            return activity.active or held
        if activity is not None:
            raise Unavailable(
                f"last good backlog for {self.namespace}/{self.name} is {now - activity.at:.0f}s old "
                f"(staleAfterSeconds={self.spec.stale_after_s:g}); last error: {self.last_error}"
            )
        return self.current(now).decision.active

    def age(self, now: float) -> float | None:
        return None if self.snapshot is None else now - self.snapshot.at


class TargetRegistry:
    """Owns every target and its refresh task; lives on one asyncio event loop."""

    def __init__(
        self,
        reader: SignalReader,
        *,
        clock: Callable[[], float] = time.monotonic,
        access: AccessRules | None = AccessRules(),
        scrape_targets_dir: str | None = None,
        idle_forget_s: float = 900.0,
        max_targets: int = 2000,
        on_reading: Callable[[Reading], None] | None = None,
        replicas: ReplicaCounter | None = None,
        on_refresh: Callable[[Target, float], None] | None = None,
    ):
        """`on_refresh(target, now)` is called after each refresh has been applied (the
        EventRecorder's `observe`); it must neither raise nor block."""
        self._reader = reader
        self._replicas = replicas
        self._clock = clock
        self._access = access
        self._scrape_targets_dir = scrape_targets_dir
        self._idle_forget_s = idle_forget_s
        self._max_targets = max_targets
        self._on_reading = on_reading
        self._on_refresh = on_refresh
        self._targets: dict[TargetKey, Target] = {}
        self._tasks: dict[TargetKey, asyncio.Task] = {}
        self._closing = False

    def now(self) -> float:
        return self._clock()

    def targets(self) -> list[Target]:
        """A copy, safe to iterate from another thread (the /metrics server)."""
        return list(self._targets.values())

    def resolve(self, namespace: str, name: str, metadata: Mapping[str, str]) -> Target:
        """The target for this trigger, registered and refreshing; raises MetadataError, TooManyTargets."""
        key: TargetKey = (namespace, name, tuple(sorted(metadata.items())))
        target = self._targets.get(key)
        if target is None:
            target = self._register(key, namespace, name, metadata)
        target.last_used_at = self._clock()
        return target

    async def first_refresh(self, target: Target) -> None:
        """Waits for a new target's first refresh to finish; returns at once ever after."""
        if target.first_attempt.is_set():
            return
        # The reader bounds every query; this is a backstop on top of it.
        try:
            async with asyncio.timeout(target.spec.query_timeout_s + 2.0):
                await target.first_attempt.wait()
        except TimeoutError:
            pass

    def _register(self, key: TargetKey, namespace: str, name: str, metadata: Mapping[str, str]) -> Target:
        spec = parse_metadata(metadata, self._access, self._scrape_targets_dir, namespace)
        if len(self._targets) >= self._max_targets:
            raise TooManyTargets(
                f"{len(self._targets)} triggers are registered, the limit (--max-scaled-objects); "
                "idle ones are forgotten after --idle-forget-seconds"
            )
        cap = self._access.max_per_namespace if self._access is not None else None
        if cap is not None and sum(1 for t in self._targets.values() if t.namespace == namespace) >= cap:
            # One namespace cannot take the scaler from the others: they still register.
            raise TooManyTargets(
                f"namespace {namespace} has {cap} triggers registered, its limit (--max-scaled-objects-per-namespace); "
                "idle ones are forgotten after --idle-forget-seconds"
            )
        if spec.unknown_keys:
            log.warning(
                "ScaledObject %s/%s: ignoring unknown trigger metadata keys %s",
                namespace, name, ", ".join(spec.unknown_keys),
            )  # fmt: skip
        target = Target(key, namespace, name, spec, self._clock())
        self._targets[key] = target
        self._tasks[key] = asyncio.get_running_loop().create_task(
            self._refresh_loop(target), name=f"refresh {namespace}/{name}"
        )
        log.info("registered ScaledObject %s/%s (metric %s)", namespace, name, spec.metric_name)
        return target

    async def refresh(self, target: Target) -> None:
        if self._replicas is None:
            reading, api_replicas = await self._reader.read(target.spec), None
        else:
            # Side by side: the API read (cached, bounded, on a thread) adds no latency.
            reading, api_replicas = await asyncio.gather(
                self._reader.read(target.spec), self._replicas.replicas(target.namespace, target.name, self._clock())
            )
        previous_error, previously_silent = target.last_error, target.silent
        now = self._clock()
        target.apply(reading, now, api_replicas)
        if self._on_reading is not None:
            self._on_reading(reading)
        if self._on_refresh is not None:
            self._on_refresh(target, now)
        # Log changes, not every refresh: a Prometheus outage would otherwise log once per
        # target per refresh. The counters in /metrics carry the rest.
        if target.last_error and target.last_error != previous_error:
            log.warning("ScaledObject %s/%s: refresh failed: %s", target.namespace, target.name, target.last_error)
        elif previous_error and not target.last_error:
            log.info("ScaledObject %s/%s: refreshes succeed again", target.namespace, target.name)
        if target.silent and target.silent != previously_silent:
            log.warning(
                "ScaledObject %s/%s: the %s signal matches no series while %g replicas are ready, so it "
                "abstains; check the selector, and that the GPU exporter labels the series with the pod",
                target.namespace, target.name, ", ".join(target.silent), target.snapshot.signals.ready_replicas,
            )  # fmt: skip
        elif previously_silent and not target.silent and target.snapshot is not None:
            log.info("ScaledObject %s/%s: the %s signal has series again", target.namespace, target.name,
                     ", ".join(previously_silent))

    async def _refresh_loop(self, target: Target) -> None:
        period = target.spec.refresh_s
        # The first refresh runs at once (an RPC is waiting for it); later ones start at a
        # random phase of the period, so targets registered together (KEDA after a restart)
        # do not refresh in lockstep and stall the event loop in bursts.
        next_due = self._clock() + random.uniform(-period, 0.0)
        try:
            while True:
                try:
                    await self.refresh(target)
                except Exception as error:  # never let one target's bug stop its refreshes
                    crashed = f"refresh crashed: {type(error).__name__}: {error}"
                    if crashed != target.last_error:
                        log.exception("ScaledObject %s/%s: refresh crashed", target.namespace, target.name)
                    # Counted and named like a failed reading, so RPCs and /metrics say why
                    # instead of "the first refresh has not finished" for ever.
                    target.refreshes["error"] += 1
                    target.last_error = crashed
                    target.first_attempt.set()
                now = self._clock()
                if self._closing:
                    return
                if target.open_streams == 0 and now - target.last_used_at > self._idle_forget_s:
                    log.info("forgetting idle ScaledObject %s/%s", target.namespace, target.name)
                    return
                next_due = max(next_due + period, now)
                await asyncio.sleep(next_due - now)
        finally:
            self._targets.pop(target.key, None)
            self._tasks.pop(target.key, None)
            if self._replicas is not None and not any(
                (t.namespace, t.name) == (target.namespace, target.name) for t in self._targets.values()
            ):
                self._replicas.forget(target.namespace, target.name)

    async def close(self, timeout_s: float = 5.0) -> bool:
        """Stops every refresher; returns within `timeout_s` even if one ignores its
        cancellation, and says whether all of them stopped."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if not tasks:
            return True
        _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
        if stuck:
            log.error("%d refresher(s) did not stop within %gs", len(stuck), timeout_s)
        return not stuck
