"""Pull mode: the worker takes jobs off a Redis stream (`contract.jobqueue`) and feeds its batcher.

`QueueConsumer` runs in the worker's event loop beside the HTTP server. It pulls one entry at a
time while its images in hand (each entry says its job's image count) are fewer than two max
batches, and hands each to a `JobHandler` (worker/queuejob.py: START, the batcher, FINISH). A
heartbeat re-claims the entries still its own every `claim_idle_s / 4`, so a slow live worker
is never robbed; entries a dead consumer left pending for `claim_idle_s` are taken over
(XAUTOCLAIM) every `claim_idle_s / 2`. Every `status_check_s` it reads the statuses of its jobs
in hand and drops from the batcher those cancelled (or ended elsewhere) meanwhile. While Redis
is unreachable every call is retried with backoff, a FINISH until it lands, and readiness is
false. docs/WORKER.md ("Pull mode") has the delivery rules in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract import jobqueue

from .queueconfig import QueueConfig
from .queuejob import GiveBack, Hand, JobHandler
from .service import WorkerService

log = logging.getLogger("worker.queue")

T = TypeVar("T")
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 2.0
LOOKAHEAD_BATCHES = 2  # batches in hand at most: one in the pipeline, one forming behind it


def consumer_name() -> str:
    """Unique per process: the pod's name (HOSTNAME), the pid and a random suffix."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class QueueConsumer:
    """Feeds one worker's batcher from the stream; `start` once the model is loaded."""

    def __init__(self, config: QueueConfig, service: WorkerService, name: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock`: Unix seconds, compared with jobs' deadlines (START's `now`)."""
        self.config = config
        self.keys = config.keys
        self.service = service
        self.metrics = service.metrics
        self.name = name or consumer_name()
        self.clock = clock
        # No retries inside the client: this class owns the policy (backoff, outage logging).
        self.client = aioredis.Redis.from_url(
            config.url, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_timeout=config.block_s + 10,
            socket_connect_timeout=5, **config.access.client_options(),
        )
        self._heartbeat_script = self.client.register_script(jobqueue.HEARTBEAT)
        self.jobs = JobHandler(config, service, self.client, self.name, clock, self)
        self._hands: dict[str, Hand] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()  # a job left hand: there may be room to pull
        self._stopping = False
        self._outage: str | None = None  # the error of the outage under way
        self._outage_since = 0.0
        self._recovered_at = float("-inf")
        self._puller: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        service.pull_status = self.unready_reason

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts pulling, reclaiming and the heartbeat, in the running event loop."""
        if self._puller is None and not self._stopping:
            self._puller = asyncio.ensure_future(self._pull_forever())
            self._watcher = asyncio.ensure_future(self._watch_forever())
            log.info("pulling jobs from %s as %s of group %s", self.keys.stream, self.name, self.keys.group)

    def unready_reason(self) -> str | None:
        """Why the queue holds the worker's readiness false, or None."""
        if self._stopping:
            return "draining: no more jobs are pulled"
        return self._outage

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_hand(self) -> int:
        return len(self._hands)

    async def stop_pulling(self) -> None:
        """Pulls and reclaims no more; returns once every job in hand has reached the batcher
        (or ended), so the batcher may close behind them."""
        self._stopping = True
        self._changed.set()
        if self._puller is not None:
            await asyncio.gather(self._puller, return_exceptions=True)
        for hand in list(self._hands.values()):
            await hand.admitted.wait()

    async def finish(self, timeout_s: float) -> bool:
        """Waits until every job in hand is FINISHed; True if all were within `timeout_s`. Then
        leaves the group when nothing is pending here, and closes the connection."""
        tasks = set(self._tasks)
        unfinished: set[asyncio.Task] = set()
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=max(timeout_s, 0.0))
        if self._watcher is not None:
            self._watcher.cancel()
        if unfinished:
            log.error("%d jobs still in hand at exit; their entries stay pending until reclaimed", len(unfinished))
        elif self._puller is not None:
            await self._leave_group()
        await self.client.aclose()
        return not unfinished

    async def _leave_group(self) -> None:
        # XGROUP DELCONSUMER drops the consumer's pending entries with it: only when it has none.
        try:
            pending = await self.client.xpending_range(self.keys.stream, self.keys.group, "-", "+", 1,
                                                       consumername=self.name)
            if not pending:
                await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, self.name)
        except (*UNREACHABLE, ResponseError) as error:
            log.warning("could not leave consumer group %s: %s", self.keys.group, error)

    # -- outages --------------------------------------------------------------------------------

    def _unreachable(self, error: BaseException) -> None:
        if self._outage is None:
            self._outage_since = time.monotonic()
            log.error("job queue at %s unreachable (%s: %s); retrying with backoff, jobs in hand are kept",
                      self.config.url, type(error).__name__, error)
        self._outage = f"job queue unreachable: {type(error).__name__}: {error}"

    def _reachable(self) -> None:
        if self._outage is not None:
            self._outage = None
            self._recovered_at = time.monotonic()
            log.info("job queue reachable again after %.1f s", self._recovered_at - self._outage_since)

    async def until_done(self, call: Callable[[], Awaitable[T]]) -> T:
        """Runs a Redis call until it answers, backing off while Redis is unreachable."""
        delay = BACKOFF_FIRST_S
        while True:
            try:
                result = await call()
            except UNREACHABLE as error:
                self._unreachable(error)
                await asyncio.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)
                continue
            self._reachable()
            return result

    async def _ensure_group(self) -> None:
        """Creates the group at the stream's start (and the stream), unless it exists."""
        try:
            await self.client.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    # -- pulling and reclaiming -----------------------------------------------------------------

    def _room(self) -> int:
        """Images to pull: two max batches (the one running and the next forming behind it, as
        in direct mode) less the images in hand, at least 1 with none in hand. One batch alone
        left the pipeline idle between batches (bench/gateway_overhead.py). Entries are pulled
        one at a time while this is above 0, so the last may take it below."""
        engine = self.service.engine
        max_batch = engine.max_batch_size if engine else self.service.limits.batching.max_batch_size
        room = LOOKAHEAD_BATCHES * max_batch - sum(hand.images for hand in self._hands.values())
        return max(room, 1) if not self._hands else max(room, 0)

    async def _pull_forever(self) -> None:
        next_reclaim = time.monotonic()
        delay = BACKOFF_FIRST_S
        group_ready = False
        while not self._stopping:
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                now = time.monotonic()
                if now >= next_reclaim:
                    next_reclaim = now + self.config.claim_idle_s / 2
                    # After an outage every entry looks idle: let live consumers' heartbeats land first.
                    if now - self._recovered_at >= self.config.claim_idle_s / 2:
                        await self._reclaim()
                self._changed.clear()  # before reading the room, so a job leaving meanwhile still wakes us
                if (room := self._room()) == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(self.config.block_s, next_reclaim - now))
                    continue
                # One entry: its image count is known only once it is read. BLOCK returns at once
                # when an entry is there, so a burst is taken back to back.
                reply = await self.client.xreadgroup(self.keys.group, self.name, {self.keys.stream: ">"},
                                                     count=1, block=int(self.config.block_s * 1000))
            except UNREACHABLE as error:
                self._unreachable(error)
            except ResponseError as error:
                group_ready = "NOGROUP" not in str(error)
                log.warning("pulling failed (%s)%s", error, "" if group_ready else ": creating the group again")
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                log.exception("pulling failed")
            else:
                delay = BACKOFF_FIRST_S
                self._reachable()
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self._take(entry_id, fields, reclaimed=False)
                continue
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)

    async def _reclaim(self) -> None:
        """Takes over entries left pending past `claim_idle_s`, as many as fit."""
        start = "0-0"
        while not self._stopping and self._room() > 0:
            try:
                start, claimed, deleted = await self.client.xautoclaim(
                    self.keys.stream, self.keys.group, self.name, int(self.config.claim_idle_s * 1000),
                    start_id=start, count=1)
                if deleted:  # acknowledged and deleted meanwhile; make sure no PEL keeps them
                    await self.client.xack(self.keys.stream, self.keys.group, *deleted)
            except UNREACHABLE as error:
                self._unreachable(error)
                return
            for entry_id, fields in claimed:
                self._take(entry_id, fields or {}, reclaimed=True)
            if start == "0-0":
                return

    async def _watch_forever(self) -> None:
        """Every `status_check_s`, drops the jobs in hand that ended elsewhere; every
        `claim_idle_s / 4`, the heartbeat. Outlives any one failure, like the puller."""
        beat_every_s = self.config.claim_idle_s / 4
        period_s = min(self.config.status_check_s, beat_every_s)
        next_beat = time.monotonic() + beat_every_s
        while True:
            await asyncio.sleep(period_s)
            hands = list(self._hands.values())
            if not hands:
                continue
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every_s
                    await self._beat(hands)
                await self._drop_ended(hands)
            except UNREACHABLE as error:
                self._unreachable(error)
            except ResponseError as error:
                log.warning("checking the %d jobs in hand failed: %s", len(hands), error)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("checking the jobs in hand failed; again in %g s", period_s)

    async def _drop_ended(self, hands: list[Hand]) -> None:
        """One round trip: jobs cancelled (or ended by another worker) while in hand leave the
        batcher before they are computed."""
        pipe = self.client.pipeline(transaction=False)
        for hand in hands:
            pipe.hget(self.keys.job(hand.job_id), "status")
        for hand, status in zip(hands, await pipe.execute(), strict=True):
            if status in jobqueue.FINAL and not hand.dropped.is_set():
                log.info("job %s was %s while in hand: dropped from the batcher", hand.job_id, status)
                hand.dropped.set()

    async def _beat(self, hands: list[Hand]) -> None:
        """Resets the idle time of the entries in hand still pending on this consumer (HEARTBEAT);
        one another consumer took over after this one stalled stays with that one."""
        ids = [hand.entry_id for hand in hands]
        kept = set(await self._heartbeat_script(keys=[self.keys.stream], args=[self.keys.group, self.name, *ids]))
        for hand in hands:
            if hand.entry_id not in kept and hand.entry_id in self._hands and not hand.taken_over:
                hand.taken_over = True
                log.warning("job %s (entry %s) was taken over by another consumer while in hand here; "
                            "the first FINISH keeps its result", hand.job_id, hand.entry_id)

    def _take(self, entry_id: str, fields: dict[str, str], reclaimed: bool) -> None:
        if entry_id in self._hands:
            return  # ours already: its heartbeat lapsed during an outage
        hand = Hand(entry_id, fields.get(jobqueue.JOB_FIELD, ""), jobqueue.entry_images(fields))
        self._hands[entry_id] = hand
        self.metrics.queue_in_hand.set(len(self._hands))
        if reclaimed:
            self.metrics.queue_reclaimed.inc()
        task = asyncio.ensure_future(self._handle(hand))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one job --------------------------------------------------------------------------------

    async def _handle(self, hand: Hand) -> None:
        try:
            self.metrics.queue_jobs.labels(await self.jobs.process(hand)).inc()
        except GiveBack as reason:
            log.warning("job %s given back for another worker to reclaim: %s", hand.job_id, reason)
        except Exception:  # noqa: BLE001 - the entry stays pending and is reclaimed; the loop goes on
            log.exception("job %s (entry %s) failed here; its entry stays pending for a reclaim",
                          hand.job_id, hand.entry_id)
        finally:
            hand.admitted.set()
            del self._hands[hand.entry_id]
            self.metrics.queue_in_hand.set(len(self._hands))
            self._changed.set()
