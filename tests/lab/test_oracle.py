"""The yardsticks: the clairvoyant oracle as timelines, the work bound, and the ratio to the oracle."""

from __future__ import annotations

import json

import pytest

from lab.sim import cli
from lab.sim.fleet import Fleet, FleetSpec, StartupDelay
from lab.sim.observe import Observer
from lab.sim.oracle import ORACLE, ORACLE_MIN0, OracleController, best_batch, cheapest_best, work_bound_gpu_hours
from lab.sim.replay import Job, Setup, replay, run_job, run_jobs
from lab.sim.report import PolicyResult, markdown
from lab.sim.traces import Arrival, synthetic
from lab.target import FleetTarget

STARTUP_20_S = StartupDelay(20.0, 20.0)  # every replica ready 20 s after it is asked for
RATE_AT_12 = 12 * 20 / 1.85  # image-steps per second of a batch of 12 on the H100 table


def drive(controller: OracleController, arrivals: list[Arrival], spec: FleetSpec, seconds: int,
          opening: int) -> tuple[Fleet, list[int]]:
    """The replay loop, second by second, checking at each that the oracle's plan is the fleet's:
    the ready times it expects are those the fleet drew. Returns the fleet and the replicas asked
    for at each second."""
    fleet = Fleet(spec, seed=0)
    fleet.scale_to(opening, startup_s=0)
    fleet.offer(arrivals)
    observer, target = Observer(fleet, controller.window_s), FleetTarget(fleet)
    desired = []
    for t in range(seconds):
        fleet.run_until(t)
        controller.step(observer.observe(t), target)
        assert controller.planned_ready_s() == [r.ready_s for r in fleet.serving()], t
        desired.append(target.desired)
    return fleet, desired


def burst(start_s: float, seconds: float, rps: float) -> list[Arrival]:
    return [Arrival(start_s + i / rps) for i in range(int(seconds * rps))]


# -- the work bound ----------------------------------------------------------------------------

def test_the_best_batch_is_the_one_with_the_most_image_steps_per_second_the_fleet_can_run():
    assert best_batch(FleetSpec(max_batch=12)) == (12, pytest.approx(RATE_AT_12))
    # the H100 table's best is 32 (7.03 images/s); 16 (6.78) where a fleet runs at most 16
    assert best_batch(FleetSpec(max_batch=32)) == (32, pytest.approx(32 * 20 / 4.55))
    # a request larger than the max batch runs alone at its own size: that batch counts too
    assert best_batch(FleetSpec(max_batch=12), largest_request_images=16) == (16, pytest.approx(16 * 20 / 2.36))
    with pytest.raises(ValueError, match="at least one image"):
        best_batch(FleetSpec(), largest_request_images=0)


def test_the_work_bound_is_every_requests_image_steps_at_the_best_batch_in_hours():
    arrivals = [Arrival(float(t), images=2, steps=30) for t in range(600)]
    assert work_bound_gpu_hours(arrivals, FleetSpec(max_batch=12)) == pytest.approx(600 * 2 * 30 / RATE_AT_12 / 3600)
    assert work_bound_gpu_hours([], FleetSpec()) == 0.0


def test_every_replay_reports_the_work_bound_of_its_arrivals():
    arrivals = synthetic("step", 300, 1, 5, seed=2)
    result = replay(arrivals, OracleController(arrivals, FleetSpec(), 0, 1, 4, 10, 1.0), FleetSpec(), 10, tail_s=60)
    assert result.work_bound_gpu_hours == pytest.approx(len(arrivals) * 20 / RATE_AT_12 / 3600)
    assert result.oracle_ratio is None  # set only beside an oracle, by the command line


# -- the oracle as timelines -------------------------------------------------------------------

def test_the_oracle_starts_replicas_one_known_delay_ahead_so_they_are_ready_when_a_burst_begins():
    # 1/s, then 20/s (4 replicas of 6.5 images/s at max batch) from 300 s; start-ups drawn (23 s median)
    arrivals = burst(0, 300, 1) + burst(300, 120, 20)
    oracle = OracleController(arrivals, FleetSpec(), 0, 1, 8, 10, 1.0)
    fleet, desired = drive(oracle, arrivals, FleetSpec(), 480, opening=1)
    started = [r for r in fleet.replicas if r.created_s > 0]
    assert len(started) >= 3 and all(r.ready_s <= 300 for r in started)
    # as late as the delays allow: the fleet starts replicas in order, so those before the
    # slowest start with it, one delay (and less than a step) before the burst
    slowest = max(r.ready_s - r.created_s for r in started)
    assert all(r.created_s >= 300 - slowest - 1 for r in started) and max(r.ready_s for r in started) >= 299
    assert max(desired[:250]) == 1
    assert sum(1 for r in fleet.replicas if r.ready_s <= 300 and (r.gone_s is None or r.gone_s > 300)) >= 4
    assert all(r.finished_s is not None and r.latency_s <= 10 for r in fleet.requests)


