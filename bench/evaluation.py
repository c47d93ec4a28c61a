"""The evaluation in docs/EVALUATION.md: every scenario through `python -m lab.sim`, issue 14's
goals checked per scenario, the tables printed as markdown.

    python bench/evaluation.py                       # all scenarios, tables to stdout
    python bench/evaluation.py --plots docs/evaluation --plot-scenarios step,sd   # and PNG timelines
    python bench/evaluation.py --only spike,sd       # some of them
    python bench/evaluation.py --composite spareAboveLoad=0.3   # the composite with other metadata

Every scenario replays on the queue (the gateway and Redis Streams), every policy alike: the
composite and KEDA on the queue's length at min 0 (`composite-min0`, the queue overlay as it
ships; `keda-queue-min0`, KEDA's defaults), the three that cannot scale to zero at min 1
(`hpa-gpu`, `fixed-interval`, `knative`), and the clairvoyant yardstick `oracle-min0`. Every
policy opens with one ready replica. The synthetic scenarios run with seeds 0, 1 and 2; their
rows pool the three runs (SLO attainment over all their requests, the rest the mean of the three).

The goals (issue 14), each per scenario, compared as the tables show them:
1. the composite's SLO attainment is the best of all policies (ties count, to 0.1 point), and no
   policy within one point of it spends fewer GPU-hours (to 0.01);
2. its GPU-hours are within 1.5x of the oracle's;
3. its scale events are no more than KEDA's (keda-queue-min0) plus one per ten minutes of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRACES = REPO.parent / "shared" / "traces"

from lab.sim.baselines import KEDA_QUEUE_MIN0  # noqa: E402 - after the path
from lab.sim.cli import COMPOSITE_MIN0  # noqa: E402
from lab.sim.oracle import ORACLE_MIN0  # noqa: E402

COMPOSITE = COMPOSITE_MIN0
POLICIES = (COMPOSITE_MIN0, KEDA_QUEUE_MIN0, "hpa-gpu", "fixed-interval", "knative", ORACLE_MIN0)
SEEDS = (0, 1, 2)
TAIL_S = 300.0  # `python -m lab.sim`'s default: each run lasts until the last arrival plus this
SD = ["--trace", str(TRACES / "AlibabaGenTD26_sd_2024-11-24_4days.csv"), "--images-column", "images",
      "--steps-column", "steps"]

# name -> the arguments of `python -m lab.sim` that make its arrivals (everything else is the default)
SCENARIOS: dict[str, list[str]] = {
    "sd": SD,
    "sd-x20": [*SD, "--time-scale", "20"],
    "code": ["--trace", str(TRACES / "AzureLLMInferenceTrace_code.csv")],
    "conv": ["--trace", str(TRACES / "AzureLLMInferenceTrace_conv.csv")],
    "step": ["--scenario", "step"],
    "spike": ["--scenario", "spike"],
    "diurnal": ["--scenario", "diurnal"],
    "onoff": ["--scenario", "onoff"],
}
SYNTHETIC = ("step", "spike", "diurnal", "onoff")


def run(name: str, extra: list[str], policies: tuple[str, ...] = POLICIES, plots: Path | None = None) -> list[dict]:
    """One scenario's rows, one per policy, pooled over the seeds for a synthetic one; with
    `plots`, seed 0's PNG timelines there."""
    seeds = SEEDS if name in SYNTHETIC else (0,)
    runs = []
    for seed in seeds:
        drawn = ["--plots", str(plots)] if plots is not None and seed == 0 else []
        command = [sys.executable, "-m", "lab.sim", *SCENARIOS[name], "--queue", "--policies", ",".join(policies),
                   "--seed", str(seed), "--json", *drawn, *extra]
        out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return pool(runs)


def pool(runs: list[list[dict]]) -> list[dict]:
    """Rows of several seeds' runs as one: SLO attainment over every request, the rest the mean
    (the ratio to the oracle: mean GPU-hours over the oracle's mean)."""
    pooled = []
    for rows in zip(*runs, strict=True):
        n, requests = len(rows), sum(r["requests"] for r in rows)
        row = {"policy": rows[0]["policy"], "requests": requests,
               "slo_attainment": sum(r["slo_attainment"] * r["requests"] for r in rows) / requests}
        for key in ("gpu_hours", "hours_at_zero", "cold_starts", "scale_events", "work_bound_gpu_hours"):
            row[key] = sum(r[key] for r in rows) / n
        row["p99_s"] = max((r["p99_s"] for r in rows if r["p99_s"] is not None), default=None)
        pooled.append(row)
    oracle = next((r for r in pooled if r["policy"] == ORACLE_MIN0), None)
    for row in pooled:
        row["oracle_ratio"] = row["gpu_hours"] / oracle["gpu_hours"] if oracle and oracle["gpu_hours"] > 0 else None
    return pooled


