"""KEDA's loop for one ScaledObject, shared by the local stack and the replay simulator, as timelines."""

from __future__ import annotations

from lab.hpa import PASS_THROUGH
from lab.keda import KedaLoop


class FakeScaler:
    def __init__(self, value: float | None, active: bool = True, target: float = 1.0) -> None:
        self.value, self.active, self.target = value, active, target
        self.calls: list[str] = []

    def metric_target(self) -> float:
        return self.target

    def is_active(self) -> bool:
        self.calls.append("IsActive")
        return self.active

    def metric(self) -> float:
        self.calls.append("GetMetrics")
        if self.value is None:
            raise RuntimeError("UNAVAILABLE")
        return self.value


class Target:
    def __init__(self, replicas: int) -> None:
        self.desired = replicas
        self.changes: list[int] = []

    def ready_count(self) -> int:
        return self.desired

    def scale_to(self, replicas: int) -> None:
        self.desired = replicas
        self.changes.append(replicas)


def run(loop: KedaLoop, target: Target, seconds: range) -> list:
    loop.start(seconds[0])
    return [tick for t in seconds if (tick := loop.step(float(t), target)) is not None]


def test_polls_activity_every_polling_interval_and_syncs_every_sync_period():
    scaler = FakeScaler(3.0)
    loop = KedaLoop(scaler, 1, 10, PASS_THROUGH, polling_interval_s=30, sync_period_s=15)
    ticks = run(loop, Target(1), range(0, 61))
    assert [tick.t for tick in ticks] == [0, 15, 30, 45, 60]
    assert scaler.calls.count("IsActive") == 3  # t = 0, 30, 60
    assert scaler.calls.count("GetMetrics") == 5
    assert ticks[0].desired == 3


def test_a_failed_metric_keeps_the_replica_count():
    scaler = FakeScaler(None)
    target = Target(4)
    ticks = run(KedaLoop(scaler, 1, 10, PASS_THROUGH), target, range(0, 31))
    assert [tick.desired for tick in ticks] == [4, 4, 4] and target.changes == []
    assert all(tick.metric is None for tick in ticks)


def test_with_cached_metrics_the_hpa_sees_the_value_of_the_last_poll():
    scaler = FakeScaler(2.0)
    target = Target(1)
    loop = KedaLoop(scaler, 1, 10, PASS_THROUGH, polling_interval_s=30, sync_period_s=15, use_cached_metrics=True)
    loop.start(0)
    loop.step(0, target)
    scaler.value = 6.0  # changes right after the poll
    assert loop.step(15, target).desired == 2  # still the polled value
    assert loop.step(30, target).desired == 6  # the next poll brought it
    assert scaler.calls.count("GetMetrics") == 2


def test_activation_scales_from_zero_at_the_next_poll_and_to_zero_after_the_cooldown():
    scaler = FakeScaler(1.0, active=False)
    target = Target(0)
    loop = KedaLoop(scaler, 0, 10, PASS_THROUGH, polling_interval_s=10, sync_period_s=15, cooldown_s=60)
    loop.start(0)
    for t in range(0, 20):
        loop.step(float(t), target)
    assert target.desired == 0  # never active: stays at zero
    scaler.active = True
    for t in range(20, 31):
        loop.step(float(t), target)
    assert target.changes == [1]  # the poll at 20 s saw activity
    scaler.active = False
    for t in range(31, 120):
        loop.step(float(t), target)
    # last active at the 20 s poll; the first inactive poll at least 60 s later (80 s) scales to zero
    assert target.changes == [1, 0]


def test_with_a_minimum_above_zero_activity_never_scales():
    scaler = FakeScaler(None, active=False)
    target = Target(2)
    run(KedaLoop(scaler, 2, 10, PASS_THROUGH, polling_interval_s=5, cooldown_s=10), target, range(0, 100))
    assert target.changes == []
