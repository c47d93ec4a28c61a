"""The built-in PromQL for each signal, from a trigger's selector and window.

Metric names come from the contract (`contract.names`): the worker's `diffusion_*` series and
the exporter's dcgm-exporter-compatible GPU utilization.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract import names


@dataclass(frozen=True)
class Queries:
    """The four PromQL expressions one refresh evaluates (instant queries), by query name."""

    queue: str
    gpu: str
    latency: str
    ready: str


def builtin_queries(selector: str, window: str) -> Queries:
    """Instant queries that each return one sample (or none when no series match)."""
    sel = "{" + selector.strip().rstrip(",") + "}" if selector.strip() else ""
    return Queries(
        # waiting + running requests, summed over the target's pods
        queue=f"sum({names.REQUESTS_IN_FLIGHT}{sel})",
        # mean over the target's GPUs of each GPU's mean over the window, in percent
        gpu=f"avg(avg_over_time({names.GPU_UTIL}{sel}[{window}]))",
        # p95 of request latency over the window, all pods pooled
        latency=(
            "histogram_quantile(0.95, sum by (le) "
            f"(rate({names.REQUEST_DURATION}_bucket{sel}[{window}])))"
        ),
        ready=f"sum({names.READY}{sel})",
    )
