"""What every lab controller scales: a fleet (simulated, or of worker processes) as a scale target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ScaleTarget(Protocol):
    """What the controller scales: the count it asked for, the count ready, and the knob."""

    @property
    def desired(self) -> int: ...

    def ready_count(self) -> int: ...

    def scale_to(self, replicas: int) -> None: ...


class FleetTarget:
    """A fleet (simulated or of worker processes) as KEDA's and every controller's scale target:
    applies a new count, counts the changes, and tells `on_change` (the stack republishes its
    service discovery there)."""

    def __init__(self, fleet: ScaleTarget, on_change: Callable[[], None] | None = None) -> None:
        self.fleet = fleet
        self.on_change = on_change
        self.events = 0  # scale changes applied

    @property
    def desired(self) -> int:
        return self.fleet.desired

    def ready_count(self) -> int:
        return self.fleet.ready_count()

    def scale_to(self, replicas: int) -> None:
        if replicas == self.fleet.desired:
            return
        self.fleet.scale_to(replicas)
        self.events += 1
        if self.on_change is not None:
            self.on_change()