def test_the_oracle_holds_a_replica_through_a_gap_shorter_than_a_start_up_and_releases_it_across_a_longer_one():
    spec = FleetSpec(startup=STARTUP_20_S)
    # 15/s (3 replicas) in three bursts: 15 s apart (less than a 20 s start-up), then 200 s apart
    arrivals = burst(100, 30, 15) + burst(145, 30, 15) + burst(375, 30, 15)
    oracle = OracleController(arrivals, spec, 0, 1, 8, 10, 1.0)
    _, desired = drive(oracle, arrivals, spec, 500, opening=1)
    assert desired[79] == 1 and desired[80] >= 3  # asked for 20 s ahead, ready at 100
    assert min(desired[100:175]) >= 3  # the 15 s gap is cheaper to hold than to start again
    assert desired[250] == 1  # released across the 200 s gap ...
    assert desired[354] == 1 and desired[355] >= 3  # ... and asked for again 20 s before the third burst


def test_the_oracle_at_min_0_is_at_zero_between_bursts_and_ready_for_each_on_a_queue():
    spec = FleetSpec(startup=STARTUP_20_S, pull=True)
    arrivals = burst(100, 10, 5) + burst(600, 10, 5)
    oracle = OracleController(arrivals, spec, 0, 0, 4, 10, 1.0)
    fleet, desired = drive(oracle, arrivals, spec, 800, opening=0)
    assert desired[79] == 0 and desired[80] == 1 and desired[400] == 0 and desired[580] == 1 and desired[700] == 0
    assert fleet.cold_starts == 2
    assert all(r.latency_s is not None and r.latency_s <= 10 for r in fleet.requests)


def test_the_oracle_answers_work_waiting_at_zero_at_once_where_no_plan_could_have_a_replica_ready():
    spec = FleetSpec(startup=STARTUP_20_S, pull=True)
    arrivals = [Arrival(1.0), Arrival(2.0)]  # before any start-up could end
    fleet, desired = drive(OracleController(arrivals, spec, 0, 0, 4, 10, 1.0), arrivals, spec, 60, opening=0)
    assert desired[1] == 1  # the plan asked at 0 for a replica ready at 20 s; it stays while they wait
    assert all(r.finished_s is not None for r in fleet.requests)
    assert desired[-1] == 0


def test_the_oracle_never_leaves_min_and_max_replicas():
    spec = FleetSpec(startup=STARTUP_20_S)
    arrivals = burst(50, 60, 60)  # 60/s wants 10 replicas
    _, desired = drive(OracleController(arrivals, spec, 0, 2, 5, 10, 1.0), arrivals, spec, 400, opening=2)
    assert max(desired) == 5 and min(desired) == 2


def test_on_a_step_the_oracle_meets_the_objective_for_every_request_for_less_than_a_reactive_policy():
    arrivals = synthetic("step", 900, 2, 15, seed=1)
    setup = Setup(FleetSpec(), slo_s=10, min_replicas=1, max_replicas=16, polling_interval_s=None, seed=1, tail_s=120)
    oracle, keda, composite = run_jobs(arrivals, setup, [Job(ORACLE, name=ORACLE), Job("keda-queue", name="keda-queue"),
                                                         Job("composite", name="composite")], processes=1)
    assert oracle.policy == ORACLE and oracle.slo_attainment == 1.0 and oracle.rejected == 0
    assert oracle.work_bound_gpu_hours < oracle.gpu_hours < min(keda.gpu_hours, composite.gpu_hours)
    assert oracle.slo_attainment >= max(keda.slo_attainment, composite.slo_attainment)


def test_the_oracle_at_min_0_replays_on_a_queue_and_pays_only_for_the_opening():
    arrivals = synthetic("spike", 600, 0, 15, seed=3)  # nothing, then 15/s for a minute in the middle
    setup = Setup(FleetSpec(), slo_s=10, min_replicas=1, max_replicas=16, polling_interval_s=None, seed=3, tail_s=60)
    result = run_job(arrivals, setup, Job(ORACLE, name=ORACLE_MIN0, min_replicas=0))
    assert result.policy == ORACLE_MIN0 and result.slo_attainment == 1.0
    assert result.cold_starts == 1 and result.hours_at_zero > 0
    assert result.work_bound_gpu_hours < result.gpu_hours


def test_the_search_keeps_the_cheapest_run_within_a_tenth_of_a_point_of_the_best():
    def run(slo: float, hours: float) -> PolicyResult:
        return PolicyResult(ORACLE, 100, slo, 1.0, 2.0, 3.0, 0, hours, 0.0, 0, 1, 1.0)

    runs = [run(0.9990, 3.0), run(0.9985, 2.5), run(0.9970, 2.0)]
    assert cheapest_best(runs) is runs[1]  # 2.0 is cheaper, but 0.2 point below the best
    tie = [run(0.999, 2.0), run(0.9995, 2.0)]
    assert cheapest_best(tie) is tie[1]
    with pytest.raises(ValueError, match="no runs"):
        cheapest_best([])


