"""The built-in PromQL for each signal, from a trigger's selector and window.

Metric names come from the contract (`contract.names`): the worker's `diffusion_*` series and
the exporter's dcgm-exporter-compatible GPU utilization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contract import names


# One label matcher: a label name, an operator, and a double- or single-quoted value.
_MATCHER = re.compile(
    r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*(?:,|$)"""
)


_DURATION = re.compile(r"^(?:[0-9]+(?:ms|s|m|h|d|w|y))+$")
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration_seconds(text: str) -> float:
    """Seconds in a PromQL duration such as `1m` or `1h30m`; raises ValueError otherwise."""
    if not _DURATION.match(text):
        raise ValueError(text)
    return sum(int(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
# What Python's re accepts and RE2 (Prometheus) refuses: lookaround and backreferences.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\\[1-9]")


def parse_selector(selector: str) -> tuple[tuple[str, str, str], ...]:
    """`namespace="ml",deployment=~'sd-.*'` -> ((label, op, unescaped value), ...), as PromQL reads
    label matchers (either quote, a trailing comma). Raises ValueError on anything else, and on a
    regular expression that does not compile, so a selector that one source could not use is
    refused for both."""
    matchers, position, text = [], 0, selector.strip().rstrip(",")
    while position < len(text):
        found = _MATCHER.match(text, position)
        if not found:
            raise ValueError(f"cannot read label matchers from {selector!r} at {text[position:]!r}")
        quoted = found.group(3) if found.group(3) is not None else found.group(4)
        value = _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), quoted)  # UTF-8 text stays as it is
        if found.group(2) in ("=~", "!~"):
            if _NOT_RE2.search(value):
                raise ValueError(f"{found.group(1)}{found.group(2)}{value!r}: lookaround and backreferences are not "
                                 "RE2, which Prometheus uses")
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{found.group(1)}{found.group(2)}{value!r}: not a regular expression both sources "
                                 f"can read (Prometheus' RE2 and the direct scrape's Python re): {error}") from None
        matchers.append((found.group(1), found.group(2), value))
        position = found.end()
    return tuple(matchers)


def format_selector(matchers: tuple[tuple[str, str, str], ...]) -> str:
    """Label matchers as `parse_selector` reads them back: `label op "value"`, comma separated,
    the value's backslashes, double quotes and line breaks escaped."""
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return ",".join(f"{label}{op}{quoted(value)}" for label, op, value in matchers)


@dataclass(frozen=True)
class Queries:
    """The PromQL expressions a refresh may evaluate (instant queries), by query name: the
    counts and the GPU and latency signals', and the capacity signal's four."""

    queue: str
    gpu: str
    latency: str
    ready: str
    demand: str
    arrivals: str
    capacity: str
    startup: str


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
        # image-steps per second asked of the target over the window (the workers count on arrival)
        demand=f"sum(rate({names.REQUESTED_IMAGE_STEPS}_total{sel}[{window}]))",
        # requests per second answered over the window, every outcome: demand / arrivals is the
        # mean image-steps of a request
        arrivals=f"sum(rate({names.REQUESTS}_total{sel}[{window}]))",
        # image-steps per second one replica serves at its max batch, mean over the replicas
        capacity=f"avg({names.CAPACITY_IMAGE_STEPS}{sel})",
        # seconds from a replica's process start to ready, mean over the replicas
        startup=f"avg({names.STARTUP_SECONDS}{sel})",
    )
