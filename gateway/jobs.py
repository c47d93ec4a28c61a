"""The job queue as the gateway uses it: enqueue, read, wait for the end, cancel. The Redis
boundary: every Redis error that means "the queue cannot answer now" becomes
`QueueUnavailable`, and the protocol itself (keys, scripts, statuses) is
`contract.jobqueue`'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ClusterDownError, MasterDownError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import TryAgainError

from contract.jobqueue import CANCEL, ENQUEUE, FINAL, QueueKeys, backlog, decode

from .config import GatewayConfig

# A command's reply may take this long before the queue counts as unavailable; the wait's BLPOP
# slice stays well under it, so a slice never reads as a timeout.
SOCKET_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 2.0
WAIT_SLICE_S = 1.0

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # secrets.token_urlsafe's alphabet

log = logging.getLogger("gateway.jobs")

# Loading after a restart and authentication failures are ConnectionErrors too; a read-only
# replica (a failover in progress) cannot take jobs either, nor can a Redis out of memory
# (maxmemory with noeviction).
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, MasterDownError,
                TryAgainError, ClusterDownError, OSError)
# Replies redis-py leaves as a plain ResponseError that still mean "not now" rather than a bad
# command, by their error code (the reply's first word): a failed AOF or RDB write refuses
# writes (MISCONF), a script running too long blocks everyone (BUSY), too few replicas
# acknowledge (NOREPLICAS). redis-py gives OOM, LOADING, READONLY, MASTERDOWN and TRYAGAIN
# classes of their own (above; LOADING's BusyLoadingError is a ConnectionError).
_UNAVAILABLE_CODES = frozenset({"MISCONF", "BUSY", "NOREPLICAS"})


# While Redis stays unavailable, a log line a minute at most; a success this long after the last
# failure ends the outage. Under a partial outage (out of memory: reads answer, writes do not)
# successes come between failures, and without the quiet period every refusal would log twice.
OUTAGE_LOG_INTERVAL_S = 60.0
OUTAGE_QUIET_S = 5.0


def means_unavailable(error: BaseException) -> bool:
    """Whether a redis-py error means the queue cannot answer now (a retry later may work), as
    opposed to a bug in what we sent."""
    if isinstance(error, _UNAVAILABLE):
        return True
    return isinstance(error, ResponseError) and str(error).split(" ", 1)[0] in _UNAVAILABLE_CODES


class OutageLog:
    """Logs Redis outages, not every request they refuse: an outage's first error, then one line
    per OUTAGE_LOG_INTERVAL_S while it lasts (counting the errors not logged), and its end once
    Redis answers OUTAGE_QUIET_S after the last failure. Times are monotonic seconds."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger
        self.logged_at: float | None = None  # None: no outage under way
        self.failed_at = 0.0
        self.unlogged = 0

    def failed(self, error: Exception, now_s: float) -> None:
        self.failed_at = now_s
        if self.logged_at is not None and now_s - self.logged_at < OUTAGE_LOG_INTERVAL_S:
            self.unlogged += 1
            return
        since = f" ({self.unlogged} more errors since the last line)" if self.unlogged else ""
        self.logger.warning("the job queue is unavailable, answering 503%s: %s", since, error)
        self.logged_at, self.unlogged = now_s, 0

    def answered(self, now_s: float) -> None:
        if self.logged_at is not None and now_s - self.failed_at >= OUTAGE_QUIET_S:
            self.logger.info("the job queue answers again")
            self.logged_at, self.unlogged = None, 0


class QueueUnavailable(Exception):
    """Redis is unreachable, timing out, loading, refusing our credentials, read-only, out of
    memory, failing to persist or busy. The message carries redis-py's text, for logs only: it
    may name hosts and ports, so it is not for clients."""


class BacklogFull(Exception):
    """The stream holds `--max-backlog` jobs already; nothing was enqueued."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused with another request, or whose job has expired away."""


@dataclass(frozen=True)
class Job:
    """One job as its hash stands. Times are Unix seconds; `result` is the list of
    {b64_json, seed} of a done job, `error` the worker's message of a failed one."""

    id: str
    status: str
    request: str
    created_at: float
    deadline: float
    attempts: int
    started_at: float | None = None
    finished_at: float | None = None
    result: list[dict[str, Any]] | None = None
    error: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[str, Any]) -> Job:
        def seconds(name: str) -> float | None:
            return float(fields[name]) if fields.get(name) else None

        return cls(
            id=job_id,
            status=fields["status"],
            request=fields.get("request", ""),
            created_at=float(fields["created_at"]),
            deadline=float(fields["deadline"]),
            attempts=int(fields.get("attempts", 0)),
            started_at=seconds("started_at"),
            finished_at=seconds("finished_at"),
            result=fields.get("result"),
            error=fields.get("error"),
        )


@dataclass(frozen=True)
class Enqueued:
    job: Job
    created: bool  # False: the Idempotency-Key's existing job


