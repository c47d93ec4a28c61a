"""Request arrivals for replays: CSV traces as they are published, and seeded synthetic scenarios.

A trace is a CSV file with a timestamp column (date-time text, fractional seconds of any
length, or epoch seconds) and optional per-request columns for images and denoising steps.
Arrival times are made relative to the first request and divided by `time_scale` (2 plays
the trace twice as fast). The Azure LLM inference traces in ../shared/traces/ load as they
are. Synthetic scenarios draw Poisson arrivals from a rate that changes over time, with a
seed, so a run can be repeated exactly.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SCENARIOS = ("step", "spike", "diurnal", "onoff")


@dataclass(frozen=True)
class Arrival:
    """One request: when it arrives (seconds from the start), its images, its steps."""

    t_s: float
    images: int = 1
    steps: int = 20


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, row and column."""


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch from `2023-11-16 18:17:03.9799600` (UTC assumed) or `1700158623.97`."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    whole, _, fraction = text.replace("T", " ").removesuffix("Z").partition(".")
    stamp = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    if fraction:
        if not fraction.isdigit():
            raise ValueError(f"fractional seconds {fraction!r}")
        stamp += int(fraction) / 10 ** len(fraction)
    return stamp


def load_trace(
    path: Path,
    time_column: str = "TIMESTAMP",
    images_column: str | None = None,
    steps_column: str | None = None,
    time_scale: float = 1.0,
    default_steps: int = 20,
) -> list[Arrival]:
    """The trace's arrivals, sorted, from t = 0."""
    if not time_scale > 0:
        raise TraceError(f"time scale must be above 0, got {time_scale}")
    with open(path, newline="") as handle:
        rows = csv.DictReader(handle)
        columns = rows.fieldnames or []
        for wanted in (time_column, images_column, steps_column):
            if wanted is not None and wanted not in columns:
                raise TraceError(f"{path}: no column {wanted!r}; the columns are {', '.join(columns)}")
        raw: list[tuple[float, int, int]] = []
        for number, row in enumerate(rows, start=2):  # row 1 is the header
            try:
                stamp = parse_timestamp(row[time_column])
                images = _count(row[images_column]) if images_column else 1
                steps = _count(row[steps_column]) if steps_column else default_steps
            except (ValueError, TypeError) as error:
                raise TraceError(f"{path}: row {number}: {error}") from None
            raw.append((stamp, images, steps))
    if not raw:
        raise TraceError(f"{path}: no requests")
    raw.sort()
    start = raw[0][0]
    return [Arrival((stamp - start) / time_scale, images, steps) for stamp, images, steps in raw]


def _count(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"a count must be at least 1, got {text!r}")
    return math.ceil(value)


def scenario_rate(kind: str, duration_s: float, base_rps: float, peak_rps: float) -> Callable[[float], float]:
    """Requests per second at time t for a named scenario."""
    if kind == "step":  # base, then peak from 30 % of the run on
        return lambda t: peak_rps if t >= 0.3 * duration_s else base_rps
    if kind == "spike":  # a short spike to peak in the middle (10 % of the run)
        return lambda t: peak_rps if 0.45 * duration_s <= t < 0.55 * duration_s else base_rps
    if kind == "diurnal":  # one smooth day compressed into the run
        return lambda t: base_rps + (peak_rps - base_rps) * 0.5 * (1 - math.cos(2 * math.pi * t / duration_s))
    if kind == "onoff":  # bursts at peak, 60 s on, 120 s off
        return lambda t: peak_rps if t % 180.0 < 60.0 else base_rps
    raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, got {kind!r}")


def synthetic(kind: str, duration_s: float, base_rps: float, peak_rps: float, seed: int = 0,
              images: int = 1, steps: int = 20) -> list[Arrival]:
    """Poisson arrivals at the scenario's rate (thinning of a peak-rate process), reproducible by seed."""
    if not 0 <= base_rps <= peak_rps or peak_rps <= 0:
        raise ValueError(f"need 0 <= base_rps <= peak_rps and peak_rps > 0, got {base_rps}, {peak_rps}")
    rate = scenario_rate(kind, duration_s, base_rps, peak_rps)
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(peak_rps)
        if t >= duration_s:
            return arrivals
        if rng.random() * peak_rps < rate(t):
            arrivals.append(Arrival(t, images, steps))
