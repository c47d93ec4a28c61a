"""The simulated batching fleet as timelines."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from lab.sim.fleet import BatchProfile, Fleet, FleetSpec, StartupDelay
from lab.sim.traces import Arrival


def fleet(replicas: int = 1, **spec) -> Fleet:
    simulated = Fleet(FleetSpec(**spec))
    simulated.scale_to(replicas, startup_s=0)
    return simulated


def test_the_profile_interpolates_the_h100_table_and_scales_with_steps():
    profile = BatchProfile()
    assert profile.seconds(12, 20) == 1.85 and profile.seconds(12, 40) == 3.70
    assert profile.seconds(10, 20) == pytest.approx((1.42 + 1.85) / 2)
    assert profile.utilization_percent(1) == 27 and profile.utilization_percent(16) == 96
    assert profile.seconds(64, 20) == pytest.approx(2 * 4.55)  # beyond the table: the last throughput


def test_a_saturated_replica_runs_at_the_tables_throughput():
    simulated = fleet(max_batch=12, max_queue_images=10_000)
    simulated.offer(Arrival(0.0) for _ in range(1200))
    simulated.run_until(1000)
    done = [r.finished_s for r in simulated.requests]
    assert all(done)
    assert 1200 / max(done) == pytest.approx(12 / 1.85, rel=0.01)


def test_a_lone_request_waits_max_wait_and_a_full_batch_goes_at_once():
    simulated = fleet(max_batch=4, max_wait_s=0.05)
    simulated.offer([Arrival(1.0)])
    simulated.offer(Arrival(5.0) for _ in range(4))
    simulated.run_until(20)
    assert simulated.requests[0].started_s == pytest.approx(1.05)
    assert {r.started_s for r in simulated.requests[1:]} == {5.0}
    assert simulated.requests[1].finished_s == pytest.approx(5.0 + 1.18)


def test_requests_of_other_steps_wait_for_their_own_batch():
    simulated = fleet(max_batch=8, max_wait_s=0.05)
    simulated.offer([Arrival(0.0, steps=20), Arrival(0.0, steps=40), Arrival(0.0, steps=20)])
    simulated.run_until(100)
    first, other, third = simulated.requests
    assert first.started_s == third.started_s == 0.05
    assert other.started_s == pytest.approx(first.finished_s)


def test_a_full_queue_rejects():
    simulated = fleet(max_batch=1, max_queue_images=3)
    simulated.offer(Arrival(0.0) for _ in range(6))
    simulated.run_until(100)
    assert [r.rejected for r in simulated.requests] == [False, False, False, False, True, True]


def test_the_router_sends_each_request_to_the_least_loaded_replica():
    simulated = fleet(replicas=3, max_batch=1, max_wait_s=0)
    simulated.offer(Arrival(0.0) for _ in range(9))
    simulated.run_until(0.0)
    assert sorted(r.in_flight() for r in simulated.replicas) == [3, 3, 3]


def test_a_new_replica_serves_only_after_its_startup_delay():
    simulated = Fleet(FleetSpec(max_wait_s=0))
    simulated.scale_to(1, startup_s=30)
    simulated.offer([Arrival(5.0)])
    simulated.run_until(100)
    assert simulated.requests[0].started_s == 30.0


def test_a_drained_replica_finishes_its_queue_then_leaves_and_stops_costing():
    simulated = fleet(replicas=2, max_batch=1, max_wait_s=0)
    simulated.offer(Arrival(0.0) for _ in range(4))
    simulated.run_until(0.0)
    simulated.scale_to(1)
    simulated.run_until(100)
    newest = simulated.replicas[1]
    assert newest.draining and newest.gone_s == pytest.approx(2 * 1.07)
    assert all(r.finished_s for r in simulated.requests)
    assert simulated.gpu_hours(3600) == pytest.approx((3600 + 2 * 1.07) / 3600)


def test_startup_delays_follow_the_median_and_p99():
    rng = random.Random(3)
    draws = sorted(StartupDelay(23, 52).draw(rng) for _ in range(20_000))
    assert statistics.median(draws) == pytest.approx(23, rel=0.03)
    assert draws[int(0.99 * len(draws))] == pytest.approx(52, rel=0.06)


def test_a_profile_file_round_trips_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(BatchProfile().to_json()))
    assert BatchProfile.from_file(path) == BatchProfile()
    path.write_text(json.dumps({"reference_steps": 8, "batches": [{"batch": 4, "seconds": 0.5}, {"batch": 1, "seconds": 0.2}]}))
    loaded = BatchProfile.from_file(path)
    assert loaded.seconds(4, 8) == 0.5 and loaded.seconds(1, 16) == pytest.approx(0.4)
    for bad in ("not json", json.dumps({"batches": []}), json.dumps({"batches": [{"batch": 1}]}),
                json.dumps({"batches": [{"batch": 1, "seconds": -1}]}),
                json.dumps({"batches": [{"batch": 1, "seconds": 1}, {"batch": 1, "seconds": 2}]})):
        path.write_text(bad)
        with pytest.raises(ValueError, match=str(path)):
            BatchProfile.from_file(path)
