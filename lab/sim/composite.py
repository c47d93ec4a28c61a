"""Our scaler in the simulator: its own parser, its own refresh step, KEDA's loop and the HPA.

The trigger metadata goes through `adapter.config.parse_metadata`; a simulated refresher feeds
each observation, every `refreshSeconds`, to the scaler's own `adapter.targets.Target` (which
runs `adapter.policy.decide` and keeps the snapshot the RPCs answer from); KEDA's loop
(`lab.keda.KedaLoop`, the one the local stack runs over gRPC) polls that cache and feeds the HPA
algorithm (`lab.hpa`) with the pass-through behavior of our ScaledObject.
"""

from __future__ import annotations

from collections.abc import Mapping

from adapter.config import ScalerSpec, parse_duration_seconds, parse_metadata
from adapter.reading import Reading
from adapter.targets import Target
from lab.hpa import PASS_THROUGH
from lab.keda import KedaLoop
from lab.target import FleetTarget
from lab.sim.controller import Controller
from lab.sim.observe import Observation
from lab.sim.shipped import (
    SHIPPED_POLLING_INTERVAL_S, SHIPPED_QUEUE_COOLDOWN_PERIOD_S, SHIPPED_QUEUE_POLLING_INTERVAL_S,
)


class SimulatedScaler:
    """The scaler's refresher in process: every `refreshSeconds` the observed signals go to the
    scaler's own `Target`, and KEDA's calls are answered from its snapshot, as the service does."""

    def __init__(self, spec: ScalerSpec, name: str = "composite") -> None:
        self.spec = spec
        self.target = Target(("simulated", name, ()), "simulated", name, spec, now=0.0)
        self._next_refresh = 0.0
        self._now = 0.0

    def refresh(self, o: Observation) -> None:
        self._now = o.t
        if o.t < self._next_refresh:
            return
        self._next_refresh = o.t + self.spec.refresh_s
        self.target.apply(Reading(o.signals, ()), o.t)

    def metric_target(self) -> float:
        return 1.0  # the composite is in replicas; GetMetricSpec's targetSizeFloat

    def is_active(self) -> bool:
        snapshot = self.target.snapshot
        return snapshot is not None and snapshot.decision.active

    def metric(self) -> float:
        """The value GetMetrics would answer; raises `adapter.targets.Unavailable` when there is none."""
        return self.target.current(self._now).decision.value


class CompositeController(Controller):
    """The scaler's decision core behind its cache, polled by KEDA, applied by the HPA.

    KEDA's `polling_interval_s` defaults to what ships: the base ScaledObject's 15 s, or the
    queue overlay's 5 s at `min_replicas` 0; `cooldown_s` (1 -> 0, so only at min 0) to the
    overlay's 900 s."""

    name = "composite"

    def __init__(self, metadata: Mapping[str, str], min_replicas: int, max_replicas: int,
                 polling_interval_s: float | None = None, sync_period_s: float = 15.0,
                 name: str = "composite", cooldown_s: float = SHIPPED_QUEUE_COOLDOWN_PERIOD_S) -> None:
        if polling_interval_s is None:
            polling_interval_s = shipped_polling_interval_s(min_replicas)
        self.name = name
        self.spec = composite_spec(metadata)
        self.window_s = parse_duration_seconds(self.spec.window)
        self.scaler = SimulatedScaler(self.spec, name)
        self.keda = KedaLoop(self.scaler, min_replicas, max_replicas, PASS_THROUGH, polling_interval_s, sync_period_s,
                             cooldown_s)
        self._started = False

    def step(self, o: Observation, target: FleetTarget) -> None:
        self.scaler.refresh(o)
        if not self._started:
            self.keda.start(o.t)
            self._started = True
        self.keda.step(o.t, target)


def shipped_polling_interval_s(min_replicas: int) -> float:
    """KEDA's pollingInterval as it ships for a composite at `min_replicas`: the queue
    overlay's at 0, the base ScaledObject's otherwise; seconds."""
    return SHIPPED_QUEUE_POLLING_INTERVAL_S if min_replicas == 0 else SHIPPED_POLLING_INTERVAL_S


def composite_spec(metadata: Mapping[str, str]) -> ScalerSpec:
    """Trigger metadata through the scaler's own parser; the address is a placeholder, as
    nothing is queried. Raises `adapter.config.MetadataError` naming a bad key."""
    return parse_metadata({"prometheusAddress": "http://simulated:9090", **metadata})
