"""One delivery's course in pull mode: START's verdict, the batcher, FINISH.

`JobHandler` takes one stream entry the consumer (worker/queue.py) pulled or reclaimed: START
decides (run, expired, dead-lettered, ended already, missing); a job to run goes through
`WorkerService.generate`, the path an HTTP request takes, bound to start computing by its
deadline and dropped if it ends elsewhere meanwhile; FINISH stores the outcome, acknowledges the
entry and, for a dead letter, adds it to the dead-letter stream, in one step. A job that runs
counts its image-steps into the worker's demand once, on its first try at the batcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from contract import jobqueue
from contract.schema import GenerationRequest, ImageData

from .api import image_spec
from .queueconfig import QueueConfig
from .service import ClientGone, InvalidRequest, NotStarted, Rejected, RequestFailed, WorkerService

log = logging.getLogger("worker.queue")

T = TypeVar("T")
DEAD_LETTERS_KEPT = 10_000  # the dead-letter stream is trimmed to about this many entries


@dataclass(eq=False)
class Hand:
    """One stream entry in hand: pulled or reclaimed, not yet FINISHed."""

    entry_id: str
    job_id: str
    images: int = 1  # what it takes of a batch: the entry's count, then its request's `n`
    admitted: asyncio.Event = field(default_factory=asyncio.Event)  # set once past the batcher's door
    dropped: asyncio.Event = field(default_factory=asyncio.Event)  # set once it ended elsewhere (cancelled)
    delivery: str = field(default_factory=lambda: secrets.token_hex(4))  # START's token for this delivery
    taken_over: bool = False  # another consumer claimed its entry after this one stalled


class GiveBack(Exception):
    """The job cannot be run here now; its entry stays pending for another consumer to reclaim."""


class Caller(Protocol):
    """The consumer's side: Redis calls retried through outages, and whether it is draining."""

    async def until_done(self, call: Callable[[], Awaitable[T]]) -> T: ...

    @property
    def stopping(self) -> bool: ...


