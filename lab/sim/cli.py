"""The replay simulator's command line (`python -m lab.sim`). Replays arrivals (a CSV trace or a seeded scenario)
through the simulated fleet under the composite and the four baselines, side by side, and
prints a markdown table (or JSON), a Pareto front for sweeps, and PNG timelines.

Policies: `composite` (the scaler's own parser, refresh step and decision core, behind KEDA's
loop and the HPA with the ScaledObject's pass-through behavior), `hpa-gpu` (HPA on GPU
utilization, 75 %), `keda-queue` (KEDA's Prometheus scaler, 5 requests per replica),
`fixed-interval` (one replica more or fewer every 30 s), `knative` (the KPA's defaults).
Down to zero, on a queue (the gateway and Redis Streams: requests wait there for a cold start):
`composite-min0` (the composite as the queue overlay ships it: activation above 0, the
keep-warm hold, KEDA polling every 5 s and a 60 s cooldown unless --polling-interval and
--cooldown-period say otherwise) and `keda-queue-min0` (KEDA on the queue's length, 5 per
replica, activation above 0, polling 30 s, cooldown 300 s).
The yardsticks: `oracle` (a clairvoyant policy that knows every arrival and each start-up delay,
at the run's min replicas) and `oracle-min0` (the same down to zero, on a queue); with one among
the policies, the table gets a column "x oracle": each policy's GPU-hours over the oracle's
(a policy at min 0 against `oracle-min0` where both oracles ran, the others against `oracle`).
The output states the work bound: the GPU-hours of pure compute for every request at the best
batch, below which no policy that answers every request can go. docs/EVALUATION.md has the
results and the method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from adapter.config import MetadataError
from lab.metadata import metadata_item
from lab.sim.baselines import BASELINE_NAMES, KEDA_QUEUE_MIN0
from lab.sim.composite import composite_spec
from lab.sim.fleet import BatchProfile, FleetSpec, StartupDelay
from lab.sim.oracle import ORACLE, ORACLE_MIN0, best_batch, work_bound_gpu_hours
from lab.sim.replay import Job, Setup, job_min_replicas, run_jobs, write_timelines
from lab.sim.report import PolicyResult, markdown, oracle_ratio, pareto_front
from lab.sim.shipped import (
    SHIPPED_MAX_BATCH, SHIPPED_MAX_QUEUE, SHIPPED_MAX_REPLICAS, SHIPPED_MAX_WAIT_S, SHIPPED_METADATA,
    SHIPPED_MIN_REPLICAS, SHIPPED_POLLING_INTERVAL_S, SHIPPED_QUEUE_COOLDOWN_PERIOD_S, SHIPPED_QUEUE_METADATA,
    SHIPPED_QUEUE_POLLING_INTERVAL_S,
)
from lab.sim.traces import SCENARIOS, TraceError, load_trace, synthetic

PROG = "python -m lab.sim"
COMPOSITE_MIN0 = "composite-min0"
POLICY_NAMES = ("composite", *BASELINE_NAMES, COMPOSITE_MIN0, KEDA_QUEUE_MIN0, ORACLE, ORACLE_MIN0)
ZERO_CAPABLE = ("composite", "keda-queue", ORACLE)  # KEDA's policies (activation takes them 0 -> 1), and the oracle


def sweep_grid(assignments: Sequence[str]) -> list[dict[str, str]]:
    """`KEY=V1,V2` (or `KEY=V1|V2` where values hold commas) assignments to every combination,
    as metadata overrides; raises ValueError."""
    axes: list[tuple[str, list[str]]] = []
    for assignment in assignments:
        key, sep, values = assignment.partition("=")
        # values that hold commas themselves (signals, weights) are separated by "|" instead
        choices = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ValueError(f"--sweep wants KEY=V1,V2,..., got {assignment!r}")
        if any(key.strip() == k for k, _ in axes):
            raise ValueError(f"--sweep names {key.strip()} twice")
        axes.append((key.strip(), choices))
    grid: list[dict[str, str]] = [{}]
    for key, choices in axes:
        grid = [{**point, key: value} for point in grid for value in choices]
    return grid


def sweep_name(overrides: Mapping[str, str]) -> str:
    return "composite " + " ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "composite"


def with_oracle_ratios(results: Sequence[PolicyResult], jobs: Sequence[Job], setup: Setup) -> list[PolicyResult]:
    """`results` (one per job, in the jobs' order) with each one's `oracle_ratio`: over the oracle
    that ran at zero for a job at min 0 and over the other for the rest, where both ran; over
    the one that ran otherwise; None without an oracle."""
    oracles = {job_min_replicas(job, setup) == 0: result
               for job, result in zip(jobs, results, strict=True) if job.kind == ORACLE}
    if not oracles:
        return list(results)
    ratioed = []
    for job, result in zip(jobs, results, strict=True):
        at_zero = job_min_replicas(job, setup) == 0
        reference = oracles.get(at_zero, oracles.get(not at_zero))
        ratioed.append(replace(result, oracle_ratio=oracle_ratio(result, reference)))
    return ratioed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="CSV trace, one request per row")
    source.add_argument("--scenario", choices=SCENARIOS, help="a synthetic scenario instead of a trace")
    parser.add_argument("--time-column", default="TIMESTAMP", help="the trace's timestamp column (default TIMESTAMP)")
    parser.add_argument("--images-column", help="the trace's images-per-request column (default: 1 each)")
    parser.add_argument("--steps-column", help="the trace's denoising-steps column (default: 20 each)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="2 plays the trace twice as fast (default 1)")
    parser.add_argument("--duration", type=float, default=3600.0, help="scenario length, seconds (default 3600)")
    parser.add_argument("--base-rps", type=float, default=2.0, help="scenario's base rate (default 2)")
    parser.add_argument("--peak-rps", type=float, default=15.0, help="scenario's peak rate (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="arrivals' and start-up delays' seed (default 0)")
    parser.add_argument("--slo-seconds", type=float, default=10.0, help="the latency objective (default 10)")
    parser.add_argument("--max-batch", type=int, default=SHIPPED_MAX_BATCH, help="each replica's max batch (default 12)")
    parser.add_argument("--max-wait-ms", type=float, default=1000 * SHIPPED_MAX_WAIT_S, help="batch deadline (default 50)")
    parser.add_argument("--max-queue", type=int, default=SHIPPED_MAX_QUEUE,
                        help="images a replica holds waiting before it rejects (default 96)")
    parser.add_argument("--profile", type=Path, help="batch profile JSON {\"reference_steps\": 20, \"batches\": "
                        "[{\"batch\": 1, \"seconds\": 1.07, \"gpu_util_percent\": 27}, ...]} (default: the H100 table in docs/ARCHITECTURE.md)")
    parser.add_argument("--startup-median", type=float, default=23.0, help="replica start-up delay median, s (default 23)")
    parser.add_argument("--startup-p99", type=float, default=52.0, help="replica start-up delay p99, s (default 52)")
    parser.add_argument("--min-replicas", type=int, default=SHIPPED_MIN_REPLICAS,
                        help="(default 1; 0 only for composite, keda-queue and oracle, and implies --queue; the "
                        "composite at 0 takes the queue overlay's polling and cooldown, the base's metadata)")
    parser.add_argument("--max-replicas", type=int, default=SHIPPED_MAX_REPLICAS, help="(default 16)")
    parser.add_argument("--polling-interval", type=float,
                        help=f"KEDA pollingInterval for the composite, s (default {SHIPPED_POLLING_INTERVAL_S:g}, the "
                        f"ScaledObject's; {SHIPPED_QUEUE_POLLING_INTERVAL_S:g}, the queue overlay's, for "
                        f"{COMPOSITE_MIN0} and at --min-replicas 0)")
    parser.add_argument("--cooldown-period", type=float, default=SHIPPED_QUEUE_COOLDOWN_PERIOD_S,
                        help="KEDA cooldownPeriod for the composite at min 0, s: 1 -> 0 after this long inactive "
                        f"(default {SHIPPED_QUEUE_COOLDOWN_PERIOD_S:g}, the queue overlay's)")
    parser.add_argument("--queue", action="store_true",
                        help="workers pull from a shared queue (the gateway's Redis stream) instead of each holding "
                        "its own; always so at min 0")
    parser.add_argument("--composite", action="append", default=[], metavar="KEY=VALUE",
                        help="composite trigger metadata over the shipped ScaledObject's (repeatable)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="run the composite over every combination of these metadata values (repeatable; "
                        "separate values with | where they hold commas, e.g. signals=queue,gpu|queue) "
                        "and print the Pareto front of SLO attainment against GPU-hours")
    parser.add_argument("--policies", default="composite," + ",".join(BASELINE_NAMES),
                        help=f"which policies to run, comma-separated, of {', '.join(POLICY_NAMES)} "
                        f"(default: the first five; {ORACLE} runs at --min-replicas, {ORACLE_MIN0} at 0 on a queue)")
    parser.add_argument("--tail", type=float, default=300.0, help="seconds simulated after the last arrival (default 300)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write a PNG timeline per policy into DIR")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON object per policy instead of the table")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{PROG}: {message}", file=sys.stderr)
        return 2

    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        return fail("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    if args.cooldown_period < 0:
        return fail("need --cooldown-period >= 0")
    if args.polling_interval is not None and args.polling_interval <= 0:
        return fail("need --polling-interval > 0")
    if args.max_batch < 1 or args.max_queue < args.max_batch or args.max_wait_ms < 0:
        return fail("need --max-batch >= 1, --max-queue >= --max-batch and --max-wait-ms >= 0")
    if not 0 < args.startup_median <= args.startup_p99:
        return fail("need 0 < --startup-median <= --startup-p99")
    if args.slo_seconds <= 0 or args.tail < 0:
        return fail("need --slo-seconds > 0 and --tail >= 0")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown or not policies:
        return fail(f"--policies: unknown {', '.join(unknown) or '(none given)'}; accepted: {', '.join(POLICY_NAMES)}")
    stuck = [p for p in policies if p in BASELINE_NAMES and p not in ZERO_CAPABLE]
    if args.min_replicas == 0 and stuck:
        return fail(f"--min-replicas 0: {', '.join(stuck)} cannot scale to zero; only {', '.join(ZERO_CAPABLE)} can "
                    f"(choose them with --policies, or add {COMPOSITE_MIN0} and {KEDA_QUEUE_MIN0} to a min-1 run)")
    try:
        overrides = dict(metadata_item(a) for a in args.composite)
    except argparse.ArgumentTypeError as error:
        return fail(f"--composite {error}")
    try:
        grid = sweep_grid(args.sweep) if args.sweep else [{}]
        for point in grid:
            composite_spec({**SHIPPED_METADATA, **overrides, **point})
        profile = BatchProfile.from_file(args.profile) if args.profile else BatchProfile()
        if args.trace:
            arrivals = load_trace(args.trace, args.time_column, args.images_column, args.steps_column, args.time_scale)
        else:
            arrivals = synthetic(args.scenario, args.duration, args.base_rps, args.peak_rps, args.seed)
    except (TraceError, MetadataError, ValueError, OSError) as error:
        return fail(str(error))
    setup = Setup(FleetSpec(args.max_batch, args.max_wait_ms / 1000, args.max_queue, profile,
                            StartupDelay(args.startup_median, args.startup_p99), args.queue or args.min_replicas == 0),
                  args.slo_seconds, args.min_replicas, args.max_replicas, args.polling_interval, args.seed, args.tail,
                  args.cooldown_period)
    jobs = []
    if "composite" in policies or args.sweep:
        for point in grid:
            metadata = {**SHIPPED_METADATA, **overrides, **point}
            jobs.append(Job("composite", tuple(sorted(metadata.items())), sweep_name(point)))
    jobs += [Job(name, name=name) for name in BASELINE_NAMES if name in policies]
    if COMPOSITE_MIN0 in policies:
        metadata = {**SHIPPED_METADATA, **SHIPPED_QUEUE_METADATA, **overrides}
        jobs.append(Job("composite", tuple(sorted(metadata.items())), COMPOSITE_MIN0, min_replicas=0))
    if KEDA_QUEUE_MIN0 in policies:
        jobs.append(Job(KEDA_QUEUE_MIN0, name=KEDA_QUEUE_MIN0, min_replicas=0))
    if ORACLE in policies:
        jobs.append(Job(ORACLE, name=ORACLE))
    if ORACLE_MIN0 in policies:
        jobs.append(Job(ORACLE, name=ORACLE_MIN0, min_replicas=0))
    results = with_oracle_ratios(run_jobs(arrivals, setup, jobs, args.jobs), jobs, setup)
    if args.json:
        front = {id(r) for r in pareto_front(results)}
        for result in results:
            print(json.dumps({**result.summary(), **({"pareto": id(result) in front} if args.sweep else {})}))
    else:
        print(f"{len(arrivals)} requests over {arrivals[-1].t_s / 60:.1f} min; objective {args.slo_seconds:g} s")
        batch, rate = best_batch(setup.fleet, max(a.images for a in arrivals))
        print(f"work bound: {work_bound_gpu_hours(arrivals, setup.fleet):.2f} GPU-hours (every request's image-steps "
              f"at batch {batch}, {rate:.0f} image-steps/s, no start-up and no idle time)")
        print(markdown(results, args.slo_seconds))
        if args.sweep:
            print("\nPareto front (SLO attainment against GPU-hours, cheapest first):\n")
            print(markdown(pareto_front(results), args.slo_seconds))
    if args.plots:
        try:
            written = write_timelines(results, args.plots, args.slo_seconds)
        except ImportError:
            return fail("--plots needs matplotlib: pip install '.[stack]'")
        print(f"timelines: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
