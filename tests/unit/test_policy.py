"""Timeline tests of the pure decision core: `now + N s -> expect R replicas`."""

from __future__ import annotations

import pytest

from adapter.policy import PolicySpec, PolicyState, Signals, decide, proposals


class Timeline:
    """Feeds observations to the core at chosen times, carrying its state like the refresher."""

    def __init__(self, spec: PolicySpec, start: float = 1000.0):
        self.spec = spec
        self.now = start
        self.state = PolicyState()
        self.last = None

    def at(self, seconds_later: float, **signals) -> float:
        self.now += seconds_later
        signals.setdefault("queue", 0.0)
        signals.setdefault("ready_replicas", 0.0)
        self.last = decide(self.spec, Signals(**signals), self.state, self.now)
        self.state = self.last.state
        return self.last.value


def spec(**kwargs) -> PolicySpec:
    kwargs.setdefault("signals", ("queue", "gpu", "latency"))
    kwargs.setdefault("target_p95_seconds", 10.0)
    kwargs.setdefault("scale_down_window_s", 0.0)
    kwargs.setdefault("min_busy_replicas", 1)  # off, so each test sees the mechanism it names; see below
    return PolicySpec(**kwargs)


# --- proposals -------------------------------------------------------------------------


def test_queue_proposes_the_ceiling_of_queue_over_the_target():
    assert proposals(spec(target_queue_per_replica=8), Signals(queue=17, ready_replicas=1))["queue"] == 3


def test_gpu_scales_ready_replicas_by_utilization_over_the_target():
    got = proposals(spec(), Signals(queue=0, ready_replicas=3, gpu_util_percent=90))
    assert got["gpu"] == 4  # 3 x 90 / 75 = 3.6


def test_exact_multiples_do_not_round_up_through_float_error():
    got = proposals(spec(target_gpu_util_percent=70), Signals(queue=0, ready_replicas=7, gpu_util_percent=70))
    assert got["gpu"] == 7


def test_latency_scales_ready_replicas_by_p95_over_the_objective():
    got = proposals(spec(target_p95_seconds=4), Signals(queue=40, ready_replicas=2, p95_seconds=9))
    assert got["latency"] == 5  # 2 x 9 / 4 = 4.5


def test_latency_cannot_grow_the_fleet_on_a_lagging_window():
    slow = spec(target_p95_seconds=5)  # targetQueuePerReplica 8
    # a backlog just cleared: p95 over the window still reads 30 s, little is in flight
    assert proposals(slow, Signals(queue=3, ready_replicas=8, p95_seconds=30))["latency"] == 8  # holds, not 48
    # the queue fills the ready replicas exactly (slow requests): one more replica per decision
    assert proposals(slow, Signals(queue=64, ready_replicas=8, p95_seconds=30))["latency"] == 9
    # a real backlog: one beyond what the queue needs
    assert proposals(slow, Signals(queue=80, ready_replicas=8, p95_seconds=30))["latency"] == 11


def test_while_requests_are_in_flight_the_queue_asks_for_at_least_min_busy_replicas():
    busy = spec(min_busy_replicas=2)
    assert proposals(busy, Signals(queue=1, ready_replicas=1))["queue"] == 2
    assert proposals(busy, Signals(queue=0, ready_replicas=2))["queue"] == 0  # idle: down to minReplicas
    assert proposals(busy, Signals(queue=40, ready_replicas=2))["queue"] == 5  # above it, the target rules
    assert PolicySpec().min_busy_replicas == 2  # the default


def test_signals_without_data_abstain_and_disabled_signals_are_ignored():
    got = proposals(spec(signals=("queue", "gpu")), Signals(queue=8, ready_replicas=2, p95_seconds=100))
    assert got == {"queue": 1}


# --- composite -------------------------------------------------------------------------


def test_max_mode_takes_the_largest_proposal_and_names_it():
    line = Timeline(spec())
    assert line.at(0, queue=8, ready_replicas=2, gpu_util_percent=100, p95_seconds=5) == 3
    assert line.last.limiting == "gpu"
    assert line.last.proposals == {"queue": 1, "gpu": 3, "latency": 1}


def test_weighted_mode_takes_the_weighted_mean():
    line = Timeline(spec(combine="weighted", weights={"queue": 2, "gpu": 1, "latency": 1}))
    # proposals: queue 4, gpu 2, latency 1 -> (2*4 + 2 + 1) / 4
    assert line.at(0, queue=32, ready_replicas=2, gpu_util_percent=75, p95_seconds=5) == pytest.approx(2.75)


def test_weighted_mode_ignores_signals_without_data():
    line = Timeline(spec(combine="weighted", weights={"queue": 1, "gpu": 3, "latency": 1}))
    assert line.at(0, queue=16, ready_replicas=0) == 2


