"""Scale to zero in the simulator, as timelines: KEDA's activation and cooldown, cold starts on a queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lab.hpa import Behavior
from lab.sim import cli, shipped
from lab.sim.baselines import KEDA_QUEUE_MIN0, KedaQueueController, keda_queue_min0
from lab.sim.composite import CompositeController
from lab.sim.controller import Controller
from lab.sim.fleet import Fleet, FleetSpec, StartupDelay
from lab.sim.observe import Observer
from lab.sim.replay import Job, Setup, replay, run_job
from lab.sim.traces import Arrival
from lab.target import FleetTarget
from worker.queue import LOOKAHEAD_BATCHES

ROOT = Path(__file__).resolve().parents[2]
STARTUP_20_S = StartupDelay(20.0, 20.0)  # every replica ready 20 s after it is asked for


def run(controller: Controller, arrivals: list[Arrival], seconds: int) -> list[int]:
    """Replicas asked for at each second 0..seconds-1, the fleet starting empty on a queue."""
    fleet = Fleet(FleetSpec(pull=True, startup=STARTUP_20_S))
    fleet.offer(arrivals)
    observer, target = Observer(fleet, controller.window_s), FleetTarget(fleet)
    desired = []
    for t in range(seconds):
        fleet.run_until(t)
        controller.step(observer.observe(t), target)
        desired.append(target.desired)
    return desired


@pytest.mark.parametrize("controller", [
    KedaQueueController(5.0, 0, 4, polling_interval_s=30, activation=2.0),
    CompositeController({**shipped.SHIPPED_METADATA, "activationQueue": "2"}, 0, 4, polling_interval_s=30),
], ids=["keda-queue", "composite"])
def test_activation_wakes_the_fleet_only_above_the_threshold_and_at_the_next_poll(controller):
    # two requests wait at t = 0.5: at the threshold, not above it; a third comes at 100.5
    desired = run(controller, [Arrival(0.5), Arrival(0.5), Arrival(100.5)], 160)
    woke = next(t for t, replicas in enumerate(desired) if replicas > 0)
    assert all(d == 0 for d in desired[:101])  # 2 waiting for 100 s: the fleet stays at zero
    assert woke == 120  # KEDA polls at 0, 30, 60, 90, 120: the first poll after the third arrival


def test_the_fleet_goes_to_zero_only_after_the_cooldown_since_the_trigger_was_last_active():
    keda = keda_queue_min0(max_replicas=4)  # polling 30 s, cooldown 300 s
    # one request wakes the fleet (the poll at 30 sees it waiting: last active at 30); 100 more
    # at 205 keep a replica busy past the poll at 210 (last active at 210); then nothing
    arrivals = [Arrival(0.5)] + [Arrival(205.0)] * 100
    desired = run(keda, arrivals, 600)
    assert desired[29] == 0 and desired[30] == 1
    assert all(d >= 1 for d in desired[30:510])  # idle from about 60 s, but active at 210
    assert desired[510] == 0  # the first poll 300 s after the last active one
    assert keda.keda.cooldown_s == 300


def test_a_request_arriving_at_zero_waits_for_the_cold_start_and_counts_against_the_objective():
    # a cold request at 100 s: the poll at 120 wakes the fleet, ready at 140; a warm one at 200 s
    result = replay([Arrival(100.0), Arrival(200.0)], keda_queue_min0(4), FleetSpec(startup=STARTUP_20_S, pull=True),
                    slo_s=10, initial_replicas=0, tail_s=600)
    assert result.cold_starts == 1 and result.rejected == 0
    assert result.slo_attainment == 0.5  # the cold request took 41 s, the warm one 1.1 s
    assert result.p99_s == pytest.approx(140 + 1.07 - 100)
    assert result.p50_s == pytest.approx(1.07 + 0.05)
    # one replica from 120 s until the poll at 420 s (300 s after the last active poll at 120 s;
    # the warm request, served in 1.1 s, was never seen by a poll); zero before and after
    assert result.gpu_hours == pytest.approx(300 / 3600)
    assert result.hours_at_zero == pytest.approx((120 + (800 - 420)) / 3600)


def test_in_pull_mode_requests_wait_in_the_backlog_and_a_replica_holds_the_batch_running_and_the_next():
    assert LOOKAHEAD_BATCHES == 2  # the worker's own constant, which the timeline below assumes
    fleet = Fleet(FleetSpec(pull=True, max_batch=12, startup=STARTUP_20_S))
    fleet.offer(Arrival(0.0) for _ in range(30))
    fleet.run_until(10)
    assert len(fleet.backlog) == 30 and fleet.in_flight() == 30  # nothing up, nothing rejected
    fleet.scale_to(1)
    fleet.run_until(30)  # ready at 30: it pulls two batches of 12, runs one, holds the other; 6 stay in the stream
    [replica] = fleet.replicas
    assert (replica.batch_images, replica.waiting_images, len(fleet.backlog)) == (12, 12, 6)
    fleet.run_until(31.9)  # the batch took 1.85 s: the next 12, in hand, ran at once; the last 6 were pulled
    assert (replica.batch_images, replica.waiting_images, len(fleet.backlog)) == (12, 6, 0)
    assert [r.started_s for r in fleet.requests[12:24]] == pytest.approx([30 + 1.85] * 12)
    fleet.run_until(100)
    assert all(r.finished_s is not None and not r.rejected for r in fleet.requests)
    assert fleet.cold_starts == 1
    assert fleet.hours_at_zero(100) == pytest.approx(10 / 3600)


def test_in_pull_mode_a_replica_reads_while_it_holds_less_than_two_batches_so_the_last_request_may_pass_them():
    fleet = Fleet(FleetSpec(pull=True, max_batch=12, startup=STARTUP_20_S))
    fleet.offer(Arrival(0.0, images=10) for _ in range(5))
    fleet.scale_to(1)
    fleet.run_until(20)  # ready at 20: it reads 10, 20 (< 24, so one more), 30 images; a batch holds one request
    [replica] = fleet.replicas
    assert (replica.batch_images, replica.waiting_images, len(fleet.backlog)) == (10, 20, 2)
    fleet.run_until(20 + fleet.spec.profile.seconds(10, 20) + 0.01)  # one done: 20 in hand, so it reads one more
    assert (replica.batch_images, replica.waiting_images, len(fleet.backlog)) == (10, 20, 1)


def test_keda_queue_min0_is_keda_on_the_queue_with_its_defaults_from_zero():
    keda = keda_queue_min0(max_replicas=16)
    assert keda.name == KEDA_QUEUE_MIN0
    assert keda.scaler.target == 5.0 and keda.scaler.activation == 0.0  # queueLength 5, activation at 0
    assert (keda.keda.min_replicas, keda.keda.polling_interval_s, keda.keda.cooldown_s) == (0, 30.0, 300.0)
    assert keda.keda.hpa.spec.behavior == Behavior()  # Kubernetes' default behavior
    setup = Setup(FleetSpec(startup=STARTUP_20_S), 10.0, 1, 16, 15.0, 0, 60.0)
    result = run_job([Arrival(10.0), Arrival(1000.0)], setup, Job(KEDA_QUEUE_MIN0, name=KEDA_QUEUE_MIN0))
    # at min 0 on a queue in a min-1 setup: it opens warm like every policy, serves the first
    # request, goes to zero after its 300 s cooldown, and the second request wakes it
    assert result.cold_starts == 1 and result.rejected == 0 and result.hours_at_zero > 0


def test_composite_min0_is_the_queue_overlays_scaled_object():
    patch = yaml.safe_load((ROOT / "manifests/overlays/queue/scaledobject-queue.yaml").read_text())
    values = {op["path"]: op["value"] for op in patch}
    assert values["/spec/minReplicaCount"] == shipped.SHIPPED_QUEUE_MIN_REPLICAS == 0
    assert values["/spec/pollingInterval"] == shipped.SHIPPED_QUEUE_POLLING_INTERVAL_S
    assert values["/spec/cooldownPeriod"] == shipped.SHIPPED_QUEUE_COOLDOWN_PERIOD_S
    metadata = {path.rsplit("/", 1)[1]: value for path, value in values.items() if "/metadata/" in path}
    # every metadata value the overlay sets, but where the queue lives (nothing to simulate there)
    assert {k: v for k, v in metadata.items() if k not in ("redisAddress", "stream")} == shipped.SHIPPED_QUEUE_METADATA
    assert {op["path"].rsplit("/", 1)[1] for op in patch if "/metadata/" not in op["path"]} == {
        "minReplicaCount", "pollingInterval", "cooldownPeriod"}  # a new field there needs its constant


def test_the_composite_polls_as_the_scaled_object_ships_at_its_min():
    assert CompositeController(shipped.SHIPPED_METADATA, 1, 4).keda.polling_interval_s == 15.0  # the base's
    at_zero = CompositeController(shipped.SHIPPED_METADATA, 0, 4)
    assert (at_zero.keda.polling_interval_s, at_zero.keda.cooldown_s) == (5.0, 60.0)  # the overlay's
    assert CompositeController(shipped.SHIPPED_METADATA, 0, 4, polling_interval_s=30).keda.polling_interval_s == 30


@pytest.mark.parametrize(("flags", "second_latency_s", "gpu_s"), [
    # With the keep-warm hold and the spare off, KEDA's timing alone: it opens with one ready
    # replica, which serves the request at 0 s; the poll at 0 sees it (last active 0), so zero at
    # 60. The request at 1500.5 waits for the poll at 1505, ready at 1525, in flight at the poll
    # at 1525 (last active), so zero again at 1585; the run ends at 1800.5.
    ([], 1525 + 1.07 - 1500.5, 60 + 1585 - 1505),
    # polls every 15 s: zero at 60, woken at 1515, ready at 1535, last active 1530, zero at 1590
    (["--polling-interval", "15"], 1535 + 1.07 - 1500.5, 60 + 1590 - 1515),
    (["--cooldown-period", "300"], 1525 + 1.07 - 1500.5, 300 + 1800.5 - 1505),  # up to the end
    (["--min-replicas", "0", "--policies", "composite"], 1525 + 1.07 - 1500.5, 60 + 1585 - 1505),
], ids=["overlay", "polling-15", "cooldown-300", "min-replicas-0"])
def test_the_cli_replays_the_composite_at_zero_with_the_overlays_polling_and_cooldown_unless_told(
        flags, second_latency_s, gpu_s, tmp_path, capsys):
    trace = tmp_path / "two.csv"
    trace.write_text("TIMESTAMP\n1000\n2500.5\n")  # at 0 s and 1500.5 s
    argv = ["--trace", str(trace), "--startup-median", "20", "--startup-p99", "20", "--json", "--jobs", "1",
            "--policies", "composite-min0", "--composite", "keepWarmMaxSeconds=0", "--composite", "minBusyReplicas=1"]
    assert cli.main([*argv, *flags]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["cold_starts"] == 1 and row["p50_s"] == pytest.approx(1.07 + 0.05)  # the first, served warm
    assert row["p99_s"] == pytest.approx(second_latency_s)
    assert row["gpu_hours"] == pytest.approx(gpu_s / 3600)


def test_the_keep_warm_hold_keeps_an_idle_fleet_up_until_it_has_seen_enough_gaps(tmp_path, capsys):
    """As shipped, a fleet that has seen fewer than 20 idle gaps holds keepWarmMaxSeconds (1 h)
    after its last request before KEDA's 60 s cooldown begins: a gap of 25 min is held warm, one
    of 70 min is not."""
    trace = tmp_path / "gaps.csv"
    trace.write_text("TIMESTAMP\n0\n1500\n5700\n")  # gaps of 1500 s and 4200 s
    assert cli.main(["--trace", str(trace), "--startup-median", "20", "--startup-p99", "20", "--json", "--jobs", "1",
                     "--policies", "composite-min0", "--tail", "60"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["cold_starts"] == 1  # the 4200 s gap only: without the hold the 1500 s gap would be one too
    # at zero from Z until the poll at 5700 woke it: Z is the hold (from the last refresh that saw
    # the request arriving, up to a 1 m rate window after it) plus the 60 s cooldown, give or take polls
    zero_at = 5700 - row["hours_at_zero"] * 3600
    assert 1500 + 3600 + 60 <= zero_at <= 1500 + 60 + 3600 + 60 + 15
