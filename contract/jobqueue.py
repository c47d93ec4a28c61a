"""The job queue's protocol on Redis Streams, written once for its three users: the gateway
enqueues, pull-mode workers consume, the scaler reads the backlog.

Keys, for a queue whose stream is `S` (one stream per scale target; `QueueKeys`):

| key | type | what |
| --- | --- | --- |
| `S` | stream | one entry per job, field `job` = the job id; consumer group `workers` |
| `S:job:<id>` | hash | the job: `status`, `request` (the GenerationRequest as JSON), `created_at`, `deadline` (Unix seconds), `attempts`, `consumer`, `started_at`, `finished_at`, `completions` (FINISH writes: 1 once ended, never more), and `result` (JSON list of {b64_json, seed}) or `error` |
| `S:done:<id>` | list | one token pushed when the job ends, for a waiting client's BLPOP; expires |
| `S:idem:<sha256 of key>` | string | the job id an Idempotency-Key made |
| `S:dead` | stream | dead-lettered jobs: `job`, `error`, `attempts`, for operators |

A job's status moves queued -> running -> one of FINAL, and a final status is never
overwritten: `FINISH` writes only over queued or running, acknowledges the stream entry in the
same script, and deletes the acknowledged entry, so storing a result and acknowledging it are
one step and a job computed twice (a reclaim racing a slow worker) still ends once. Finished
jobs' hashes expire after the result TTL.

Backlog (what the scaler scales on): entries not yet delivered to the group plus entries
delivered and not acknowledged, as KEDA's redis-streams scaler counts them. Because FINISH
deletes each entry as it acknowledges it, that is the stream's length (`XLEN`), exact and
O(1), with no reliance on XINFO's `lag` (nil in Redis 7.0 once entries are deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, EXPIRED, CANCELLED = "queued", "running", "done", "failed", "expired", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, EXPIRED, CANCELLED)
FINAL = (DONE, FAILED, EXPIRED, CANCELLED)

DEFAULT_STREAM = "diffusion:jobs"
DEFAULT_GROUP = "workers"
JOB_FIELD = "job"  # the stream entry's one field: the job id


@dataclass(frozen=True)
class QueueKeys:
    """The Redis keys of one queue (see the module's table)."""

    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP

    def __post_init__(self) -> None:
        for what, value in (("stream", self.stream), ("group", self.group)):
            if not value or any(c.isspace() for c in value) or len(value) > 200:
                raise ValueError(f"the queue's {what} name must be 1 to 200 characters without spaces, not {value!r}")

    def job(self, job_id: str) -> str:
        return f"{self.stream}:job:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.stream}:done:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.stream}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def dead(self) -> str:
        return f"{self.stream}:dead"


# KEYS: job hash, stream, idempotency key (or the job hash again when there is none)
# ARGV: job id, request JSON, created_at, deadline, idempotency TTL s (0: no key), max backlog (0: unbounded)
# Returns {job id, 1 created | 0 the idempotency key's existing job | -1 backlog full}
ENQUEUE = """
if ARGV[5] ~= '0' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
end
if ARGV[6] ~= '0' and redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[6]) then return {ARGV[1], -1} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'request', ARGV[2], 'created_at', ARGV[3],
           'deadline', ARGV[4], 'attempts', 0)
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[4])) + 86400)
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
if ARGV[5] ~= '0' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[5]) end
return {ARGV[1], 1}
"""

# KEYS: job hash
# ARGV: consumer, now, max deliveries
# Returns {verdict, attempts}: 'run' (now running), 'final:<status>' (ended already: acknowledge
# and drop), 'expired' (past its deadline), 'dead' (delivered more than max times), 'missing'
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if status ~= 'queued' and status ~= 'running' then return {'final:' .. status, attempts} end
if tonumber(redis.call('HGET', KEYS[1], 'deadline')) < tonumber(ARGV[2]) then return {'expired', attempts} end
if attempts > tonumber(ARGV[3]) then return {'dead', attempts} end
redis.call('HSET', KEYS[1], 'status', 'running', 'consumer', ARGV[1], 'started_at', ARGV[2])
return {'run', attempts}
"""

# KEYS: job hash, stream, done list
# ARGV: group, stream entry id, status, payload field ('result' or 'error'), payload, now, result TTL s
# Returns 1 when this call ended the job, 0 when it had ended already (the entry is acknowledged either way)
FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
local wrote = 0
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], ARGV[4], ARGV[5], 'finished_at', ARGV[6])
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], 60)
  wrote = 1
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
return wrote
"""

# KEYS: job hash, done list
# ARGV: now, result TTL s
# Returns the status before: a queued or running job becomes cancelled (its worker drops it);
# a final one is left as it was; '' when there is no such job
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('RPUSH', KEYS[2], 'cancelled')
  redis.call('EXPIRE', KEYS[2], 60)
end
return status
"""


def password_from(env_var: str, file: str | None) -> str | None:
    """A Redis password from a file (a mounted Secret) or else an environment variable; never
    from metadata or flags' values. Raises OSError when the file cannot be read."""
    if file:
        return Path(file).read_text().strip()
    return os.environ.get(env_var) or None


def decode(job: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """A job hash from HGETALL as text, with `result` parsed from JSON."""
    text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in job.items()}
    if "result" in text:
        text["result"] = json.loads(text["result"])
    return text


async def backlog(client: Any, keys: QueueKeys) -> int:
    """Jobs waiting or in hand: the stream's length. Every entry is acknowledged and deleted in
    one script (FINISH), so the entries left are exactly those not yet delivered to the group
    plus those delivered and not acknowledged, what KEDA's redis-streams scaler sums. A stream
    that does not exist has 0 (nothing was ever enqueued, or all of it ended). `client` is a
    `redis.asyncio.Redis`; its errors propagate."""
    return int(await client.xlen(keys.stream))