def test_no_data_from_any_signal_holds_the_current_value():
    line = Timeline(spec(signals=("gpu",)))
    assert line.at(0, ready_replicas=4, gpu_util_percent=75) == 4
    assert line.at(5, ready_replicas=4) == 4  # the GPU series vanished: no evidence, no change
    assert line.last.limiting == "none"


# --- stabilization ---------------------------------------------------------------------


def test_scale_down_waits_for_the_whole_window():
    line = Timeline(spec(scale_down_window_s=300))
    assert line.at(0, queue=80, ready_replicas=10) == 10
    assert line.at(60, queue=8, ready_replicas=10) == 10
    assert line.last.held_by == "scale_down_window"
    assert line.at(239, queue=8, ready_replicas=10) == 10  # t=299: the 10 is still inside
    assert line.last.held_by in ("scale_down_window", "restart_hold")
    assert line.at(1, queue=8, ready_replicas=10) == 1  # t=300: it just left


def test_scale_down_follows_the_highest_recommendation_in_the_window():
    line = Timeline(spec(scale_down_window_s=60))
    assert line.at(0, queue=80) == 10  # t=0
    assert line.at(30, queue=40) == 10  # t=30: 5 proposed, the 10 holds
    assert line.at(29, queue=8) == 10  # t=59: the 10 is still inside
    # t=60: a sample counts while t > now - window, so the 10 (t=0) has left and the
    # highest left inside is the 5 from t=30
    assert line.at(1, queue=8) == 5
    assert line.last.held_by == "scale_down_window"
    assert line.at(30, queue=8) == 1  # t=90: the 5 has left too


def test_scale_up_window_waits_for_low_recommendations_to_leave():
    line = Timeline(spec(scale_up_window_s=60, burst_factor=100))
    assert line.at(0, queue=16, ready_replicas=2) == 2
    assert line.at(10, queue=48, ready_replicas=2) == 2  # 6 proposed, the 2 at t=0 is in the window
    assert line.last.held_by == "scale_up_window"
    assert line.at(49, queue=48, ready_replicas=2) == 2  # t=59
    assert line.at(1, queue=48, ready_replicas=2) == 6  # t=60: the 2 left


def test_a_burst_skips_the_scale_up_window():
    line = Timeline(spec(scale_up_window_s=60, burst_factor=2))
    assert line.at(0, queue=16, ready_replicas=2) == 2
    assert line.at(5, queue=32, ready_replicas=2) == 4  # queue proposes 4 >= 2 x 2 ready
    assert line.last.burst


def test_growth_below_the_burst_factor_still_waits():
    line = Timeline(spec(scale_up_window_s=60, burst_factor=2))
    line.at(0, queue=16, ready_replicas=2)
    assert line.at(5, queue=24, ready_replicas=2) == 2  # 3 < 2 x 2
    assert not line.last.burst


def test_scale_from_zero_is_a_burst():
    line = Timeline(spec(scale_up_window_s=120))
    assert line.at(0, queue=0, ready_replicas=0) == 0
    assert line.at(5, queue=1, ready_replicas=0) == 1


def test_after_a_restart_never_fewer_than_ready_until_one_down_window_of_history():
    line = Timeline(spec(scale_down_window_s=120))
    assert line.at(0, queue=0, ready_replicas=6) == 6
    assert line.last.held_by == "restart_hold"
    assert line.at(119, queue=0, ready_replicas=6) == 6
    assert line.at(1, queue=0, ready_replicas=6) == 0  # t=120: one window of history exists


def test_no_restart_hold_without_a_scale_down_window():
    line = Timeline(spec(scale_down_window_s=0))
    assert line.at(0, queue=8, ready_replicas=6) == 1


# --- clamps and activity ---------------------------------------------------------------


def test_min_and_max_clamp_the_composite():
    line = Timeline(spec(min_replicas=2, max_replicas=5))
    assert line.at(0, queue=0, ready_replicas=0) == 2
    assert line.last.held_by == "min_replicas"
    assert line.at(5, queue=800, ready_replicas=2) == 5
    assert line.last.composite == 5
    assert line.last.held_by == "max_replicas"


def test_max_replicas_caps_the_restart_hold_too():
    line = Timeline(spec(scale_down_window_s=300, max_replicas=3))
    assert line.at(0, queue=0, ready_replicas=8) == 3


def test_activity_follows_the_activation_queue():
    line = Timeline(spec(activation_queue=2))
    line.at(0, queue=2, ready_replicas=1)
    assert not line.last.active
    line.at(5, queue=3, ready_replicas=1)
    assert line.last.active


def test_history_is_kept_only_for_the_longest_window():
    line = Timeline(spec(scale_up_window_s=30, scale_down_window_s=60))
    for _ in range(100):
        line.at(5, queue=8, ready_replicas=1)
    assert len(line.state.window) == 12
