"""One timeline for every lab run: the replay simulator's policies and the local stack alike.

A point per sample of replicas asked for and ready, offered load, the signals the scaler read
and, where the scaler's own decision is known, each signal's proposal; `write_timeline` draws
them as one PNG of three panels (replicas, queue, latency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adapter.policy import Decision, Signals
from contract.names import SIGNALS


@dataclass(frozen=True)
class TimelinePoint:
    """The fleet and its signals at `t` seconds from the start of a run."""

    t: float
    desired: int  # replicas asked for (a Deployment's spec.replicas)
    arrivals_per_s: float  # offered load
    signals: Signals  # ready replicas, requests in flight, p95 (NaN where it was not read)
    busy: float | None = None  # the pipelines' busy fraction, where measured
    decision: Decision | None = None  # the scaler's, where it runs in process


def _values(values) -> list[float]:
    return [math.nan if v is None else v for v in values]


def write_timeline(points: Sequence[TimelinePoint], path: Path | str, title: str, slo_s: float | None = None,
                   minutes: bool = False, queue_label: str = "requests in flight") -> Path:
    """Draws `points` as a PNG at `path` (its folder is created), time in minutes or seconds, with
    the objective `slo_s` drawn where given; `queue_label` names what the queue signal counted
    (the workers' requests in flight, or a job stream's backlog); needs matplotlib (the `stack` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = [p.t / 60 if minutes else p.t for p in points]
    figure, (replicas, queue, latency) = plt.subplots(3, 1, sharex=True, figsize=(10, 7))
    replicas.step(t, [p.desired for p in points], where="post", label="replicas asked for")
    replicas.step(t, [p.signals.ready_replicas for p in points], where="post", label="replicas ready")
    replicas.set_ylabel("replicas")
    replicas.legend(loc="upper left")
    rate = replicas.twinx()
    rate.plot(t, [p.arrivals_per_s for p in points], color="0.6", linewidth=0.7)
    rate.set_ylabel("arrivals/s")
    queue.plot(t, _values(p.signals.queue for p in points), label=queue_label)
    if any(p.decision is not None for p in points):
        for signal in SIGNALS:
            queue.plot(t, _values(p.decision.proposals.get(signal) if p.decision else None for p in points), "--",
                       label=f"{signal} proposal")
    queue.set_ylabel("requests / replicas")
    queue.legend(loc="upper left")
    latency.plot(t, _values(p.signals.p95_seconds for p in points), label="p95 latency")
    if slo_s is not None:
        latency.axhline(slo_s, color="red", linestyle=":", label=f"objective {slo_s:g} s")
    if any(p.busy is not None for p in points):
        latency.plot(t, _values(p.busy for p in points), label="busy fraction")
    latency.set_ylabel("seconds")
    latency.set_xlabel("minutes" if minutes else "seconds")
    latency.legend(loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