def duration_minutes(rows: list[dict], name: str) -> float:
    """The run's length in minutes: the last arrival plus the tail."""
    from lab.sim.traces import load_trace, synthetic

    args = SCENARIOS[name]
    if "--scenario" in args:
        arrivals = synthetic(args[args.index("--scenario") + 1], 3600.0, 2.0, 15.0, 0)
    else:
        scale = float(args[args.index("--time-scale") + 1]) if "--time-scale" in args else 1.0
        images = args[args.index("--images-column") + 1] if "--images-column" in args else None
        steps = args[args.index("--steps-column") + 1] if "--steps-column" in args else None
        arrivals = load_trace(Path(args[args.index("--trace") + 1]), "TIMESTAMP", images, steps, scale)
    return (arrivals[-1].t_s + TAIL_S) / 60


def goals(rows: list[dict], minutes: float) -> list[tuple[bool, str]]:
    """Issue 14's three goals for the composite: (met, the line that says so with the numbers)."""
    by_name = {r["policy"]: r for r in rows}
    composite, keda, oracle = by_name[COMPOSITE], by_name[KEDA_QUEUE_MIN0], by_name[ORACLE_MIN0]
    others = [r for r in rows if r["policy"] not in (COMPOSITE, ORACLE_MIN0)]

    def slo(row: dict) -> int:
        return round(1000 * row["slo_attainment"])

    def hours(row: dict) -> int:
        return round(100 * row["gpu_hours"])

    leader = max(others, key=slo)
    cheaper = [r for r in others if slo(r) >= slo(composite) - 10 and hours(r) < hours(composite)]
    if slo(composite) < slo(leader):
        first = (False, f"SLO below {leader['policy']}'s ({pct(composite)} against {pct(leader)})")
    elif cheaper:
        names = ", ".join(f"{r['policy']} ({pct(r)}, {r['gpu_hours']:.2f} GPU-h)" for r in cheaper)
        first = (False, f"best SLO ({pct(composite)}), but within one point {names} spend less")
    else:
        first = (True, f"best SLO ({pct(composite)}) and the fewest GPU-hours within one point of it")
    ratio = composite["oracle_ratio"]
    second = (ratio is not None and ratio <= 1.5,
              f"{composite['gpu_hours']:.2f} GPU-h, {ratio:.2f}x the oracle's {oracle['gpu_hours']:.2f}"
              if ratio is not None else "no oracle GPU-hours to compare with")
    allowed = keda["scale_events"] + minutes / 10
    third = (composite["scale_events"] <= allowed,
             f"{composite['scale_events']:.0f} scale events, at most {allowed:.0f} "
             f"(keda-queue-min0's {keda['scale_events']:.0f} + {minutes / 10:.0f})")
    return [first, second, third]


def pct(row: dict) -> str:
    return f"{100 * row['slo_attainment']:.1f} %"


def table(rows: list[dict], slo_s: float = 10.0) -> str:
    lines = [f"| policy | SLO attainment (<= {slo_s:g} s) | p99 s | GPU-hours | x oracle | hours at zero | cold starts "
             "| scale events |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p99 = "-" if r["p99_s"] is None else f"{r['p99_s']:.1f}"
        ratio = "-" if r["oracle_ratio"] is None else f"{r['oracle_ratio']:.2f}x"
        lines.append(f"| {r['policy']} | {pct(r)} | {p99} | {r['gpu_hours']:.2f} | {ratio} | {r['hours_at_zero']:.2f} "
                     f"| {r['cold_starts']:.1f} | {r['scale_events']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenarios (default: all): " + ", ".join(SCENARIOS))
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--plots", type=Path, help="write seed 0's PNG timelines under DIR/<scenario>/")
    parser.add_argument("--plot-scenarios", default="", help="which scenarios get PNGs (default: none)")
    parser.add_argument("--composite", action="append", default=[], metavar="KEY=VALUE",
                        help="composite trigger metadata over the queue overlay's (repeatable)")
    parser.add_argument("--simulate-args", default="", help="more arguments for every simulate run, e.g. "
                        "'--profile docs/results/h100-sd15-profile.json'")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    extra = [f"--composite={item}" for item in args.composite] + args.simulate_args.split()
    everything, met = {}, [0, 0, 0]
    for name in names:
        plotted = args.plots / name if args.plots and name in args.plot_scenarios.split(",") else None
        rows = run(name, extra, plots=plotted)
        everything[name] = rows
        seeds = ", seeds 0-2 pooled" if name in SYNTHETIC else ""
        shown = " ".join(a.replace(str(REPO.parent), "..") for a in SCENARIOS[name])
        print(f"### {name}\n\n`python -m lab.sim {shown} --queue`{seeds}\n")
        print(table(rows))
        print()
        for index, (ok, line) in enumerate(goals(rows, duration_minutes(rows, name))):
            met[index] += ok
            print(f"- Goal {index + 1}: {'met' if ok else '**missed**'}: {line}")
        print(flush=True)
    print(f"Goals met on {met[0]}, {met[1]} and {met[2]} of {len(names)} scenarios.")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
