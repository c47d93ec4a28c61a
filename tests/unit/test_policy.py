"""Timeline tests of the pure decision core: `now + N s -> expect R replicas`."""

from __future__ import annotations

import pytest

import math

from adapter.policy import (
    MIN_GAPS, PolicySpec, PolicyState, Signals, capacity_need, decide, demand_trend, keep_warm_s, proposals,
)


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
    kwargs.setdefault("queue_smoothing_s", 0.0)  # the instant queue, likewise
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
    line = Timeline(spec(activation_queue=2, keep_warm_max_s=0))  # the keep-warm hold off: tested below
    line.at(0, queue=2, ready_replicas=1)
    assert not line.last.active
    line.at(5, queue=3, ready_replicas=1)
    assert line.last.active


def test_history_is_kept_only_for_the_longest_window():
    line = Timeline(spec(scale_up_window_s=30, scale_down_window_s=60))
    for _ in range(100):
        line.at(5, queue=8, ready_replicas=1)
    assert len(line.state.window) == 12


# --- the capacity signal (issue 14) ----------------------------------------------------------

# One replica serves 130 image-steps per second at its max batch (the H100 table: 12 images x 20
# steps in 1.85 s); requests are 1 image x 20 steps.
CAP = 130.0


def test_capacity_divides_demand_by_what_one_replica_serves_at_the_target_utilization():
    need = capacity_need(spec(target_capacity_utilization=0.8, headroom_sigmas=0),
                         Signals(queue=0, ready_replicas=2, demand=208.0, arrivals=10.4, capacity=CAP, startup_s=30))
    assert need == pytest.approx(208 / (130 * 0.8))  # 2.0: two replicas at 80 %


def test_capacity_leads_a_rising_demand_by_one_start_up_delay():
    signals = Signals(queue=0, ready_replicas=2, demand=208.0, arrivals=10.4, capacity=CAP, startup_s=30.0)
    flat = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=0), signals, trend=0.0)
    rising = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=0), signals, trend=2.0)
    assert rising - flat == pytest.approx(2.0 * 30 / 130)  # 60 image-steps/s more by the time a replica serves
    falling = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=0), signals, trend=-5.0)
    assert falling == flat  # a falling trend never sheds ahead of the demand


def test_capacity_headroom_is_poisson_spread_over_the_start_up_delay():
    signals = Signals(queue=0, ready_replicas=1, demand=40.0, arrivals=2.0, capacity=CAP, startup_s=20.0)
    none = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=0), signals)
    two = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=2), signals)
    assert two - none == pytest.approx(2 * math.sqrt(40 * 20 / 20) / 130)


def test_capacity_drains_what_is_in_flight_within_the_objective():
    signals = Signals(queue=39, ready_replicas=1, demand=0.0, arrivals=0.0, capacity=CAP, startup_s=30)
    assert capacity_need(spec(headroom_sigmas=0), signals) == 0.0  # no arrivals: no request size to drain by
    signals = Signals(queue=39, ready_replicas=1, demand=20.0, arrivals=1.0, capacity=CAP, startup_s=30)
    need = capacity_need(spec(target_capacity_utilization=1.0, headroom_sigmas=0, target_p95_seconds=6), signals)
    assert need == pytest.approx(20 / 130 + 39 * 20 / (130 * 6))  # 39 requests of 20 image-steps in 6 s


@pytest.mark.parametrize("missing", ["demand", "arrivals", "capacity", "startup_s"])
def test_capacity_abstains_without_its_measurements(missing):
    values = dict(queue=5, ready_replicas=1, demand=40.0, arrivals=2.0, capacity=CAP, startup_s=30.0)
    values[missing] = None
    got = proposals(spec(signals=("queue", "capacity")), Signals(**values))
    assert "capacity" not in got and got["queue"] == 1  # absent is not zero: the other signals decide


def test_a_request_in_flight_needs_a_replica_even_when_its_rate_rounds_to_none():
    got = proposals(spec(signals=("capacity",)), Signals(queue=1, ready_replicas=0, demand=0.3, arrivals=0.02,
                                                        capacity=CAP, startup_s=30))
    assert got["capacity"] == 1


def test_the_demand_trend_is_the_least_squares_slope():
    assert demand_trend(((0.0, 10.0), (5.0, 20.0), (10.0, 30.0))) == pytest.approx(2.0)
    assert demand_trend(((0.0, 10.0),)) == 0.0
    assert demand_trend(((3.0, 10.0), (3.0, 50.0))) == 0.0