class JobHandler:
    """Takes entries from START to FINISH for one consumer (`name`) of the queue `config`.
    `client` is a `redis.asyncio.Redis` with decode_responses; `clock` gives Unix seconds."""

    def __init__(self, config: QueueConfig, service: WorkerService, client: Any, name: str,
                 clock: Callable[[], float], caller: Caller) -> None:
        self.config = config
        self.keys = config.keys
        self.service = service
        self.client = client
        self.name = name
        self.clock = clock
        self.caller = caller
        self._start, self._finish = map(client.register_script, (jobqueue.START, jobqueue.FINISH))

    async def process(self, hand: Hand) -> str:
        """Runs START's verdict on one delivery to its FINISH; returns the outcome to count
        (JOB_OUTCOMES). Raises GiveBack when the job cannot run here now."""
        # One `now` and one token for every try: a START whose reply was lost is the same delivery.
        args = [self.name, repr(self.clock()), self.config.max_deliveries, f"{self.name}/{hand.delivery}"]
        verdict, attempts = await self.caller.until_done(
            lambda: self._start(keys=[self.keys.job(hand.job_id)], args=args))
        attempts = int(attempts)
        if verdict == "run":
            return await self._run(hand)
        if verdict == "expired":
            return await self._end(hand, jobqueue.EXPIRED, "error", "past its deadline before a worker started it",
                                   "expired")
        if verdict == "dead":
            error = (f"dead-lettered after {attempts} deliveries (more than --max-deliveries "
                     f"{self.config.max_deliveries}): each worker that took it died or gave it back")
            log.error("job %s: %s", hand.job_id, error)
            return await self._end(hand, jobqueue.FAILED, "error", error, "dead_lettered", dead_letter=attempts)
        if verdict.startswith("final:"):
            status = verdict.partition(":")[2]
            await self._ack(hand, status, "")
            return "cancelled" if status == jobqueue.CANCELLED else "duplicate"
        if verdict == "missing":
            error = ("the job's hash is gone (evicted: Redis must run with maxmemory-policy noeviction; "
                     f"expired; or deleted), or its entry has no {jobqueue.JOB_FIELD!r} field")
            log.error("job %r (entry %s): %s; dead-lettered", hand.job_id, hand.entry_id, error)
            await self._ack(hand, jobqueue.FAILED, error, dead_letter=0)
            return "missing"
        raise RuntimeError(f"START answered {verdict!r}, which this worker does not know")

    async def _run(self, hand: Hand) -> str:
        request, deadline = await self.caller.until_done(
            lambda: self.client.hmget(self.keys.job(hand.job_id), ["request", "deadline"]))
        try:
            body = GenerationRequest.model_validate_json(request or "")
        except ValidationError as invalid:
            return await self._end(hand, jobqueue.FAILED, "error", f"invalid request: {describe(invalid)}", "failed")
        hand.images = body.n
        counted = False  # its demand, counted on the first try: waiting out a full batcher is the same job
        while True:
            submitted = self.clock()
            try:
                hand.admitted.set()  # generate queues the job before its first await
                # It must start computing by its deadline; it leaves the batcher once it ended elsewhere.
                generation = await self.service.generate(image_spec(body), hand.dropped.wait,
                                                         start_by_s=float(deadline) - submitted if deadline else None,
                                                         count_demand=not counted)
                break
            except NotStarted:
                return await self._end(hand, jobqueue.EXPIRED, "error",
                                       "past its deadline before its batch started on this worker", "expired")
            except ClientGone:
                return await self._end(hand, jobqueue.CANCELLED, "error", "cancelled while in a worker's hand",
                                       "cancelled")
            except InvalidRequest as invalid:
                return await self._end(hand, jobqueue.FAILED, "error", f"invalid request: {invalid.field}: {invalid}",
                                       "failed")
            except RequestFailed as failed:
                return await self._end(hand, jobqueue.FAILED, "error", str(failed), "failed")
            except Rejected as rejected:
                # 429: requests from the direct API fill the batcher; wait. 503: draining or not loaded.
                if rejected.status != 429 or self.caller.stopping:
                    raise GiveBack(str(rejected)) from None
                counted = True
                await asyncio.sleep(rejected.retry_after_s or 1)
                if deadline and self.clock() > float(deadline):
                    return await self._end(hand, jobqueue.EXPIRED, "error",
                                           "past its deadline while this worker's batcher was full", "expired")
        result = json.dumps([ImageData(b64_json=image.png_b64, seed=image.seed).model_dump()
                             for image in generation.images])
        return await self._end(hand, jobqueue.DONE, "result", result, "done",
                               computed_at=submitted + generation.wait_s)

    async def _end(self, hand: Hand, status: str, payload_field: str, payload: str, outcome: str,
                   computed_at: float | None = None, dead_letter: int | None = None) -> str:
        """FINISHes the job with `status`; `outcome` if this call ended it, else what had ended it."""
        if await self._ack(hand, status, payload, payload_field, computed_at, dead_letter):
            return outcome
        ended = await self.caller.until_done(lambda: self.client.hget(self.keys.job(hand.job_id), "status"))
        return "cancelled" if ended == jobqueue.CANCELLED else "duplicate"

    async def _ack(self, hand: Hand, status: str, payload: str, payload_field: str = "error",
                   computed_at: float | None = None, dead_letter: int | None = None) -> bool:
        """FINISH: stores the outcome over a job not yet ended, acknowledges and deletes the entry,
        retried until Redis answers; True when this call ended the job. `computed_at`: Unix
        seconds its first image began computing. `dead_letter`: its attempts, to add it to the
        dead-letter stream in the same step (see FINISH for when it is written)."""
        keys = self.keys
        job_keys = [keys.job(hand.job_id), keys.stream, keys.done(hand.job_id)]
        args = [keys.group, hand.entry_id, status, payload_field, payload, repr(self.clock()),
                self.config.result_ttl_s, repr(computed_at) if computed_at is not None else ""]
        if dead_letter is not None:
            job_keys.append(keys.dead)
            args += [hand.job_id, dead_letter, DEAD_LETTERS_KEPT]
        wrote = await self.caller.until_done(lambda: self._finish(keys=job_keys, args=args))
        return bool(int(wrote))


def describe(invalid: ValidationError) -> str:
    """A pydantic error as 'field: message; ...', naming each field."""
    return "; ".join(f"{'.'.join(map(str, error['loc'])) or 'request'}: {error['msg']}" for error in invalid.errors())
