"""Pull mode: the worker takes jobs off a Redis stream (`contract.jobqueue`) and feeds its batcher.

`QueueConsumer` runs in the worker's event loop beside the HTTP server and hands each job to
`WorkerService.generate`, the path an HTTP request takes, so batching, failure isolation and
the request metrics are the same. It pulls only what one batch can take (COUNT = the max batch
less the images in hand, at least 1 with none in hand), runs START's verdict on each delivery,
and FINISHes every job (store and acknowledge in one step). A heartbeat re-claims its own
entries every `claim_idle_s / 4`, so a slow live worker is never robbed; entries a dead consumer
left pending for `claim_idle_s` are taken over (XAUTOCLAIM) every `claim_idle_s / 2`. While
Redis is unreachable every call is retried with backoff, a FINISH until it lands, and readiness
is false. docs/WORKER.md ("Pull mode") has the delivery rules in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from contract import jobqueue
from contract.schema import GenerationRequest, ImageData

from .api import image_spec
from .service import InvalidRequest, Rejected, RequestFailed, WorkerService

log = logging.getLogger("worker.queue")

T = TypeVar("T")
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 2.0
LOOKAHEAD_BATCHES = 2  # batches in hand at most: one in the pipeline, one forming behind it
DEAD_LETTERS_KEPT = 10_000  # the dead-letter stream is trimmed to about this many entries


@dataclass(frozen=True)
class QueueConfig:
    """Where pull mode reads jobs, and its delivery rules; parsed once from flags."""

    url: str  # redis://host:port/db (or rediss://, unix://), never with a password in it
    stream: str = jobqueue.DEFAULT_STREAM
    group: str = jobqueue.DEFAULT_GROUP
    claim_idle_s: float = 60.0  # a pending entry idle this long belongs to a dead consumer
    max_deliveries: int = 3  # deliveries of one job before it is dead-lettered
    result_ttl_s: int = 3600  # how long a finished job's hash (and result) is kept
    password: str | None = field(default=None, repr=False)
    block_s: float = 1.0  # how long one XREADGROUP waits for new entries

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.password is not None:
            raise ValueError("--queue carries a password; give it with --redis-password-file or "
                             "WORKER_REDIS_PASSWORD instead, so it is never in the process list or the pod spec")
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"--queue must be a redis://, rediss:// or unix:// URL, not scheme {parts.scheme!r}")
        if not self.claim_idle_s > 0:
            raise ValueError(f"--claim-idle must be above 0 seconds, got {self.claim_idle_s}")
        for value, flag in ((self.max_deliveries, "--max-deliveries"), (self.result_ttl_s, "--result-ttl")):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        jobqueue.QueueKeys(self.stream, self.group)  # validates the names

    @property
    def keys(self) -> jobqueue.QueueKeys:
        return jobqueue.QueueKeys(self.stream, self.group)


def consumer_name() -> str:
    """Unique per process: the pod's name (HOSTNAME), the pid and a random suffix."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(eq=False)
class Hand:
    """One stream entry in hand: pulled or reclaimed, not yet FINISHed."""

    entry_id: str
    job_id: str
    images: int = 1  # what it takes of a batch; known once its request is read
    admitted: asyncio.Event = field(default_factory=asyncio.Event)  # set once past the batcher's door


