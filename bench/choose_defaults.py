"""Chooses the queue overlay's composite defaults once, by replay over every scenario together.

    python bench/choose_defaults.py                 # the grid below, a table of candidates, best first
    python bench/choose_defaults.py --only spike,sd # fewer scenarios (for a quick look; not for choosing)

Each candidate is trigger metadata over the queue overlay's (`lab.sim.shipped`) plus KEDA's
`cooldownPeriod`. Every scenario of bench/evaluation.py (seeds 0-2 pooled for the synthetic
ones) replays the baselines and the oracle once and each candidate beside them, on the queue,
as the evaluation does. A candidate ranks by the scenarios on which it meets goal 1 (the best
SLO attainment, ties counting, and the fewest GPU-hours within one point), then goal 2 (within
1.5x of the oracle), then goal 3 (scale events); among equals, one whose scale to zero is chosen
from the idle gaps seen (the keep-warm hold) before one on a fixed timer (KEDA's cooldown alone),
as issue 14 asks, then the lower geometric-mean GPU-hours over the oracle's. Not per trace: one
set for all.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import evaluation  # noqa: E402 - bench/ is not a package
from lab.sim.baselines import KEDA_QUEUE_MIN0  # noqa: E402
from lab.sim.cli import COMPOSITE_MIN0  # noqa: E402
from lab.sim.fleet import FleetSpec  # noqa: E402
from lab.sim.oracle import ORACLE, ORACLE_MIN0  # noqa: E402
from lab.sim.replay import Job, Setup, run_jobs  # noqa: E402
from lab.sim.shipped import SHIPPED_METADATA, SHIPPED_QUEUE_METADATA  # noqa: E402
from lab.sim.traces import load_trace, synthetic  # noqa: E402

BASELINES = (KEDA_QUEUE_MIN0, "hpa-gpu", "fixed-interval", "knative")

# (name, metadata over the overlay's, cooldownPeriod seconds). The spare gated by load
# (minBusyReplicas 2 above 20 % of a replica) against the overlay's no spare; the keep-warm hold
# (none, with the 900 s cooldown the overlay shipped, or up to 1 h or 4 h with a 60 s cooldown);
# the queue's instant gauge or its 30 s mean; the capacity signal on two of them.
def candidate(busy: str, above: str, hold: str, cooldown: float, smoothing: str, capacity: bool = False):
    name = (f"spare={busy}@{above} hold={hold} cooldown={cooldown:g} smoothing={smoothing}"
            + (" +capacity" if capacity else ""))
    metadata = {"minBusyReplicas": busy, "spareAboveLoad": above, "keepWarmMaxSeconds": hold,
                "queueSmoothingSeconds": smoothing}
    if capacity:
        metadata.update(signals="queue,gpu,latency,capacity", targetCapacityUtilization="0.9")
    return name, metadata, cooldown


GRID: list[tuple[str, dict[str, str], float]] = [
    candidate("1", "0", "0", 900.0, "0"),  # the queue overlay before issue 14
    *(candidate("2", "0.2", hold, cooldown, smoothing)
      for (hold, cooldown), smoothing in itertools.product((("0", 900.0), ("3600", 60.0), ("14400", 60.0)), ("0", "30"))),
    candidate("2", "0.2", "3600", 60.0, "30", capacity=True),
    candidate("2", "0.2", "14400", 60.0, "30", capacity=True),
]


def arrivals_of(name: str, seed: int):
    args = evaluation.SCENARIOS[name]
    if "--scenario" in args:
        return synthetic(args[args.index("--scenario") + 1], 3600.0, 2.0, 15.0, seed)
    scale = float(args[args.index("--time-scale") + 1]) if "--time-scale" in args else 1.0
    images = args[args.index("--images-column") + 1] if "--images-column" in args else None
    steps = args[args.index("--steps-column") + 1] if "--steps-column" in args else None
    return load_trace(Path(args[args.index("--trace") + 1]), "TIMESTAMP", images, steps, scale)


def scenario_rows(name: str, grid, processes: int) -> dict[str, list[dict]]:
    """candidate name -> its pooled rows beside the baselines' and the oracle's."""
    runs: dict[str, list[list[dict]]] = {candidate: [] for candidate, _, _ in grid}
    for seed in evaluation.SEEDS if name in evaluation.SYNTHETIC else (0,):
        arrivals = arrivals_of(name, seed)
        setup = Setup(FleetSpec(pull=True), 10.0, 1, 16, None, seed, evaluation.TAIL_S)
        fixed = run_jobs(arrivals, setup, [Job(b, name=b) for b in BASELINES]
                         + [Job(ORACLE, name=ORACLE_MIN0, min_replicas=0)], processes)
        by_cooldown: dict[float, list] = {}
        for candidate, metadata, cooldown in grid:
            by_cooldown.setdefault(cooldown, []).append((candidate, metadata))
        for cooldown, candidates in by_cooldown.items():
            jobs = [Job("composite", tuple(sorted({**SHIPPED_METADATA, **SHIPPED_QUEUE_METADATA, **metadata}.items())),
                        COMPOSITE_MIN0, min_replicas=0) for _, metadata in candidates]
            results = run_jobs(arrivals, replace(setup, cooldown_s=cooldown), jobs, processes)
            for (candidate, _), result in zip(candidates, results, strict=True):
                runs[candidate].append([r.summary() for r in (result, *fixed)])
    return {candidate: evaluation.pool(seed_rows) for candidate, seed_rows in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenarios (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(evaluation.SCENARIOS)
    score = {candidate: [0, 0, 0, 0.0] for candidate, _, _ in GRID}
    detail: dict[str, list[str]] = {candidate: [] for candidate, _, _ in GRID}
    for name in names:
        minutes = evaluation.duration_minutes([], name)
        for candidate, rows in scenario_rows(name, GRID, args.jobs).items():
            met = evaluation.goals(rows, minutes)
            for index, (ok, _) in enumerate(met):
                score[candidate][index] += ok
            [composite] = [r for r in rows if r["policy"] == COMPOSITE_MIN0]
            score[candidate][3] += math.log(composite["oracle_ratio"] or 1.0) / len(names)
            detail[candidate].append(f"{name} {100 * composite['slo_attainment']:.1f}% "
                                     f"{composite['gpu_hours']:.2f}h {''.join('y' if ok else 'n' for ok, _ in met)}")
        print(f"{name} done", file=sys.stderr, flush=True)
    # goals met first; among equals, a scale to zero chosen from the idle gaps seen before a fixed
    # timer (issue 14 asks for that), then the cheaper
    ranked = sorted(GRID, key=lambda g: (-score[g[0]][0], -score[g[0]][1], -score[g[0]][2],
                                         g[1]["keepWarmMaxSeconds"] == "0", score[g[0]][3]))
    print("| candidate | goal 1 | goal 2 | goal 3 | x oracle (geometric mean) | per scenario: SLO, GPU-h, goals |")
    print("| --- | --- | --- | --- | --- | --- |")
    for candidate, _, _ in ranked:
        g1, g2, g3, log_ratio = score[candidate]
        print(f"| {candidate} | {g1} | {g2} | {g3} | {math.exp(log_ratio):.2f}x | {'; '.join(detail[candidate])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
