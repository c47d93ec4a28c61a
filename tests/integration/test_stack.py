"""The local stack end to end: real workers scaled by the scaler through local KEDA + HPA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.sim.replay import replay_record

from .conftest import require_prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def processes_of(workdir: str) -> set[int]:
    """Processes whose command line names this stack's working directory (its workers, exporters)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if workdir.encode() in command:
                found.add(int(entry.name))
    return found


def workdir_of(output: str) -> str:
    [workdir] = re.findall(r"logs in (\S+)", output)
    return workdir


def within_one_replica(real: list[int], simulated: list[int], phase_s: int) -> float:
    """The share of seconds at which the stack's replica count is within one of the simulator's
    count at some second no more than `phase_s` seconds away (both series one point a second)."""
    near = [any(abs(count - other) <= 1 for other in simulated[max(0, t - phase_s): t + phase_s + 1])
            for t, count in enumerate(real)]
    return sum(near) / len(real)


def test_the_phase_allowance_forgives_a_shift_of_a_few_seconds_and_nothing_more():
    ci_failure = ("1111111111111111111111111111111111112222222222333333333333333333333333333333333333333333333333333322",
                  "1111111111111111111111111111112222223333333333333333333333333333333333333333333333333331111111111111")
    real, simulated = ([int(c) for c in series] for series in ci_failure)
    assert within_one_replica(real, simulated, 0) == 0.89  # second to second, as the test used to compare
    assert within_one_replica(real, simulated, 5) == 0.94  # the 11 s late scale-down still costs 6 s
    assert within_one_replica([3] * 10, [1] * 10, 5) == 0.0


