"""The evaluation in docs/EVALUATION.md: every scenario through `python -m lab.sim`,
the goal checked per scenario, the tables printed as markdown.

    python bench/evaluation.py                       # all scenarios, tables to stdout
    python bench/evaluation.py --plots docs/evaluation --plot-scenarios code,step
    python bench/evaluation.py --only spike          # one scenario

The goal (issue 6): with the shipped defaults, the composite's SLO attainment is the best of
all five policies, and its GPU-hours are no more than those of any baseline whose attainment
is within one point of the composite's.

The scale-to-zero goals (issue 13), on the shared SD trace at real speed (`sd`), which also
replays the composite and KEDA on the queue at min 0: the composite at min 0, as the queue
overlay ships it (`composite-min0`), reaches at least 99.0 % SLO attainment with at most 70 %
of keda-queue's GPU-hours at min 1, and beats keda-queue-min0 on SLO attainment or GPU-hours
without losing on the other.
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

from lab.sim.baselines import BASELINE_NAMES, KEDA_QUEUE_MIN0  # noqa: E402 - after the path
from lab.sim.cli import COMPOSITE_MIN0  # noqa: E402

SD_POLICIES = ("composite", *BASELINE_NAMES, COMPOSITE_MIN0, KEDA_QUEUE_MIN0)

# name -> the arguments of `python -m lab.sim` (everything else is the default)
SCENARIOS: dict[str, list[str]] = {
    "code": ["--trace", str(TRACES / "AzureLLMInferenceTrace_code.csv")],
    "conv": ["--trace", str(TRACES / "AzureLLMInferenceTrace_conv.csv")],
    "conv-x2": ["--trace", str(TRACES / "AzureLLMInferenceTrace_conv.csv"), "--time-scale", "2"],
    "step": ["--scenario", "step"],
    "spike": ["--scenario", "spike"],
    "diurnal": ["--scenario", "diurnal"],
    "onoff": ["--scenario", "onoff"],
    "sd": ["--trace", str(TRACES / "AlibabaGenTD26_sd_2024-11-24_4days.csv"), "--images-column", "images",
           "--steps-column", "steps", "--policies", ",".join(SD_POLICIES)],
}


def run(name: str, extra: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "lab.sim", *SCENARIOS[name], "--json", *extra]
    out = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def verdict(rows: list[dict]) -> str:
    """Issue 6's goal over the five policies at min 1."""
    [composite] = [r for r in rows if r["policy"] == "composite"]
    baselines = [r for r in rows if r["policy"] in BASELINE_NAMES]
    best = max(b["slo_attainment"] for b in baselines)
    # compared as the tables show them, to 0.1 point
    if round(1000 * composite["slo_attainment"]) < round(1000 * best):
        leader = max(baselines, key=lambda b: b["slo_attainment"])["policy"]
        return f"**missed**: SLO below {leader}'s"
    near = [b for b in baselines if b["slo_attainment"] >= composite["slo_attainment"] - 0.01]
    cheaper = [b for b in near if b["gpu_hours"] < composite["gpu_hours"]]
    if cheaper:
        names = ", ".join(f"{b['policy']} ({100 * b['slo_attainment']:.1f} %, {b['gpu_hours']:.2f} GPU-h)" for b in cheaper)
        return f"**missed on cost**: best SLO, but within one point {names} spend less"
    return "met"


def zero_goals(rows: list[dict]) -> list[str]:
    """Issue 13's three goals for the composite at min 0, each a line that says met or missed
    and the numbers; compared as the tables show them (0.1 point, 0.01 GPU-hour)."""
    by_name = {r["policy"]: r for r in rows}
    zero, keda1, keda0 = by_name[COMPOSITE_MIN0], by_name["keda-queue"], by_name[KEDA_QUEUE_MIN0]

    def slo(row: dict) -> int:
        return round(1000 * row["slo_attainment"])

    def hours(row: dict) -> int:
        return round(100 * row["gpu_hours"])

    def said(met: bool) -> str:
        return "met" if met else "**missed**"

    share = zero["gpu_hours"] / keda1["gpu_hours"]
    not_worse = slo(zero) >= slo(keda0) and hours(zero) <= hours(keda0)
    better = slo(zero) > slo(keda0) or hours(zero) < hours(keda0)
    return [
        f"SLO attainment at least 99.0 %: {said(slo(zero) >= 990)} ({100 * zero['slo_attainment']:.1f} %)",
        f"at most 70 % of keda-queue's GPU-hours at min 1: {said(share <= 0.70)} "
        f"({zero['gpu_hours']:.2f} of {keda1['gpu_hours']:.2f}, {100 * share:.1f} %; "
        f"at most {0.70 * keda1['gpu_hours']:.2f})",
        f"beats keda-queue-min0 without losing on the other count: {said(not_worse and better)} "
        f"({100 * zero['slo_attainment']:.1f} % and {zero['gpu_hours']:.2f} GPU-h against "
        f"{100 * keda0['slo_attainment']:.1f} % and {keda0['gpu_hours']:.2f})",
    ]


def table(rows: list[dict], slo: float = 10.0) -> str:
    from lab.sim.report import PolicyResult, markdown

    return markdown([PolicyResult(**row) for row in rows], slo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenarios (default: all): " + ", ".join(SCENARIOS))
    parser.add_argument("--plots", type=Path, help="write PNG timelines under DIR/<scenario>/")
    parser.add_argument("--plot-scenarios", default="", help="which scenarios get PNGs (default: none)")
    parser.add_argument("--json", type=Path, help="also write every row as JSON here")
    parser.add_argument("--simulate-args", default="", help="more arguments for every simulate run, e.g. "
                        "'--profile docs/results/h100-sd15-profile.json'")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    plotted = set(filter(None, args.plot_scenarios.split(",")))
    everything, met = {}, 0
    for name in names:
        extra = ["--plots", str(args.plots / name)] if args.plots and name in plotted else []
        extra += args.simulate_args.split()
        rows = run(name, extra)
        everything[name] = rows
        outcome = verdict(rows)
        met += outcome == "met"
        print(f"### {name}\n\n`python -m lab.sim {' '.join(a.replace(str(REPO.parent), '..') for a in SCENARIOS[name])}`\n")
        print(table(rows))
        print(f"\nGoal: {outcome}.\n", flush=True)
        if name == "sd":
            print(f"Scale-to-zero goals, {COMPOSITE_MIN0} as the queue overlay ships it:\n")
            print("\n".join(f"- {line}" for line in zero_goals(rows)) + "\n", flush=True)
    print(f"Goal met on {met} of {len(names)} scenarios.")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
