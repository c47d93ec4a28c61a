"""The job queue's protocol on Redis Streams, written once for its three users: the gateway
enqueues, pull-mode workers consume, the scaler reads the backlog.

Keys, for a queue whose stream is `S` (one stream per scale target; `QueueKeys`):

| key | type | what |
| --- | --- | --- |
| `S` | stream | one entry per job, fields `job` = the job id and `images` = its request's `n` (1 when absent); consumer group `workers` |
| `S:job:<id>` | hash | the job: `status`, `request` (the GenerationRequest as JSON), `created_at`, `deadline` (Unix seconds), `attempts` (deliveries), `delivery` (the last one's token), `consumer`, `started_at`, `computed_at` (its first image began computing), `finished_at`, `completions` (FINISH writes: 1 once ended, never more), and `result` (JSON list of {b64_json, seed}) or `error` |
| `S:done:<id>` | list | one token pushed when the job ends, for a waiting client's BLPOP; expires |
| `S:idem:<sha256 of key>` | string | the job id an Idempotency-Key made |
| `S:dead` | stream | dead-lettered jobs: `job`, `error`, `attempts`, for operators |

A job's status moves queued -> running -> one of FINAL, and a final status is never
overwritten: `FINISH` writes only over queued or running, acknowledges the stream entry in the
same script, and deletes the acknowledged entry, so storing a result and acknowledging it are
one step and a job computed twice (a reclaim racing a slow worker) still ends once. Finished
jobs' hashes expire after the result TTL.

Redis must keep what it acknowledged: `maxmemory-policy noeviction` (an evicted job hash is a
lost job; a worker dead-letters an entry whose hash is gone) and the append-only file with
`appendfsync always` (no accepted job lost when the server crashes).

Backlog (what the scaler scales on): entries not yet delivered to the group plus entries
delivered and not acknowledged, as KEDA's redis-streams scaler counts them. Because FINISH
deletes each entry as it acknowledges it, that is the stream's length (`XLEN`), exact and
O(1), with no reliance on XINFO's `lag` (nil in Redis 7.0 once entries are deleted).
"""

from __future__ import annotations

import hashlib
import re
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, EXPIRED, CANCELLED = "queued", "running", "done", "failed", "expired", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, EXPIRED, CANCELLED)
FINAL = (DONE, FAILED, EXPIRED, CANCELLED)

DEFAULT_STREAM = "diffusion:jobs"
# A stream of a Kubernetes namespace's: `diffusion:<namespace>:<name>` (the manifests name the
# gateway's and workers' stream `diffusion:ml:sd-worker`). The scaler reads a ScaledObject's
# own namespace's streams only (adapter/access.py); the local default above belongs to none.
STREAM_PREFIX = "diffusion"
_NAMESPACED_STREAM = re.compile(r"^diffusion:([a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?):(.+)$")
DEFAULT_GROUP = "workers"
JOB_FIELD = "job"  # the stream entry's field for the job id
IMAGES_FIELD = "images"  # the stream entry's field for the request's image count


def entry_images(fields: dict[str, str]) -> int:
    """What a stream entry's job takes of a batch: its `images` field, 1 when absent or not a
    count (an entry written before the field existed)."""
    try:
        return max(1, int(fields.get(IMAGES_FIELD, 1)))
    except ValueError:
        return 1


def namespaced_stream(namespace: str, name: str) -> str:
    """The stream `name` of `namespace`: `diffusion:<namespace>:<name>`."""
    return f"{STREAM_PREFIX}:{namespace}:{name}"


def stream_namespace(stream: str) -> str | None:
    """The namespace a stream belongs to (`diffusion:<namespace>:<name>`, the namespace a DNS
    label as Kubernetes names them), or None for a stream of no namespace."""
    found = _NAMESPACED_STREAM.match(stream)
    return found.group(1) if found else None


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
# The entry carries the request's image count (`n`, read from the JSON here so that no caller can
# get it wrong), so a worker knows what a job takes of its batches before it reads the job.
ENQUEUE = """
if ARGV[5] ~= '0' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
end
if ARGV[6] ~= '0' and redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[6]) then return {ARGV[1], -1} end
local images = 1
local parsed, request = pcall(cjson.decode, ARGV[2])
if parsed and type(request) == 'table' and type(request.n) == 'number' and request.n >= 1
   and request.n == math.floor(request.n) then images = request.n end
redis.call('HSET', KEYS[1], 'status', 'queued', 'request', ARGV[2], 'created_at', ARGV[3],
           'deadline', ARGV[4], 'attempts', 0)
redis.call('EXPIREAT', KEYS[1], math.ceil(tonumber(ARGV[4])) + 86400)
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'images', string.format('%d', images))
if ARGV[5] ~= '0' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[5]) end
return {ARGV[1], 1}
"""