# -- refused input -----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
    ({"max_replicas": 0, "min_replicas": 0}, "max_replicas >= 1"),
    ({"slo_s": 0}, "slo_s"),
    ({"target_utilization": 0}, "target_utilization"),
    ({"target_utilization": 2.5}, "target_utilization"),
    ({"bin_s": -1}, "bin_s"),
    ({"arrivals": [Arrival(5.0), Arrival(1.0)]}, "sorted"),
])
def test_the_oracle_refuses_bad_arguments_naming_them(kwargs, message):
    arguments = {"arrivals": [Arrival(1.0)], "spec": FleetSpec(), "seed": 0, "min_replicas": 1, "max_replicas": 4,
                 "slo_s": 10.0, "target_utilization": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        OracleController(**arguments)


def test_the_oracle_refuses_a_fleet_it_did_not_plan():
    arrivals = [Arrival(1.0)]
    with pytest.raises(RuntimeError, match="only controller"):
        # the fleet opens at 2 ready where the oracle, at min 1, expects 1
        replay(arrivals, OracleController(arrivals, FleetSpec(), 0, 1, 4, 10, 1.0), FleetSpec(), 10, initial_replicas=2)


# -- the ratio in the table and in JSON ------------------------------------------------------

SHORT = ["--scenario", "spike", "--duration", "600", "--tail", "60", "--jobs", "2"]


def test_cli_json_gives_every_row_its_ratio_to_the_oracle_and_the_work_bound(capsys):
    assert cli.main([*SHORT, "--json", "--policies", "keda-queue,keda-queue-min0,oracle,oracle-min0"]) == 0
    rows = {r["policy"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == ["keda-queue", "keda-queue-min0", "oracle", "oracle-min0"]
    arrivals = synthetic("spike", 600, 2.0, 15.0, 0)
    for row in rows.values():
        assert row["work_bound_gpu_hours"] == pytest.approx(work_bound_gpu_hours(arrivals, FleetSpec()))
    assert rows["oracle"]["oracle_ratio"] == 1.0 and rows["oracle-min0"]["oracle_ratio"] == 1.0
    # at min 1 over the oracle at min 1; at min 0 over the oracle at min 0
    keda = rows["keda-queue"]
    assert keda["oracle_ratio"] == pytest.approx(keda["gpu_hours"] / rows["oracle"]["gpu_hours"])
    assert rows["keda-queue-min0"]["oracle_ratio"] == pytest.approx(
        rows["keda-queue-min0"]["gpu_hours"] / rows["oracle-min0"]["gpu_hours"])
    assert rows["oracle"]["cold_starts"] == 0 and rows["oracle"]["hours_at_zero"] == 0


def test_cli_table_gets_the_x_oracle_column_only_beside_an_oracle_and_states_the_work_bound(capsys):
    assert cli.main([*SHORT, "--policies", "fixed-interval,oracle"]) == 0
    out = capsys.readouterr().out
    header, rule, fixed, oracle = [line for line in out.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[6:8] == ["GPU-hours", "x oracle"] and len(rule.split("---")) == len(columns) + 1
    fixed_cells = [c.strip() for c in fixed.strip("|").split("|")]
    oracle_cells = [c.strip() for c in oracle.strip("|").split("|")]
    assert oracle_cells[7] == "1.00x"
    bound = work_bound_gpu_hours(synthetic("spike", 600, 2.0, 15.0, 0), FleetSpec())
    assert f"work bound: {bound:.2f} GPU-hours" in out
    assert cli.main([*SHORT, "--json", "--policies", "fixed-interval,oracle"]) == 0
    assert fixed_cells[7] == f"{json.loads(capsys.readouterr().out.splitlines()[0])['oracle_ratio']:.2f}x"
    assert cli.main([*SHORT, "--json", "--policies", "fixed-interval"]) == 0
    assert json.loads(capsys.readouterr().out)["oracle_ratio"] is None
    assert cli.main([*SHORT, "--policies", "fixed-interval"]) == 0
    assert "x oracle" not in capsys.readouterr().out


def test_the_markdown_ratio_column_reads_as_a_multiple_and_a_dash_where_there_is_none():
    def row(policy: str, ratio: float | None) -> PolicyResult:
        return PolicyResult(policy, 10, 1.0, 1.0, 2.0, 3.0, 0, 1.27, 0.0, 0, 1, 1.0, oracle_ratio=ratio)

    lines = markdown([row("a", 1.27), row("b", None)], 10).splitlines()
    assert "| 1.27 | 1.27x | 0.00 |" in lines[2] and "| 1.27 | - | 0.00 |" in lines[3]
    assert "x oracle" not in markdown([row("b", None)], 10)


def test_cli_runs_the_oracle_at_min_0_where_the_run_is_at_min_0(capsys, tmp_path):
    trace = tmp_path / "apart.csv"
    trace.write_text("TIMESTAMP\n0\n3000\n")  # two requests 50 min apart: the oracle goes to zero between
    assert cli.main(["--trace", str(trace), "--tail", "60", "--jobs", "2", "--json", "--min-replicas", "0",
                     "--policies", "keda-queue,oracle"]) == 0
    rows = {r["policy"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["oracle"]["cold_starts"] >= 1 and rows["oracle"]["hours_at_zero"] > 0
    keda = rows["keda-queue"]
    assert keda["oracle_ratio"] == pytest.approx(keda["gpu_hours"] / rows["oracle"]["gpu_hours"])
