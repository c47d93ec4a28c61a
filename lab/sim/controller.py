"""The interface every simulated policy implements, and the periodic kind most baselines are."""

from __future__ import annotations

from lab.target import FleetTarget
from lab.sim.observe import Observation


class Controller:
    """A policy: sees every scrape's observation and scales the target when its schedule says."""

    name = "controller"
    window_s = 60.0  # the window of its rate and quantile queries

    def step(self, observation: Observation, target: FleetTarget) -> None:
        raise NotImplementedError


class PeriodicController(Controller):
    """A controller that decides every `period_s` from the latest observation."""

    period_s = 15.0

    def __init__(self) -> None:
        self._next = 0.0

    def step(self, observation: Observation, target: FleetTarget) -> None:
        if observation.t >= self._next:
            self._next = observation.t + self.period_s
            target.scale_to(self.desired(observation))

    def desired(self, observation: Observation) -> int:
        raise NotImplementedError