# KEYS: job hash
# ARGV: consumer, now, max deliveries[, delivery token (default: the consumer)]
# Returns {verdict, attempts}: 'run' (now running), 'final:<status>' (ended already: acknowledge
# and drop), 'expired' (past its deadline), 'dead' (delivered more than max times), 'missing'
# A delivery counts one attempt however often START runs for it: a caller that retries START
# after a lost reply (Redis died after running it) passes the same token, and a job is not
# dead-lettered for Redis's blips. A reclaim, by another consumer or by the same one, is a new
# delivery with a new token.
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0
if status ~= 'queued' and status ~= 'running' then return {'final:' .. status, attempts} end
local delivery = (ARGV[4] and ARGV[4] ~= '') and ARGV[4] or ARGV[1]
if redis.call('HGET', KEYS[1], 'delivery') ~= delivery then
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'delivery', delivery)
end
if tonumber(redis.call('HGET', KEYS[1], 'deadline')) < tonumber(ARGV[2]) then return {'expired', attempts} end
if attempts > tonumber(ARGV[3]) then return {'dead', attempts} end
redis.call('HSET', KEYS[1], 'status', 'running', 'consumer', ARGV[1], 'started_at', ARGV[2])
return {'run', attempts}
"""

# KEYS: job hash, stream, done list[, dead-letter stream]
# ARGV: group, stream entry id, status, payload field ('result' or 'error'), payload, now, result TTL s
#       [, computed_at ('' for none)[, job id, attempts, dead letters kept (the stream's approximate MAXLEN)]]
# Returns 1 when this call ended the job, 0 when it had ended already (the entry is acknowledged either way)
# With the dead-letter stream, an entry (`job`, `error` = the payload, `attempts`) is added in the
# same step when this call ended the job, or when the job's hash is gone and this call
# acknowledged its entry: never for a job another worker ended, never twice for a retried call.
FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
local wrote = 0
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], ARGV[4], ARGV[5], 'finished_at', ARGV[6])
  if ARGV[8] and ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'computed_at', ARGV[8]) end
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], 60)
  wrote = 1
end
local acked = 0
if ARGV[2] ~= '' then
  acked = redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
if KEYS[4] and (wrote == 1 or (not status and acked == 1)) then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'job', ARGV[9], 'error', ARGV[5], 'attempts', ARGV[10])
end
return wrote
"""

# KEYS: stream
# ARGV: group, consumer, stream entry ids...
# Returns the entries still pending on this consumer, whose idle time it reset (XCLAIM JUSTID: not a
# delivery). An entry another consumer has claimed meanwhile is left to that one.
HEARTBEAT = """
local kept = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if entry[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
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


REDIS_SCHEMES = ("redis", "rediss", "unix")
CARRIES_PASSWORD = "carries a password"  # redis_url_problem's answer for credentials in the URL


def redis_url_problem(url: str, schemes: tuple[str, ...] = REDIS_SCHEMES) -> str | None:
    """Why `url` cannot name this project's Redis, as words to follow the flag or key's name;
    None when it can. Credentials are refused wherever they sit: in the user info, or as
    `password=` / `username=` in the query, which redis-py's `from_url` also reads. A password
    in a URL ends up in process listings, pod specs, ScaledObjects and logs; it comes from a
    file or an environment variable instead (`password_from`). TLS options (`ssl_*`) in the
    query are refused too: redis-py would let them override the client's checks."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not a valid URL (look at its port)"
    query = parse_qs(parts.query)
    if "@" in parts.netloc or "password" in query or "username" in query:
        return CARRIES_PASSWORD
    tls_options = sorted(name for name in query if name.startswith("ssl_"))
    if tls_options:
        # redis-py lets a URL's query override the client's own settings: `ssl_cert_reqs=none`
        # would turn certificate checking off without a word.
        return f"sets TLS options in its query ({', '.join(tls_options)}); they are not taken from a URL"
    if parts.scheme not in schemes:
        return f"must start with {', '.join(s + '://' for s in schemes)}, not {parts.scheme or '(no scheme)'}://"
    if parts.scheme != "unix" and not parts.hostname:
        return "names no host"
    return None


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