class JobQueue:
    """The gateway's side of one queue (`contract.jobqueue`): `client` is a
    `redis.asyncio.Redis`, `clock` gives Unix seconds. Every method raises QueueUnavailable
    when Redis cannot answer."""

    def __init__(self, client: aioredis.Redis, config: GatewayConfig, clock: Callable[[], float] = time.time):
        self.keys: QueueKeys = config.keys
        self.config = config
        self.group_ready = False
        self._client = client
        self._clock = clock
        self._enqueue = client.register_script(ENQUEUE)
        self._cancel = client.register_script(CANCEL)
        self.outages = OutageLog()

    @classmethod
    def connect(cls, config: GatewayConfig) -> JobQueue:
        """A queue on a new client; connects lazily, so Redis need not be up yet. No retries
        inside the client: a refused connection answers at once, and an enqueue that timed out
        is never sent twice."""
        client = aioredis.Redis.from_url(
            config.redis_url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0), **config.redis_access.client_options(),
        )
        return cls(client, config)

    async def close(self) -> None:
        await self._client.aclose()

    @contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """Turns a "not now" from Redis into QueueUnavailable, logged through `outages` rather
        than per request; other Redis errors propagate."""
        try:
            yield
        except Exception as error:
            if not means_unavailable(error):
                raise
            unavailable = QueueUnavailable(f"Redis did not answer {what} ({type(error).__name__}: {error})")
            self.outages.failed(unavailable, time.monotonic())
            raise unavailable from error
        self.outages.answered(time.monotonic())

    async def ensure_group(self) -> None:
        """Creates the consumer group at the stream's start (and the stream), as workers do;
        an existing group is left as it is."""
        with self._answering("XGROUP CREATE"):
            try:
                await self._client.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self.group_ready = True

    async def ping(self) -> None:
        """Returns when Redis answers PING (and the group exists, created now if need be)."""
        with self._answering("PING"):
            await self._client.ping()
        if not self.group_ready:
            await self.ensure_group()

    async def backlog(self) -> int:
        """Jobs waiting or in a worker's hands (`contract.jobqueue.backlog`)."""
        with self._answering("XLEN"):
            return await backlog(self._client, self.keys)

    async def enqueue(self, request_json: str, idempotency_key: str | None) -> Enqueued:
        """Adds a job for `request_json` (a GenerationRequest as JSON) whose deadline is now plus
        the request timeout, or returns the job `idempotency_key` made already. Raises
        BacklogFull, IdempotencyConflict (the key's job had another request, or is gone) and
        QueueUnavailable; after a QueueUnavailable the job may or may not be in the queue, which
        is what the key is for."""
        job_id, now = secrets.token_urlsafe(16), self._clock()
        deadline = now + self.config.request_timeout_s
        keys = [self.keys.job(job_id), self.keys.stream,
                self.keys.idempotency(idempotency_key) if idempotency_key else self.keys.job(job_id)]
        args = [job_id, request_json, f"{now:.6f}", f"{deadline:.6f}",
                self.config.idempotency_ttl_s if idempotency_key else 0, self.config.max_backlog]
        with self._answering("ENQUEUE"):
            found, outcome = await self._enqueue(keys=keys, args=args)
        if outcome == -1:
            raise BacklogFull(f"the queue holds {self.config.max_backlog} jobs already (--max-backlog)")
        found = found.decode() if isinstance(found, bytes) else found
        if outcome == 1:
            return Enqueued(Job(job_id, "queued", request_json, now, deadline, 0), created=True)
        job = await self.get(found)
        # The messages never name the key's job: its id is the capability to read and cancel
        # it, and whoever reuses a key need not be whoever made it.
        if job is None:
            raise IdempotencyConflict("this key's job has ended and its record has expired; "
                                      "a new key makes a new job")
        if job.request != request_json:
            raise IdempotencyConflict("this key was used for a different request body; "
                                      "a retry must send the same body, a new request a new key")
        return Enqueued(job, created=False)

    async def get(self, job_id: str) -> Job | None:
        """The job as it stands, or None when there is no such job (never was, or expired)."""
        if not JOB_ID.match(job_id):
            return None
        with self._answering("HGETALL"):
            fields = await self._client.hgetall(self.keys.job(job_id))
        return Job.from_hash(job_id, decode(fields)) if fields else None

    async def cancel(self, job_id: str) -> str | None:
        """Cancels a queued or running job; returns its status before (a final one is left as
        it was), or None when there is no such job."""
        if not JOB_ID.match(job_id):
            return None
        with self._answering("CANCEL"):
            before = await self._cancel(keys=[self.keys.job(job_id), self.keys.done(job_id)],
                                        args=[f"{self._clock():.6f}", self.config.result_ttl_s])
        before = before.decode() if isinstance(before, bytes) else before
        return before or None

    async def wait(self, job_id: str, until: float) -> Job | None:
        """The job once it has ended, or as it stands at `until` (Unix seconds); None when its
        hash is gone. Blocks on the job's done list in slices, re-reading the hash between
        them: waiters sharing a job (one Idempotency-Key) race for one token, and the losers
        see the status. A Redis outage inside the wait is ridden out until `until`, then
        raises QueueUnavailable."""
        while True:
            try:
                job = await self.get(job_id)
                if job is None or job.ended or self._clock() >= until:
                    return job
                slice_s = max(0.01, min(WAIT_SLICE_S, until - self._clock()))
                with self._answering("BLPOP"):
                    await self._client.blpop([self.keys.done(job_id)], timeout=round(slice_s, 3))
            except QueueUnavailable:
                if self._clock() >= until:
                    raise
                await asyncio.sleep(WAIT_SLICE_S)
