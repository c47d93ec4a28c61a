"""The built-in PromQL for each signal, from a trigger's selector and window.

Metric names are the contract of DESIGN.md: the worker's `diffusion_*` series and the
exporter's dcgm-exporter-compatible `DCGM_FI_DEV_GPU_UTIL`.
"""

from __future__ import annotations

from typing import NamedTuple


class BuiltinQueries(NamedTuple):
    queue: str
    gpu: str
    latency: str
    ready: str


def builtin_queries(selector: str, window: str) -> BuiltinQueries:
    """Instant queries that each return one sample (or none when no series match)."""
    sel = "{" + selector.strip().rstrip(",") + "}" if selector.strip() else ""
    return BuiltinQueries(
        # waiting + running requests, summed over the target's pods
        queue=f"sum(diffusion_requests_in_flight{sel})",
        # mean over the target's GPUs of each GPU's mean over the window, in percent
        gpu=f"avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{sel}[{window}]))",
        # p95 of request latency over the window, all pods pooled
        latency=(
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(diffusion_request_duration_seconds_bucket{sel}[{window}])))"
        ),
        ready=f"sum(diffusion_ready{sel})",
    )