@pytest.mark.timeout(540)
def test_the_stack_scales_up_under_the_burst_back_down_after_and_the_simulator_agrees(tmp_path):
    """One run serves two checks: the stack itself, and the replay simulator's faithfulness.
    120 s: the burst ends at 65 % of the run, and the latency signal's 1 m p95 must fall before
    the fleet can; at 100 s two CI runs on a loaded machine ended still at the peak.

    Heavier requests (24 steps) and `minBusyReplicas=1` make the queue and latency drive the
    replica count. The run is recorded (arrivals as sent, replicas per second, start-up delays,
    batches, and what the workers exported of their capacity: throughput by batch size and
    start-up seconds) and replayed through `lab.sim` with that profile and those start-ups. The
    stated bound: in at least 90 % of the seconds the stack's count is within one replica of the simulator's at a second no further than one KEDA poll plus one HPA
    sync away (the stack's loops tick at a phase of their own, which the replay cannot know; a
    CI run compared second to second once missed 90 % by one second, the stack's scale-down
    landing 11 s after the replay's), their peaks differ by at most one, their means by at most
    25 %, and their first scale-ups by at most 15 s.
    """
    require_prometheus()
    model = tmp_path / "tiny"
    subprocess.run([sys.executable, "-m", "worker", "make-model", str(model), "--arch", "tiny"], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    timeline, record = tmp_path / "timeline.png", tmp_path / "record.json"
    result = subprocess.run(
        [sys.executable, "-m", "lab.stack", "--mode", "direct", "--seconds", "120", "--scale-down-window", "10",
         "--model", str(model),
         "--steps", "24", "--max-replicas", "3", "--metadata", "minBusyReplicas=1",
         "--timeline", str(timeline), "--record", str(record)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    desired = [int(row[2]) for row in rows]
    assert len(rows) >= 90
    assert max(desired) > 1, "the burst never scaled the workers up"
    assert desired[-1] < max(desired), "the cool-down never scaled them back down"
    assert "0 failed" in result.stdout
    assert timeline.stat().st_size > 10_000
    assert not processes_of(workdir_of(result.stdout)), "worker processes outlived the stack"

    recorded = json.loads(record.read_text())
    assert len(recorded["arrivals"]) == recorded["requests"]["sent"] and recorded["batches"] is not None
    # the capacity and start-up figures the replay uses are the workers' own exports, not constants
    exported = recorded["exported"]
    assert {row["batch"] for row in exported["image_steps_per_second"]} >= {1, 4}  # idle singles and full batches
    assert len(exported["startup_seconds"]) == len(recorded["startup_delays_s"]) and min(exported["startup_seconds"]) > 0
    replayed = replay_record(recorded)
    real = [point["desired"] for point in recorded["timeline"]]
    simulated = [point.desired for point in replayed.timeline][: len(real)]
    real = real[: len(simulated)]
    shown = f"\nstack     {''.join(map(str, real))}\nsimulator {''.join(map(str, simulated))}"
    phase = round(recorded["settings"]["polling_interval_s"] + recorded["settings"]["sync_period_s"])
    close = within_one_replica(real, simulated, phase)
    assert close >= 0.9, f"only {close:.0%} of seconds within one replica ({phase} s of phase)" + shown
    assert abs(max(real) - max(simulated)) <= 1, shown
    assert abs(sum(simulated) - sum(real)) <= 0.25 * sum(real), shown
    first = [next((i for i, n in enumerate(series) if n > 1), len(series)) for series in (real, simulated)]
    assert abs(first[0] - first[1]) <= 15, f"first scale-up at {first[0]} s vs {first[1]} s" + shown


@pytest.mark.timeout(300)
def test_ctrl_c_mid_run_stops_everything_it_started():
    import signal
    import time

    require_prometheus()
    process = subprocess.Popen([sys.executable, "-m", "lab.stack", "--mode", "direct", "--seconds", "300",
                                "--timeline", ""],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in process.stdout:  # wait until the scenario runs: workers, Prometheus and scaler are up
            lines.append(line)
            if line[:5].strip() == "3":
                break
        workdir = workdir_of("".join(lines))
        assert processes_of(workdir), "no worker was running"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 130
        assert time.monotonic() - started < 60
        assert not processes_of(workdir), "worker processes outlived the stack"
        assert "everything it started is stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.timeout(240)
def test_with_gpus_each_worker_owns_one_and_has_its_exporter(tmp_path):
    """GPU placement without a GPU: CUDA_VISIBLE_DEVICES per worker, at most one worker per GPU,
    an exporter process beside each, and all of them gone after close()."""
    import time

    from lab.stack.workers import WorkerFleet
    from worker.modelbuild import make_model

    fleet = WorkerFleet(make_model(tmp_path / "tiny", "tiny"), log_dir=tmp_path, gpus=(0, 1), exporters=True)
    try:
        fleet.scale_to(3)
        assert len(fleet.workers) == 2  # two GPUs, two workers
        environments = [(Path(f"/proc/{w.process.pid}/environ").read_bytes(), w.gpu) for w in fleet.workers]
        for environ, gpu in environments:
            assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environ.split(b"\0")
        assert sorted(w.gpu for w in fleet.workers) == [0, 1]
        assert all(w.exporter is not None and w.exporter.poll() is None for w in fleet.workers)
        deadline = time.monotonic() + 120
        while len(fleet.ready) < 2:
            assert time.monotonic() < deadline, "workers never became ready"
            fleet.refresh()
            time.sleep(0.5)
        newest = max(fleet.workers, key=lambda w: w.started_at)
        fleet.scale_to(1)
        assert newest.draining and fleet.desired == 1
        processes = [p for w in fleet.workers for p in (w.process, w.exporter)]
    finally:
        fleet.close()
    assert all(p.poll() is not None for p in processes)


def refused(host_port: str) -> bool:
    import socket

    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.timeout(420)
def test_queue_mode_wakes_the_fleet_from_zero_scales_it_past_three_and_returns_it_to_zero(tmp_path):
    """`make demo`'s default: Redis, the gateway, the scaler on the stream's backlog, zero workers,
    here with the scaler scraping the workers itself (`--metrics-source direct`, the stack where
    Prometheus is not installed; the faithfulness test above runs the Prometheus path).

    Each step is asserted so that its absence fails: the fleet is at zero while nothing arrives
    (a min of 1 would show 1), the first requests wake it (without activation it would stay at
    0 and every request would time out), the burst needs three or more workers, and the quiet
    end takes it back to zero (without the cooldown's 1 -> 0 it would end at 1)."""
    timeline = tmp_path / "timeline.png"
    result = subprocess.run(
        [sys.executable, "-m", "lab.stack", "--seconds", "180", "--metrics-source", "direct",
         "--timeline", str(timeline)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no Prometheus: the scaler scrapes the workers itself" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    t = [int(row[0]) for row in rows]
    offered = [float(row[1]) for row in rows]
    desired = [int(row[2]) for row in rows]
    shown = "\n" + " ".join(f"{a}:{b}" for a, b in zip(t, desired, strict=True))
    assert len(rows) >= 170
    first_load = next(i for i, rate in enumerate(offered) if rate > 0)
    assert t[first_load] >= 20 and set(desired[:first_load]) == {0}, "the fleet did not open at zero" + shown
    woke = next((i for i, n in enumerate(desired) if n > 0), None)
    assert woke is not None and woke >= first_load, "no request woke the fleet" + shown
    assert max(desired) >= 3, "the load never needed three workers" + shown
    assert desired[-1] == 0 and int(rows[-1][3]) == 0, "the quiet end did not return the fleet to zero" + shown
    assert " 0 failed" in result.stdout and re.search(r"stack: [1-9]\d* requests", result.stdout), result.stdout[-500:]
    assert timeline.stat().st_size > 10_000
    # everything it started is gone: workers, the gateway, Redis
    assert not processes_of(workdir_of(result.stdout)), "worker processes outlived the stack"
    [(gateway, redis)] = re.findall(r"the gateway http://(\S+) \(Redis redis://(\S+?)/0\)", result.stdout)
    assert refused(gateway) and refused(redis), "the gateway or Redis outlived the stack"
