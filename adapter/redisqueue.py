"""The queue signal read where the queue lives: a Redis stream's backlog (`redisAddress`).

The backlog is `contract.jobqueue.backlog`: the stream's length, which is the entries not yet
delivered to the workers' group plus those delivered and not acknowledged (the workers
acknowledge and delete in one step), as KEDA's redis-streams scaler counts them. It exists
with no worker running, so the scaler can answer IsActive at zero replicas.

Every outcome is a number or an error, never "no series". A stream that exists and is empty is
a real 0. A stream that does not exist is a failed read: the gateway and the workers create it
(with their consumer group) when they start, and XDEL never deletes the key, so its absence
means the trigger names another stream or db than the gateway, or Redis lost its data; reading
it as 0 would hold the fleet at zero while the gateway's clients time out. Redis unreachable,
timing out, refusing the password, or holding another type under the stream's name fail alike,
and the caller keeps its last good value until it is stale.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeout

from adapter.access import AccessRules, Endpoint, check_resolved, excerpt
from adapter.config import ScalerSpec
from adapter.reading import QueryOutcome, Reading, outcome, to_reading
from contract.names import QUEUE
from contract.redisaccess import RedisAccess


class SignalSource(Protocol):
    """Prometheus or the direct scrapes (`adapter.directscrape.SignalRouter`)."""

    async def read(self, spec: ScalerSpec) -> Reading: ...


async def stream_backlog(client: aioredis.Redis, stream: str) -> int | None:
    """`contract.jobqueue.backlog` (the stream's length, in jobs) and whether the stream exists,
    in one round trip and one transaction: None when it does not exist (XLEN reads 0 for a
    missing key). Redis's errors propagate, WRONGTYPE included, unwrapped."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.exists(stream)
        pipe.xlen(stream)
        # Not raise_on_error: redis-py would prefix an error with "Command # 2 (XLEN ...) of pipeline".
        answers = await pipe.execute(raise_on_error=False)
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer
    exists, length = answers
    return int(length) if exists else None


class RedisBacklog:
    """Reads streams' backlogs: one `redis.asyncio` client (a connection pool) per distinct
    address and query timeout, shared by every ScaledObject that names it.

    `access` (the scaler's --redis-username, --redis-password-file or SCALER_REDIS_PASSWORD, and
    its TLS files; the default: no AUTH, the system's CAs) is used only for `rules.redis_address`,
    the operator's Redis (same scheme, host and port); any other address a ScaledObject names is
    read as the default user with no client certificate, its server checked against the
    system's CAs, and its host name is refused when it resolves into `rules.denied_networks`
    (checked before a client is made, and again every `recheck_s`). A client no read has used
    for `idle_close_s` is closed when another is created, so addresses of forgotten
    ScaledObjects do not hold connections for ever. Raises ValueError when credentials are set
    without `rules.redis_address`.
    """

    def __init__(self, access: RedisAccess = RedisAccess(), *, rules: AccessRules = AccessRules(),
                 idle_close_s: float = 900.0, recheck_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if (access.password or access.username or access.cert_file) and not rules.redis_address:
            raise ValueError("Redis credentials are set but --redis-address (SCALER_REDIS_ADDRESS) is not: the scaler "
                             "sends them only to the Redis the operator configures, never to one a ScaledObject names")
        self._access = access
        self._rules = rules
        self._idle_close_s = idle_close_s
        self._recheck_s = recheck_s
        self._clock = clock
        self._clients: dict[tuple[str, float], aioredis.Redis] = {}
        self._used_at: dict[tuple[str, float], float] = {}
        self._checked_at: dict[str, float] = {}

    async def _check_host(self, address: str) -> None:
        """Raises access.Denied when a ScaledObject's Redis host resolves into a denied network."""
        if self._rules.redis_credentials(address):
            return  # the operator's own
        host = Endpoint.of(address).host
        now = self._clock()
        if now - self._checked_at.get(host, -float("inf")) < self._recheck_s:
            return
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        check_resolved(host, (info[4][0] for info in infos), self._rules.denied_networks)
        self._checked_at[host] = now

    async def _client(self, address: str, timeout_s: float) -> aioredis.Redis:
        await self._check_host(address)
        key = (address, timeout_s)
        self._used_at[key] = self._clock()
        client = self._clients.get(key)
        if client is None:
            # redis-py's default retries three times with up to 10 s of backoff, far past the
            # query timeout. No retry: the next refresh is the retry, and the last good value is
            # served meanwhile. (The pool itself replaces a connection a Redis restart broke.)
            options = self._access.client_options() if self._rules.redis_credentials(address) else {}
            client = self._clients[key] = aioredis.Redis.from_url(
                address, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                **options,
            )
            await self._close_idle()  # after registering: a read starting meanwhile finds this client
        return client

    async def _close_idle(self) -> None:
        now = self._clock()
        idle = [key for key, used_at in self._used_at.items() if now - used_at > self._idle_close_s]
        for key in idle:
            del self._used_at[key]
        closing = [self._clients.pop(key) for key in idle]
        for client in closing:  # taken out before the first await: no two reads close one client
            await client.aclose()

    async def read(self, spec: ScalerSpec) -> QueryOutcome:
        """The queue outcome of `spec`'s stream (spec.redis_address must be set): its backlog in
        jobs, or an error naming the address, the stream and why, within queryTimeoutSeconds."""
        assert spec.redis_address is not None
        where = f"Redis at {spec.redis_address}, stream {spec.stream!r}"
        started = self._clock()
        try:
            # The socket timeouts bound each exchange; this bounds the host's check, connect, AUTH
            # and the read together.
            async with asyncio.timeout(spec.query_timeout_s):
                client = await self._client(spec.redis_address, spec.query_timeout_s)
                jobs = await stream_backlog(client, spec.stream)
        except (TimeoutError, RedisTimeout):
            error = f"no answer within {spec.query_timeout_s:g}s"
        except Exception as e:  # refused, AUTH, WRONGTYPE, and a bug alike: a failed read, never 0
            error = f"{type(e).__name__}: {excerpt(e, 300)}"
        else:
            if jobs is not None:
                return outcome(QUEUE, float(jobs), self._clock() - started)
            error = (f"no such stream. Is `stream` the gateway's --stream, and the db in redisAddress the one in its "
                     "--redis-url? The gateway and the workers create the stream when they start and nothing "
                     "deletes it, so a missing stream is a misconfiguration or lost data, not an empty queue")
        return QueryOutcome(QUEUE, self._clock() - started, error=f"{where}: {error}")

    async def close(self) -> None:
        """Closes every client's connections (the scaler's shutdown)."""
        clients, self._clients = list(self._clients.values()), {}
        self._used_at.clear()
        for client in clients:
            await client.aclose()


class QueueFromRedis:
    """The scaler's reader: a spec with `redis_address` takes its queue from Redis and the rest
    from `others`, the two reads side by side so Redis adds no latency; any other spec is
    `others`' alone. The reading keeps each source's outcomes, so errors name the source."""

    def __init__(self, others: SignalSource, queue: RedisBacklog):
        self.others = others
        self.queue = queue

    async def read(self, spec: ScalerSpec) -> Reading:
        if spec.redis_address is None:
            return await self.others.read(spec)
        rest, queue = await asyncio.gather(self.others.read(spec), self.queue.read(spec))
        return to_reading((queue, *rest.outcomes), rest.requests)