class GiveBack(Exception):
    """The job cannot be run here now; its entry stays pending for another consumer to reclaim."""


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
            config.url, password=config.password, decode_responses=True, retry=Retry(NoBackoff(), 0),
            socket_timeout=config.block_s + 10, socket_connect_timeout=5,
        )
        self._start_script, self._finish_script = map(self.client.register_script, (jobqueue.START, jobqueue.FINISH))
        self._hands: dict[str, Hand] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()  # a job left hand: there may be room to pull
        self._stopping = False
        self._outage: str | None = None  # the error of the outage under way
        self._outage_since = 0.0
        self._recovered_at = float("-inf")
        self._puller: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        service.pull_status = self.unready_reason

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts pulling, reclaiming and the heartbeat, in the running event loop."""
        if self._puller is None and not self._stopping:
            self._puller = asyncio.ensure_future(self._pull_forever())
            self._heartbeat = asyncio.ensure_future(self._heartbeat_forever())
            log.info("pulling jobs from %s as %s of group %s", self.keys.stream, self.name, self.keys.group)

    def unready_reason(self) -> str | None:
        """Why the queue holds the worker's readiness false, or None."""
        if self._stopping:
            return "draining: no more jobs are pulled"
        return self._outage

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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
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

    async def _until_done(self, call: Callable[[], Awaitable[T]]) -> T:
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
        """Entries to ask for: two max batches (the one running and the next forming behind it,
        as in direct mode) less the images in hand, at least 1 with none in hand. One batch
        alone left the pipeline idle between batches (bench/gateway_overhead.py)."""
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
                reply = await self.client.xreadgroup(self.keys.group, self.name, {self.keys.stream: ">"},
                                                     count=room, block=int(self.config.block_s * 1000))
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
        while not self._stopping and (room := self._room()) > 0:
            try:
                start, claimed, deleted = await self.client.xautoclaim(
                    self.keys.stream, self.keys.group, self.name, int(self.config.claim_idle_s * 1000),
                    start_id=start, count=room)
                if deleted:  # acknowledged and deleted meanwhile; make sure no PEL keeps them
                    await self.client.xack(self.keys.stream, self.keys.group, *deleted)
            except UNREACHABLE as error:
                self._unreachable(error)
                return
            for entry_id, fields in claimed:
                self._take(entry_id, fields or {}, reclaimed=True)
            if start == "0-0":
                return

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.claim_idle_s / 4)
            ids = list(self._hands)
            if not ids:
                continue
            try:
                await self.client.xclaim(self.keys.stream, self.keys.group, self.name, 0, ids, justid=True)
            except UNREACHABLE as error:
                self._unreachable(error)
            except ResponseError as error:
                log.warning("heartbeat on %d entries failed: %s", len(ids), error)

    def _take(self, entry_id: str, fields: dict[str, str], reclaimed: bool) -> None:
        if entry_id in self._hands:
            return  # ours already: its heartbeat lapsed during an outage
        hand = Hand(entry_id, fields.get(jobqueue.JOB_FIELD, ""))
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
            outcome = await self._process(hand)
            if outcome is not None:
                self.metrics.queue_jobs.labels(outcome).inc()
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

    async def _process(self, hand: Hand) -> str | None:
        """Runs START's verdict on one delivery; returns the outcome to count (JOB_OUTCOMES)."""
        verdict, attempts = await self._until_done(lambda: self._start_script(
            keys=[self.keys.job(hand.job_id)], args=[self.name, repr(self.clock()), self.config.max_deliveries]))
        attempts = int(attempts)
        if verdict == "run":
            return await self._run(hand)
        if verdict == "expired":
            return await self._end(hand, jobqueue.EXPIRED, "error", "past its deadline before a worker started it",
                                   "expired")
        if verdict == "dead":
            error = (f"dead-lettered after {attempts} deliveries (more than --max-deliveries "
                     f"{self.config.max_deliveries}): each worker that took it died or gave it back")
            await self._until_done(lambda: self.client.xadd(
                self.keys.dead, {jobqueue.JOB_FIELD: hand.job_id, "error": error, "attempts": attempts},
                maxlen=DEAD_LETTERS_KEPT, approximate=True))
            log.error("job %s: %s", hand.job_id, error)
            return await self._end(hand, jobqueue.FAILED, "error", error, "dead_lettered")
        if verdict.startswith("final:"):
            status = verdict.partition(":")[2]
            await self._ack(hand, status, "")
            return "cancelled" if status == jobqueue.CANCELLED else "duplicate"
        if verdict == "missing":
            log.warning("job %r (entry %s) has no hash (expired, deleted, or no %r field): entry dropped",
                        hand.job_id, hand.entry_id, jobqueue.JOB_FIELD)
            await self._ack(hand, jobqueue.FAILED, "")
            return None
        raise RuntimeError(f"START answered {verdict!r}, which this worker does not know")

    async def _run(self, hand: Hand) -> str:
        request, deadline = await self._until_done(
            lambda: self.client.hmget(self.keys.job(hand.job_id), ["request", "deadline"]))
        try:
            body = GenerationRequest.model_validate_json(request or "")
        except ValidationError as invalid:
            return await self._end(hand, jobqueue.FAILED, "error", f"invalid request: {describe(invalid)}", "failed")
        hand.images = body.n
        while True:
            try:
                hand.admitted.set()  # generate queues the job before its first await
                images = await self.service.generate(image_spec(body), asyncio.Event().wait)  # nobody disconnects
                break
            except InvalidRequest as invalid:
                return await self._end(hand, jobqueue.FAILED, "error", f"invalid request: {invalid.field}: {invalid}",
                                       "failed")
            except RequestFailed as failed:
                return await self._end(hand, jobqueue.FAILED, "error", str(failed), "failed")
            except Rejected as rejected:
                # 429: requests from the direct API fill the batcher; wait. 503: draining or not loaded.
                if rejected.status != 429 or self._stopping:
                    raise GiveBack(str(rejected)) from None
                await asyncio.sleep(rejected.retry_after_s or 1)
                if deadline and self.clock() > float(deadline):
                    return await self._end(hand, jobqueue.EXPIRED, "error",
                                           "past its deadline while this worker's batcher was full", "expired")
        result = json.dumps([ImageData(b64_json=image.png_b64, seed=image.seed).model_dump() for image in images])
        return await self._end(hand, jobqueue.DONE, "result", result, "done")

    async def _end(self, hand: Hand, status: str, payload_field: str, payload: str, outcome: str) -> str:
        """FINISHes the job with `status`; `outcome` if this call ended it, else what had ended it."""
        if await self._ack(hand, status, payload, payload_field):
            return outcome
        ended = await self._until_done(lambda: self.client.hget(self.keys.job(hand.job_id), "status"))
        return "cancelled" if ended == jobqueue.CANCELLED else "duplicate"

    async def _ack(self, hand: Hand, status: str, payload: str, payload_field: str = "error") -> bool:
        """FINISH: stores the outcome over a job not yet ended, acknowledges and deletes the entry,
        retried until Redis answers; True when this call ended the job."""
        keys = self.keys
        wrote = await self._until_done(lambda: self._finish_script(
            keys=[keys.job(hand.job_id), keys.stream, keys.done(hand.job_id)],
            args=[keys.group, hand.entry_id, status, payload_field, payload, repr(self.clock()),
                  self.config.result_ttl_s]))
        return bool(int(wrote))


def describe(invalid: ValidationError) -> str:
    """A pydantic error as 'field: message; ...', naming each field."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'request'}: {error['msg']}" for error in invalid.errors())
