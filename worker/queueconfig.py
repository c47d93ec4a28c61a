"""Pull mode's settings (`QueueConfig`): where jobs are read, and the delivery rules.

Apart from the consumer (worker/queue.py) so that parsing flags imports no Redis client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract import jobqueue
from contract.redisaccess import RedisAccess


@dataclass(frozen=True)
class QueueConfig:
    """Where pull mode reads jobs, and its delivery rules; parsed once from flags."""

    url: str  # redis://host:port/db (or rediss://, unix://), never with a password in it
    stream: str = jobqueue.DEFAULT_STREAM
    group: str = jobqueue.DEFAULT_GROUP
    claim_idle_s: float = 60.0  # a pending entry idle this long belongs to a dead consumer
    max_deliveries: int = 3  # deliveries of one job before it is dead-lettered
    result_ttl_s: int = 3600  # how long a finished job's hash (and result) is kept
    access: RedisAccess = field(default_factory=RedisAccess)  # ACL user, password and TLS files
    block_s: float = 1.0  # how long one XREADGROUP waits for new entries
    status_check_s: float = 1.0  # how often the statuses of the jobs in hand are read (cancels)

    def __post_init__(self) -> None:
        problem = jobqueue.redis_url_problem(self.url)
        if problem == jobqueue.CARRIES_PASSWORD:
            raise ValueError("--queue carries a password; give it with --redis-password-file or "
                             "WORKER_REDIS_PASSWORD instead, so it is never in the process list or the pod spec")
        if problem is not None:
            raise ValueError(f"--queue {problem}")
        self.access.check_url(self.url, "--queue")
        if not self.claim_idle_s > 0:
            raise ValueError(f"--claim-idle must be above 0 seconds, got {self.claim_idle_s}")
        for value, flag in ((self.max_deliveries, "--max-deliveries"), (self.result_ttl_s, "--result-ttl")):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        jobqueue.QueueKeys(self.stream, self.group)  # validates the names

    @property
    def keys(self) -> jobqueue.QueueKeys:
        return jobqueue.QueueKeys(self.stream, self.group)
