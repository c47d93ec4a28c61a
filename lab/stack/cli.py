"""The local stack's command line (`python -m lab.stack`): the whole loop on one machine, scaling real workers.

Real parts, all of them:
- worker processes (`python -m worker serve`: the tiny model on the CPU, or, where NVML sees
  GPUs, the sd15 model with one worker per GPU and an exporter beside each), behind a
  balancer that sends each request to the worker with the fewest in flight;
- Prometheus (the packaged binary) scraping the workers (file discovery, rewritten as
  workers come and go) and the scaler, every second; without Prometheus, the scaler scrapes
  the same file's workers itself (`scrapeTargetsFile`, adapter/directscrape.py);
- the scaler, and a local KEDA + HPA (`lab.keda`, `lab.hpa`) that calls it over
  gRPC on KEDA's schedule and scales the worker processes: new workers start, surplus ones
  get SIGTERM and drain.

Queue mode (the default, `--mode queue`) puts Redis (append-only) and the gateway in front:
clients post to the gateway, which holds each request on a Redis stream; the workers pull
from it, and the scaler reads the stream's backlog, so the fleet starts at zero workers, the
first requests wake it (KEDA's activation), and a quiet end takes it back to zero after the
cool-down. `--mode direct` is the earlier loop: workers behind a balancer, at least one always.

A load generator plays a scenario (idle, ramp, burst, cool-down) against the front; a line
a second shows replicas desired and ready, queue, p95, busy fraction and each signal's
proposal; at the end a PNG timeline is written. Everything started is stopped on exit,
Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from lab.metadata import metadata_item
from lab.stack.run import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="length of the scenario")
    parser.add_argument("--model", type=Path, help="a pipeline directory; default: build the tiny model")
    parser.add_argument("--mode", choices=["queue", "direct"], default="queue",
                        help="queue: gateway + Redis stream + pull-mode workers, from zero; direct: a balancer in "
                        "front of the workers")
    parser.add_argument("--min-replicas", type=int, help="default 0 in queue mode, 1 in direct mode")
    parser.add_argument("--cooldown", type=float, default=15.0,
                        help="KEDA cooldownPeriod (compressed): idle this long before 1 -> 0, with --min-replicas 0")
    parser.add_argument("--max-replicas", type=int, default=4, help="at most one per GPU on GPUs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: one worker per GPU with the sd15 model and an exporter each when NVML sees "
                        "GPUs, else the tiny model on the CPU")
    parser.add_argument("--max-batch", type=int, help="each worker's --max-batch-size, and the queue target "
                        "(default 4 on CPU, 12 on GPU)")
    parser.add_argument("--steps", type=int, help="denoising steps per request (default 8 on CPU, 20 on GPU)")
    parser.add_argument("--peak-rps", type=float, help="requests per second at the top of the ramp "
                        "(default 6 on CPU, 5 per GPU)")
    parser.add_argument("--burst-rps", type=float, help="requests per second during the burst (default 10 on CPU, 8 per GPU)")
    parser.add_argument("--target-p95", type=float, help="the ScaledObject's targetP95Seconds (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--scale-down-window", type=float, default=20.0, help="scaleDownWindowSeconds, compressed")
    parser.add_argument("--polling-interval", type=float, default=2.0, help="KEDA pollingInterval, compressed")
    parser.add_argument("--sync-period", type=float, default=3.0, help="the HPA's sync period, compressed")
    parser.add_argument("--metrics-source", choices=["auto", "prometheus", "direct"], default="auto",
                        help="where the scaler reads the signals: Prometheus (when installed, for auto) or the "
                        "workers' /metrics scraped by the scaler itself (adapter/directscrape.py)")
    parser.add_argument("--timeline", default="stack-timeline.png", help="PNG written at the end; empty for none")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", type=metadata_item,
                        help="trigger metadata over the stack's own (repeatable), e.g. minBusyReplicas=1")
    parser.add_argument("--record", help="write what a replay of this run needs (settings, arrivals, replicas over "
                        "time, start-up delays, batches, the workers' exported throughput by batch size and start-up seconds) as JSON here, for lab.sim.replay.replay_record (tests/integration/test_stack.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers share the cores: one thread each
    loop = asyncio.new_event_loop()
    task = loop.create_task(run(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("stack: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        loop.close()
