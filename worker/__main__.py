"""`python -m worker`: build a random-weight model (`make-model`) or serve one (`serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from contract import jobqueue
from contract.apikey import add_api_key_flag, api_keys_from
from contract.cli import (
    LOG_LEVELS, Environment, configure_logging, non_negative_float, non_negative_int, positive_float, positive_int,
)
from contract.redisaccess import add_redis_flags, redis_access_from

from .compiled import COMPILE_CHOICES, parse_buckets
from .queueconfig import QueueConfig
from .service import WorkerLimits

ENV_PREFIX = "WORKER_"


_LIMITS = WorkerLimits()  # the batching and queue flags' defaults are written once, there
_PULL = QueueConfig(url="redis://localhost")  # the pull-mode flags' defaults are written once, there


def build_parser() -> argparse.ArgumentParser:
    env = Environment(ENV_PREFIX)
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Diffusers inference worker with dynamic batching and honest load metrics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser(
        "make-model",
        help="build a Stable Diffusion pipeline with random weights, offline, and save it",
        description=(
            "Builds a StableDiffusionPipeline with random weights from built-in configs and writes it "
            "with save_pretrained. tiny: a few MB, for tests and CPU demos (64x64 images). sd15: the "
            "SD-1.5 UNet/VAE/CLIP-text shapes, for GPU benchmarks (512x512). No model hub is contacted."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    make.add_argument("directory", type=Path, help="where to write the pipeline")
    make.add_argument("--arch", choices=["tiny", "sd15"], default="tiny", help="architecture")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument("--fp16", action="store_true", help="store weights in float16 (half the disk)")

    serve = commands.add_parser(
        "serve",
        help="serve a diffusers pipeline directory over HTTP",
        description=(
            "Serves POST /v1/images/generations (OpenAI images API shape), /healthz, /readyz, /metrics "
            "and the OpenAPI document at /openapi.json. Any diffusers text-to-image pipeline directory "
            "loads, offline. On SIGTERM it drains: readiness turns false, new requests get 503, accepted "
            "ones complete, then it exits 0 (1 if --drain-timeout passes first). With --queue it also pulls "
            "jobs from a Redis stream (pull mode; see docs/WORKER.md). With --api-key-file every route but "
            "/healthz, /readyz and /metrics needs Authorization: Bearer <key>. Every flag can also be set "
            "through the environment variable shown with it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = serve.add_argument
    add("--model", type=Path, default=env.get("MODEL"), required=env.get("MODEL") is None,
        help="diffusers pipeline directory (env WORKER_MODEL)")
    add("--host", default=env.get("HOST", "0.0.0.0"), help="address to bind (env WORKER_HOST)")
    add("--port", type=int, default=env.get("PORT", "8000"), help="HTTP port (env WORKER_PORT)")
    add("--device", choices=["auto", "cpu", "cuda"], default=env.get("DEVICE", "auto"),
        help="auto takes CUDA when present; float16 on CUDA, float32 on CPU (env WORKER_DEVICE)")
    add("--max-batch-size", type=positive_int, default=env.get("MAX_BATCH_SIZE", _LIMITS.batching.max_batch_size),
        help="images per pipeline call at most; a request with n images counts n (env WORKER_MAX_BATCH_SIZE)")
    add("--max-wait-ms", type=non_negative_float, default=env.get("MAX_WAIT_MS", f"{_LIMITS.batching.max_wait_s * 1000:g}"),
        help="how long the oldest waiting request may wait for its batch to fill (env WORKER_MAX_WAIT_MS)")
    add("--max-queue", type=positive_int, default=env.get("MAX_QUEUE", _LIMITS.max_queue_images),
        help="images waiting at most; beyond it requests get 429 with Retry-After (env WORKER_MAX_QUEUE)")
    add("--request-timeout", type=positive_float, default=env.get("REQUEST_TIMEOUT", f"{_LIMITS.request_timeout_s:g}"),
        help="seconds from arrival to answer, else 504 (env WORKER_REQUEST_TIMEOUT)")
    add("--drain-timeout", type=positive_float, default=env.get("DRAIN_TIMEOUT", "120"),
        help="seconds a SIGTERM drain may take; keep terminationGracePeriodSeconds above it (env WORKER_DRAIN_TIMEOUT)")
    add("--max-image-side", type=positive_int, default=env.get("MAX_IMAGE_SIDE", _LIMITS.max_image_side),
        help="largest width or height served, in pixels; the API's own bound is 2048 (env WORKER_MAX_IMAGE_SIDE)")
    add("--no-warm-up", dest="warm_up", action="store_false", default=not env.flag("NO_WARM_UP"),
        help="skip the warm-up before readiness: a small call, then a batch at --max-batch-size that measures "
             "the capacity; --compile still compiles every bucket (env WORKER_NO_WARM_UP; warm-up on: %(default)s)")
    add("--compile", choices=COMPILE_CHOICES, default=env.get("COMPILE", "auto"),
        help="UNet and VAE decode under torch.compile with CUDA graphs, every batch bucket compiled before ready "
             "(--no-warm-up does not skip it); auto: on CUDA only, and eager if compiling fails (env WORKER_COMPILE)")
    add("--batch-buckets", type=parse_buckets, default=env.get("BATCH_BUCKETS"), metavar="N,N,...",
        help="batch sizes compiled; a batch runs padded to the next (default: powers of two up to "
             "--max-batch-size, and it) (env WORKER_BATCH_BUCKETS)")
    add("--compile-cache-dir", type=Path, default=env.get("COMPILE_CACHE_DIR"), metavar="DIR",
        help="keeps compiled artifacts across restarts; mount a volume here (env WORKER_COMPILE_CACHE_DIR)")
    add("--encode-processes", type=non_negative_int, default=env.get("ENCODE_PROCESSES"), metavar="N",
        help="processes that encode answers to PNG, off the pipeline's interpreter lock; 0: a thread "
             "(default: 2 on CUDA, 0 on CPU) (env WORKER_ENCODE_PROCESSES)")
    add_api_key_flag(add, env)
    add("--access-log", action="store_true", default=env.flag("ACCESS_LOG"),
        help="log every HTTP request (env WORKER_ACCESS_LOG)")
    add("--log-level", choices=LOG_LEVELS, default=env.get("LOG_LEVEL", "info"),
        help="(env WORKER_LOG_LEVEL)")

    pull = serve.add_argument_group("pull mode", "take jobs from a Redis stream as well as over HTTP")
    add = pull.add_argument
    add("--queue", default=env.get("QUEUE"), metavar="URL",
        help="Redis URL, redis://host:port/db (rediss:// for TLS), without a password; absent: HTTP only "
             "(env WORKER_QUEUE)")
    add("--stream", default=env.get("STREAM", jobqueue.DEFAULT_STREAM), help="the jobs' stream (env WORKER_STREAM)")
    add("--group", default=env.get("GROUP", jobqueue.DEFAULT_GROUP), help="the consumer group (env WORKER_GROUP)")
    add("--claim-idle", type=positive_float, default=env.get("CLAIM_IDLE", f"{_PULL.claim_idle_s:g}"),
        help="seconds a job may sit pending on a consumer before another takes it over (env WORKER_CLAIM_IDLE)")
    add("--max-deliveries", type=positive_int, default=env.get("MAX_DELIVERIES", _PULL.max_deliveries),
        help="deliveries of one job before it is dead-lettered as failed (env WORKER_MAX_DELIVERIES)")
    add("--result-ttl", type=positive_int, default=env.get("RESULT_TTL", _PULL.result_ttl_s),
        help="seconds a finished job and its result are kept (env WORKER_RESULT_TTL)")
    add_redis_flags(add, env)
    return parser


def queue_config(args: argparse.Namespace) -> QueueConfig | None:
    """Pull mode's settings from parsed flags, or None without --queue; raises ValueError naming the flag."""
    if not args.queue:
        return None
    return QueueConfig(
        url=args.queue, stream=args.stream, group=args.group, claim_idle_s=args.claim_idle,
        max_deliveries=args.max_deliveries, result_ttl_s=args.result_ttl,
        access=redis_access_from(args, Environment(ENV_PREFIX)),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-model":
        configure_logging("info")
        from .modelbuild import make_model

        make_model(args.directory, args.arch, args.seed, args.fp16)
        print(f"wrote a random-weight {args.arch} pipeline to {args.directory}")
        return 0

    configure_logging(args.log_level)
    from .batching import BatchPolicy
    from .server import ServeConfig, serve

    try:
        limits = WorkerLimits(
            batching=BatchPolicy(max_batch_size=args.max_batch_size, max_wait_s=args.max_wait_ms / 1000),
            max_queue_images=args.max_queue,
            request_timeout_s=args.request_timeout,
            max_image_side=args.max_image_side,
        )
        queue = queue_config(args)
        api_keys = api_keys_from(args.api_key_file, Environment(ENV_PREFIX), time.monotonic())
    except ValueError as error:
        print(f"python -m worker serve: {error}", file=sys.stderr)
        return 2
    if not (args.model / "model_index.json").is_file():
        print(f"python -m worker serve: --model {args.model} is not a diffusers pipeline directory "
              "(no model_index.json); build one with `python -m worker make-model DIR`", file=sys.stderr)
        return 2
    config = ServeConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        limits=limits,
        drain_timeout_s=args.drain_timeout,
        warm_up=args.warm_up,
        access_log=args.access_log,
        queue=queue,
        compile=args.compile,
        batch_buckets=args.batch_buckets,
        compile_cache_dir=args.compile_cache_dir,
        encode_processes=args.encode_processes,
        api_keys=api_keys,
    )
    code = serve(config)
    # The pipeline thread may still be inside torch (drain timed out, or a load was cut
    # short); tearing the interpreter down around it aborts the process. Leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
