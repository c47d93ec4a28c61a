"""The simulator's results as people read them: percentiles, the markdown table, the Pareto front."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lab.timeline import TimelinePoint


@dataclass
class PolicyResult:
    """One policy's replay: the objective met, latency percentiles, cost and churn."""

    policy: str
    requests: int
    slo_attainment: float  # fraction of all requests answered within the objective
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    rejected: int
    gpu_hours: float  # every replica's time holding a GPU, start-up included
    hours_at_zero: float  # time no replica held a GPU
    cold_starts: int  # scale-ups from zero replicas, each a start-up delay its first requests wait for
    scale_events: int
    peak_queue: float
    timeline: list[TimelinePoint] = field(default_factory=list, repr=False)
    # GPU-hours of pure compute for every request at the best batch (`lab.sim.oracle.work_bound_gpu_hours`)
    work_bound_gpu_hours: float | None = None
    oracle_ratio: float | None = None  # gpu_hours over the oracle's; None where no oracle ran beside it

    def summary(self) -> dict:
        """The JSON object `--json` prints: every field but the timeline."""
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least q of the values at or
    below it) of values sorted ascending; None for none."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def oracle_ratio(result: PolicyResult, oracle: PolicyResult) -> float | None:
    """`result`'s GPU-hours over `oracle`'s (1.27: 27 % more than the oracle); None where the
    oracle held no GPU at all, as there is no ratio to zero."""
    return result.gpu_hours / oracle.gpu_hours if oracle.gpu_hours > 0 else None


def markdown(results: Sequence[PolicyResult], slo_s: float) -> str:
    """The results as a markdown table, a row each; with a column "x oracle" after GPU-hours
    when any result has an `oracle_ratio`."""
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    ratios = any(r.oracle_ratio is not None for r in results)
    lines = [f"| policy | SLO attainment (<= {slo_s:g} s) | p50 s | p95 s | p99 s | rejected | GPU-hours "
             + ("| x oracle " if ratios else "") + "| hours at zero | cold starts | scale events | peak queue |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if ratios else "")]
    for r in results:
        ratio = ("-" if r.oracle_ratio is None else f"{r.oracle_ratio:.2f}x") + " | " if ratios else ""
        lines.append(f"| {r.policy} | {100 * r.slo_attainment:.1f} % | {seconds(r.p50_s)} | {seconds(r.p95_s)} | "
                     f"{seconds(r.p99_s)} | {r.rejected} | {r.gpu_hours:.2f} | {ratio}{r.hours_at_zero:.2f} | "
                     f"{r.cold_starts} | {r.scale_events} | {r.peak_queue:.0f} |")
    return "\n".join(lines)


def pareto_front(results: Sequence[PolicyResult]) -> list[PolicyResult]:
    """The results no other beats on both counts (SLO attainment up, GPU-hours down), cheapest first."""
    def dominated(r: PolicyResult) -> bool:
        return any(o.slo_attainment >= r.slo_attainment and o.gpu_hours <= r.gpu_hours
                   and (o.slo_attainment > r.slo_attainment or o.gpu_hours < r.gpu_hours) for o in results)

    return sorted((r for r in results if not dominated(r)), key=lambda r: (r.gpu_hours, -r.slo_attainment))
