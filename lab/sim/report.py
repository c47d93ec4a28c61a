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

    def summary(self) -> dict:
        """The JSON object `--json` prints: every field but the timeline."""
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least q of the values at or
    below it) of values sorted ascending; None for none."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def markdown(results: Sequence[PolicyResult], slo_s: float) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [f"| policy | SLO attainment (<= {slo_s:g} s) | p50 s | p95 s | p99 s | rejected | GPU-hours "
             "| hours at zero | cold starts | scale events | peak queue |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.policy} | {100 * r.slo_attainment:.1f} % | {seconds(r.p50_s)} | {seconds(r.p95_s)} | "
                     f"{seconds(r.p99_s)} | {r.rejected} | {r.gpu_hours:.2f} | {r.hours_at_zero:.2f} | {r.cold_starts} | "
                     f"{r.scale_events} | {r.peak_queue:.0f} |")
    return "\n".join(lines)


def pareto_front(results: Sequence[PolicyResult]) -> list[PolicyResult]:
    """The results no other beats on both counts (SLO attainment up, GPU-hours down), cheapest first."""
    def dominated(r: PolicyResult) -> bool:
        return any(o.slo_attainment >= r.slo_attainment and o.gpu_hours <= r.gpu_hours
                   and (o.slo_attainment > r.slo_attainment or o.gpu_hours < r.gpu_hours) for o in results)

    return sorted((r for r in results if not dominated(r)), key=lambda r: (r.gpu_hours, -r.slo_attainment))
