"""The gateway's settings, parsed once: where the queue lives and how long things may take."""

from __future__ import annotations

from dataclasses import dataclass, field

from contract import jobqueue
from contract.apikey import ApiKeys
from contract.jobqueue import DEFAULT_GROUP, DEFAULT_STREAM, QueueKeys
from contract.redisaccess import RedisAccess
from contract.schema import MAX_SIDE, MIN_SIDE


@dataclass(frozen=True)
class GatewayConfig:
    """Every setting of one gateway process; `validate` names the flag of a bad value.

    Times are seconds. `request_timeout_s` is both a job's lifetime (its deadline is its
    enqueue time plus this) and the longest the synchronous API waits. `max_image_side` is in
    pixels. `redis_access` is how the queue's client authenticates and checks TLS; `api_keys`,
    when given, are the keys the HTTP API requires (they may change as their file does).
    """

    host: str = "0.0.0.0"
    port: int = 8080
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_access: RedisAccess = field(default_factory=RedisAccess)  # ACL user, password (never in the URL), TLS
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    request_timeout_s: float = 300.0
    result_ttl_s: int = 3600
    max_backlog: int = 1000
    idempotency_ttl_s: int = 86400
    # The workers' --max-image-side default; set both flags alike, or a size the gateway accepts
    # is enqueued and then fails on the worker.
    max_image_side: int = 1024
    access_log: bool = False
    api_keys: ApiKeys | None = field(default=None, repr=False, compare=False)  # None: the API needs no key

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the flag when a value is out of bounds."""
        check_redis_url(self.redis_url)
        self.redis_access.check_url(self.redis_url, "--redis-url")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0 to 65535, not {self.port}")
        for flag, value in (("--request-timeout", self.request_timeout_s), ("--result-ttl", self.result_ttl_s),
                            ("--max-backlog", self.max_backlog), ("--idempotency-ttl", self.idempotency_ttl_s)):
            if not value > 0:
                raise ValueError(f"{flag} must be above 0, not {value}")
        if not MIN_SIDE <= self.max_image_side <= MAX_SIDE:
            raise ValueError(f"--max-image-side must be {MIN_SIDE} to {MAX_SIDE} pixels (the API's bounds), "
                             f"not {self.max_image_side}")
        for flag, value in (("--stream", self.stream), ("--group", self.group)):
            try:
                QueueKeys(stream=value) if flag == "--stream" else QueueKeys(group=value)
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None

    @property
    def keys(self) -> QueueKeys:
        return QueueKeys(stream=self.stream, group=self.group)


def check_redis_url(url: str) -> None:
    """Raises ValueError for a URL redis-py cannot use or one that carries a password
    (`contract.jobqueue.redis_url_problem`)."""
    problem = jobqueue.redis_url_problem(url)
    if problem == jobqueue.CARRIES_PASSWORD:
        raise ValueError("--redis-url carries a password; give it with --redis-password-file "
                         "(env GATEWAY_REDIS_PASSWORD_FILE) or the GATEWAY_REDIS_PASSWORD variable")
    if problem is not None:
        raise ValueError(f"--redis-url {problem}")
