"""`python -m gateway`: the front door that holds generation requests on the Redis job queue."""

from __future__ import annotations

import argparse
import sys
import time

from contract.apikey import add_api_key_flag, api_keys_from
from contract.cli import LOG_LEVELS, Environment, configure_logging, positive_float, positive_int
from contract.redisaccess import add_redis_flags, redis_access_from

from .config import GatewayConfig, check_redis_url

ENV = Environment("GATEWAY_")
_DEFAULTS = GatewayConfig()  # each flag's default is written once, in GatewayConfig


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {value}")
    return value


def redis_url(text: str) -> str:
    """argparse type: a redis://, rediss:// or unix:// URL without a password."""
    try:
        check_redis_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--redis-url ")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=(
            "The gateway in front of pull-mode diffusion workers. Serves POST /v1/images/generations (the "
            "worker's OpenAI-shaped API: enqueues the request on a Redis stream and waits for its result), "
            "the asynchronous jobs API (POST /v1/jobs, GET and DELETE /v1/jobs/{id}), /healthz, /readyz "
            "(Redis answers) and /metrics. Requests wait in the queue while no worker exists, so the workers "
            "can scale to zero. With --api-key-file every route but /healthz, /readyz and /metrics needs "
            "Authorization: Bearer <key>. Every flag can also be set through the environment variable shown with it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=ENV.get("HOST", _DEFAULTS.host), help="address to bind (env GATEWAY_HOST)")
    add("--port", type=port_number, default=ENV.get("PORT", str(_DEFAULTS.port)), help="HTTP port (env GATEWAY_PORT)")
    add("--redis-url", type=redis_url, default=ENV.get("REDIS_URL", _DEFAULTS.redis_url),
        help="the Redis holding the queue, without a password; rediss:// for TLS (env GATEWAY_REDIS_URL)")
    add_redis_flags(add, ENV)
    add("--stream", default=ENV.get("STREAM", _DEFAULTS.stream),
        help="the queue's stream: the scale target's, the workers' and the scaler's (env GATEWAY_STREAM)")
    add("--group", default=ENV.get("GROUP", _DEFAULTS.group),
        help="the workers' consumer group, created at start if missing (env GATEWAY_GROUP)")
    add("--request-timeout", type=positive_float, default=ENV.get("REQUEST_TIMEOUT", f"{_DEFAULTS.request_timeout_s:g}"),
        help="seconds: a job's deadline is its enqueue time plus this (not started by then, it is not computed), "
        "and the synchronous API answers 504 after this long, leaving a running job to finish for GET /v1/jobs/{id} "
        "(env GATEWAY_REQUEST_TIMEOUT)")
    add("--result-ttl", type=positive_int, default=ENV.get("RESULT_TTL", str(_DEFAULTS.result_ttl_s)),
        help="seconds a cancelled job's record is kept for GET /v1/jobs/{id}; the workers' own flag sets it for "
        "the jobs they end (env GATEWAY_RESULT_TTL)")
    add("--max-backlog", type=positive_int, default=ENV.get("MAX_BACKLOG", str(_DEFAULTS.max_backlog)),
        help="jobs in the stream at most; beyond it requests get 429 with Retry-After (env GATEWAY_MAX_BACKLOG)")
    add("--idempotency-ttl", type=positive_int, default=ENV.get("IDEMPOTENCY_TTL", str(_DEFAULTS.idempotency_ttl_s)),
        help="seconds an Idempotency-Key keeps pointing at its job (env GATEWAY_IDEMPOTENCY_TTL)")
    add("--max-image-side", type=positive_int, default=ENV.get("MAX_IMAGE_SIDE", str(_DEFAULTS.max_image_side)),
        help="largest width or height accepted, in pixels; a larger size is refused with 422 (keep it equal to the "
        "workers' --max-image-side) (env GATEWAY_MAX_IMAGE_SIDE)")
    add_api_key_flag(add, ENV)
    add("--access-log", action="store_true", default=ENV.flag("ACCESS_LOG"),
        help="log every HTTP request (env GATEWAY_ACCESS_LOG)")
    add("--log-level", choices=LOG_LEVELS, default=ENV.get("LOG_LEVEL", "info"), help="(env GATEWAY_LOG_LEVEL)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = GatewayConfig(
            host=args.host, port=args.port, redis_url=args.redis_url, redis_access=redis_access_from(args, ENV),
            stream=args.stream, group=args.group, request_timeout_s=args.request_timeout, result_ttl_s=args.result_ttl,
            max_backlog=args.max_backlog, idempotency_ttl_s=args.idempotency_ttl, max_image_side=args.max_image_side,
            access_log=args.access_log, api_keys=api_keys_from(args.api_key_file, ENV, time.monotonic()),
        )
    except ValueError as error:
        parser.error(str(error))
    configure_logging(args.log_level)
    from .server import serve

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
