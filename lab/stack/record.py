"""A local-stack run written down for the replay simulator (`lab.sim.replay.replay_record`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lab.stack.load import LoadStats
from lab.stack.workers import WorkerFleet
from lab.timeline import TimelinePoint


def write_record(path: Path, settings: Mapping, metadata: Mapping[str, str], points: Sequence[TimelinePoint],
                 stats: LoadStats, fleet: WorkerFleet, batches: Mapping[str, float] | None,
                 exported: Mapping | None = None) -> None:
    """What a replay of this run needs: the settings, the arrivals as sent, the replicas over
    time, the workers' start-up delays, their batches as Prometheus saw them, and what they
    exported of their capacity (`Sampler.exported`: throughput by batch size, start-up seconds)."""
    path.write_text(json.dumps({
        "settings": dict(settings),
        "metadata": dict(metadata),
        "arrivals": stats.arrivals,
        "timeline": [{"t": p.t, "desired": p.desired, "ready": p.signals.ready_replicas} for p in points],
        "startup_delays_s": fleet.startup_delays,
        "batches": batches,
        "exported": exported,
        "requests": {"sent": stats.sent, "ok": stats.ok, "failed": stats.failed},
    }, indent=1))
