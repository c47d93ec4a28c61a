"""The replay simulator: observations as Prometheus would see them, and the policies side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapter.config import MetadataError
from adapter.policy import Signals
from lab.target import FleetTarget
from lab.sim import cli, composite
from lab.sim.baselines import KnativeController, baselines
from lab.sim.cli import sweep_grid
from lab.sim import shipped
from lab.sim.composite import CompositeController
from lab.sim.shipped import SHIPPED_METADATA
from lab.sim.fleet import Fleet, FleetSpec
from lab.sim.observe import Observation, Observer
from lab.sim.replay import replay
from lab.sim.report import PolicyResult, pareto_front
from lab.sim.traces import Arrival, synthetic

ROOT = Path(__file__).resolve().parents[2]


def test_a_saturated_replica_reads_its_batch_utilization_over_the_window():
    fleet = Fleet(FleetSpec(max_queue_images=10_000))
    fleet.scale_to(1, startup_s=0)
    fleet.offer(Arrival(0.0) for _ in range(2000))
    observer = Observer(fleet, window_s=30)
    for t in range(0, 61):
        fleet.run_until(t)
        observation = observer.observe(t)
    signals = observation.signals
    assert signals.gpu_util_percent == pytest.approx(92, abs=1)  # batch 12 on the H100 table
    assert signals.queue > 1000 and signals.ready_replicas == 1
    assert signals.p95_seconds is not None and signals.p95_seconds > 30


def test_every_policy_replays_deterministically_and_accounts_for_every_request():
    arrivals = synthetic("step", 600, 1, 20, seed=4)
    def controllers():
        return [CompositeController(SHIPPED_METADATA, 1, 12), *baselines(12, 1, 12)]

    for controller, again in zip(controllers(), controllers(), strict=True):
        first = replay(arrivals, controller, FleetSpec(), slo_s=10, tail_s=120)
        second = replay(arrivals, again, FleetSpec(), slo_s=10, tail_s=120)
        assert first.summary() == second.summary(), controller.name
        assert first.requests == len(arrivals)
        assert 0 <= first.slo_attainment <= 1 and first.gpu_hours > 0
        # 20 req/s needs at least 3 replicas of 6.5 images/s; the composite's spare (minBusyReplicas 2)
        # alone would reach 2, so 2 would not show the step scaled anything
        assert max(p.desired for p in first.timeline) >= 4, f"{controller.name} never scaled up"


def test_the_composite_runs_the_scalers_own_parser_refresh_step_and_keda_loop():
    import adapter.config
    import adapter.targets
    import lab.keda

    assert composite.parse_metadata is adapter.config.parse_metadata
    assert composite.KedaLoop is lab.keda.KedaLoop
    controller = CompositeController(SHIPPED_METADATA, 1, 4)
    assert type(controller.scaler.target) is adapter.targets.Target
    controller.scaler.refresh(Observation(0, 1, Signals(queue=40, ready_replicas=1)))
    # the scaler's own step decided: 40 / 16 -> 3 replicas, a burst past the scale-up window
    assert controller.scaler.metric() == 3 and controller.scaler.target.refreshes["ok"] == 1
    with pytest.raises(MetadataError, match="targetQueuePerReplica"):
        CompositeController({"targetQueuePerReplica": "-1"}, 1, 4)


def test_the_composite_answers_from_the_refresh_cache_between_refreshes():
    controller = CompositeController({**SHIPPED_METADATA, "refreshSeconds": "10", "targetQueuePerReplica": "10"}, 1, 20,
                                    polling_interval_s=15, sync_period_s=1)
    fleet = Fleet(FleetSpec())
    fleet.scale_to(1, startup_s=0)
    target = FleetTarget(fleet)

    def observe(t: float, queue: float) -> None:
        controller.step(Observation(t, target.desired, Signals(queue=queue, ready_replicas=1)), target)

    observe(0, 0)
    observe(1, 100)  # the cache (t = 0) still says 1
    assert target.desired == 1
    observe(10, 100)  # refreshed: 100 / 10 = 10, a burst, passed through by the HPA
    assert target.desired == 10


def test_knative_does_not_scale_down_while_panicking_and_at_most_halves_after():
    knative = KnativeController(container_concurrency=10, min_replicas=1, max_replicas=20)  # target 7 in flight
    assert knative.desired(Observation(0, 1, Signals(queue=70, ready_replicas=1))) == 10
    # the burst ends, but the panic window (60 s) holds the peak
    assert knative.desired(Observation(10, 10, Signals(queue=0, ready_replicas=10))) == 10
    # out of panic: the stable window would ask for 1, max-scale-down-rate 2 allows 5
    assert knative.desired(Observation(80, 10, Signals(queue=0, ready_replicas=10))) == 5


def test_sweep_grid_is_every_combination_and_rejects_malformed_axes():
    grid = sweep_grid(["targetQueuePerReplica=8,16", "signals=queue,gpu|queue"])
    assert grid == [
        {"targetQueuePerReplica": "8", "signals": "queue,gpu"}, {"targetQueuePerReplica": "8", "signals": "queue"},
        {"targetQueuePerReplica": "16", "signals": "queue,gpu"}, {"targetQueuePerReplica": "16", "signals": "queue"},
    ]
    for bad in (["targetQueuePerReplica"], ["=1,2"], ["a=1", "a=2"], ["a="]):
        with pytest.raises(ValueError, match="--sweep"):
            sweep_grid(bad)


def result(name: str, slo: float, hours: float) -> PolicyResult:
    return PolicyResult(name, 100, slo, None, None, None, 0, hours, 0.0, 0, 0, 0)


def test_the_pareto_front_keeps_only_undominated_points_cheapest_first():
    points = [result("a", 0.99, 2.0), result("b", 0.95, 1.0), result("c", 0.97, 2.5), result("d", 0.99, 3.0),
              result("e", 1.0, 4.0), result("f", 0.95, 1.0)]
    assert [r.policy for r in pareto_front(points)] == ["b", "f", "a", "e"]


def test_the_simulators_defaults_are_what_the_manifests_ship():
    [scaled] = [d for d in yaml.safe_load_all((ROOT / "manifests/base/scaledobject.yaml").read_text()) if d]
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert {k: metadata[k] for k in SHIPPED_METADATA} == SHIPPED_METADATA
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"], scaled["spec"]["pollingInterval"]) == (
        shipped.SHIPPED_MIN_REPLICAS, shipped.SHIPPED_MAX_REPLICAS, shipped.SHIPPED_POLLING_INTERVAL_S)
    [worker] = [d for d in yaml.safe_load_all((ROOT / "manifests/base/worker.yaml").read_text())
                if d and d["kind"] == "Deployment"]
    [container] = [c for c in worker["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["WORKER_MAX_BATCH_SIZE"]) == shipped.SHIPPED_MAX_BATCH
    assert float(env["WORKER_MAX_WAIT_MS"]) / 1000 == shipped.SHIPPED_MAX_WAIT_S
    assert int(env["WORKER_MAX_QUEUE"]) == shipped.SHIPPED_MAX_QUEUE


SHORT = ["--scenario", "spike", "--duration", "600", "--tail", "60", "--jobs", "2"]


def test_cli_json_has_one_object_per_policy_with_the_issue_fields(capsys):
    assert cli.main([*SHORT, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in rows] == ["composite", "hpa-gpu", "keda-queue", "fixed-interval", "knative"]
    for row in rows:
        assert set(row) == {"policy", "requests", "slo_attainment", "p50_s", "p95_s", "p99_s", "rejected",
                            "gpu_hours", "hours_at_zero", "cold_starts", "scale_events", "peak_queue",
                            "work_bound_gpu_hours", "oracle_ratio"}
        assert row["cold_starts"] == 0 and row["hours_at_zero"] == 0  # min 1: never at zero


def test_cli_runs_the_min0_policies_beside_the_min1_ones_and_at_min_0_only_those_that_can(capsys, tmp_path):
    trace = tmp_path / "apart.csv"
    trace.write_text("TIMESTAMP\n0\n5000\n")  # two requests 83 min apart: beyond the keep-warm hold's hour
    apart = ["--trace", str(trace), "--tail", "60", "--jobs", "2", "--json"]
    assert cli.main([*apart, "--policies", "keda-queue,composite-min0,keda-queue-min0"]) == 0
    rows = {r["policy"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == ["keda-queue", "composite-min0", "keda-queue-min0"]
    assert rows["keda-queue"]["cold_starts"] == 0 and rows["keda-queue"]["hours_at_zero"] == 0
    for name in ("composite-min0", "keda-queue-min0"):  # they open warm, go to zero, the second request wakes them
        assert rows[name]["cold_starts"] == 1 and rows[name]["hours_at_zero"] > 0, name
    assert cli.main([*apart, "--min-replicas", "0", "--policies", "composite,keda-queue"]) == 0
    assert all(json.loads(line)["cold_starts"] == 1 for line in capsys.readouterr().out.splitlines())


def test_cli_sweep_prints_the_pareto_front_and_plots_a_png_per_policy(capsys, tmp_path):
    assert cli.main([*SHORT, "--sweep", "targetQueuePerReplica=8,16", "--policies", "knative",
                          "--plots", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "composite targetQueuePerReplica=8" in out and "composite targetQueuePerReplica=16" in out
    assert "Pareto front" in out
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert pngs == ["composite_targetQueuePerReplica-16.png", "composite_targetQueuePerReplica-8.png", "knative.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--composite", "burstFactor=zero"], "burstFactor"),
        (["--composite", "novalue"], "KEY=VALUE"),
        (["--sweep", "scaleDownWindowSeconds=60,-5"], "scaleDownWindowSeconds"),
        (["--policies", "composite,hpa"], "unknown hpa"),
        (["--min-replicas", "0"], "hpa-gpu, fixed-interval, knative cannot scale to zero"),
        (["--min-replicas", "-1"], "--min-replicas"),
        (["--cooldown-period", "-5"], "--cooldown-period"),
        (["--polling-interval", "0"], "--polling-interval"),
        (["--max-queue", "4"], "--max-queue"),
        (["--profile", "/nonexistent/profile.json"], "No such file"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2_and_a_message(argv, message, capsys):
    assert cli.main([*SHORT, *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_trace_problem(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("when\n2023-11-16 18:17:03.97\n")
    assert cli.main(["--trace", str(trace)]) == 2
    assert "no column 'TIMESTAMP'" in capsys.readouterr().err


def test_p95_is_read_through_the_workers_buckets_as_histogram_quantile_would():
    fleet = Fleet(FleetSpec())
    observer = Observer(fleet, window_s=60)
    assert observer.observe(0).signals.p95_seconds is None  # nothing finished: the signal abstains
    for _ in range(100):
        observer._take(1.0, 6.0)  # all in the (5, 7.5] bucket
    assert observer._p95() == pytest.approx(5 + 2.5 * 0.95)
    for _ in range(11):
        observer._take(1.0, 1000.0)  # beyond the last finite bucket
    assert observer._p95() == 300  # Prometheus answers the last finite bound