def test_decide_fits_the_trend_over_the_trend_window_only():
    line = Timeline(spec(signals=("capacity",), trend_window_s=12, target_capacity_utilization=1.0,
                         headroom_sigmas=0))
    for demand in (100.0, 100.0, 100.0, 200.0, 300.0):  # every 5 s
        line.at(5, queue=0, ready_replicas=2, demand=demand, arrivals=5.0, capacity=CAP, startup_s=10.0)
    assert [d for _, d in line.state.demand_history] == [100.0, 200.0, 300.0]  # 12 s: the last three
    assert line.last.proposals["capacity"] == math.ceil((300 + 20 * 10) / 130)  # slope 20/s, 10 s ahead


# --- the spare only where measured load needs it -------------------------------------------


def test_the_spare_holds_only_while_demand_is_a_real_share_of_a_replica():
    busy_spec = spec(min_busy_replicas=2, spare_above_load=0.2)
    trickle = Signals(queue=1, ready_replicas=1, demand=0.02 * CAP, arrivals=0.1, capacity=CAP)
    assert proposals(busy_spec, trickle)["queue"] == 1
    loaded = Signals(queue=1, ready_replicas=1, demand=0.3 * CAP, arrivals=2.0, capacity=CAP)
    assert proposals(busy_spec, loaded)["queue"] == 2
    unmeasured = Signals(queue=1, ready_replicas=1)
    assert proposals(busy_spec, unmeasured)["queue"] == 2  # no measurement: the spare holds, as before


# --- scale to zero, chosen: the keep-warm hold -----------------------------------------------


def test_no_hold_when_a_cold_start_meets_the_objective():
    assert keep_warm_s(spec(target_p95_seconds=10), Signals(queue=0, ready_replicas=1, startup_s=8.0), ()) == 0.0


def test_the_hold_is_the_longest_gap_seen_times_the_multiple_capped():
    slow = Signals(queue=0, ready_replicas=1, startup_s=30.0)
    gaps = tuple(float(g) for g in range(10, 10 + MIN_GAPS))
    assert keep_warm_s(spec(keep_warm_multiple=2, keep_warm_max_s=3600), slow, gaps) == 2 * (9 + MIN_GAPS)
    assert keep_warm_s(spec(keep_warm_multiple=2, keep_warm_max_s=40), slow, gaps) == 40
    assert keep_warm_s(spec(keep_warm_quantile=0.5, keep_warm_multiple=1, keep_warm_max_s=3600), slow, gaps) == 10 + MIN_GAPS // 2 - 1
    assert keep_warm_s(spec(keep_warm_max_s=900), slow, gaps[:MIN_GAPS - 1]) == 900  # too few gaps: the cap


def test_an_idle_fleet_stays_active_through_the_hold_then_lets_go():
    line = Timeline(spec(keep_warm_multiple=1, keep_warm_max_s=3600))
    idle = dict(queue=0, ready_replicas=1, demand=0.0, arrivals=0.0, capacity=CAP, startup_s=30.0)
    for _ in range(MIN_GAPS):  # requests every 60 s: idle gaps of 60 s
        line.at(5, **{**idle, "queue": 1, "arrivals": 0.1})
        line.at(55, **idle)
    assert max(line.state.idle_gaps) == 60 and len(line.state.idle_gaps) == MIN_GAPS - 1
    line.at(5, **{**idle, "queue": 1, "arrivals": 0.1})
    assert line.last.active and not line.last.kept_warm
    line.at(40, **idle)
    assert line.last.active and line.last.kept_warm  # 40 s idle: within the longest gap seen
    line.at(25, **idle)
    assert not line.last.active  # 65 s idle: beyond it, KEDA's cooldown may take the fleet to zero
    line.at(5, **{**idle, "ready_replicas": 0})
    assert not line.last.kept_warm  # nothing to keep warm at zero


# --- a smoother queue signal, the burst response kept --------------------------------------


def test_the_queue_signal_reads_the_mean_over_the_smoothing_window_but_a_burst_at_once():
    line = Timeline(spec(signals=("queue",), target_queue_per_replica=8, queue_smoothing_s=20, burst_factor=2))
    flapping = [8, 24, 8, 24]  # 1 and 3 replicas' worth, every 5 s
    values = [line.at(5, queue=q, ready_replicas=2) for q in flapping]
    assert values[1] == 2  # mean of 8 and 24 is 16: two replicas, where the instant gauge said three
    assert [q for _, q in line.state.queue_history] == [8, 24, 8, 24]
    line.at(5, queue=48, ready_replicas=2)  # 6 replicas' worth, 3x ready: a burst goes through at once
    assert line.last.burst and line.last.proposals["queue"] == 6
    instant = Timeline(spec(signals=("queue",), target_queue_per_replica=8, queue_smoothing_s=0, burst_factor=2))
    assert [instant.at(5, queue=q, ready_replicas=2) for q in flapping][1] == 3  # the instant gauge: 3
