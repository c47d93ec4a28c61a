"""Replays arrivals through the simulated fleet under a policy; many replays side by side.

Every policy sees the fleet only as Prometheus would (`lab.sim.observe`); the composite is the
scaler's own code (`lab.sim.composite`), the baselines are what users run today
(`lab.sim.baselines`), the oracle knows the future (`lab.sim.oracle`). A replay lasts until
the last arrival plus a tail, so the cool-down is paid for too; the result
(`lab.sim.report.PolicyResult`) counts every request and states the work bound. A policy at
min 0 replays on a queue (`FleetSpec.pull`): requests wait for a cold start there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lab.target import FleetTarget
from lab.sim.baselines import KEDA_QUEUE_MIN0, baseline
from lab.sim.composite import CompositeController
from lab.sim.controller import Controller
from lab.sim.fleet import BatchProfile, Fleet, FleetSpec, StartupDelay
from lab.sim.observe import Observer
from lab.sim.oracle import ORACLE, ORACLE_UTILIZATIONS, OracleController, cheapest_best, work_bound_gpu_hours
from lab.sim.report import PolicyResult, percentile
from lab.sim.shipped import SHIPPED_QUEUE_COOLDOWN_PERIOD_S
from lab.sim.traces import Arrival
from lab.timeline import TimelinePoint, write_timeline


def replay(arrivals: Sequence[Arrival], controller: Controller, fleet_spec: FleetSpec, slo_s: float,
           initial_replicas: int = 1, scrape_s: float = 1.0, seed: int = 0, tail_s: float = 300.0,
           timeline_every_s: float = 5.0) -> PolicyResult:
    """Runs the arrivals through a fleet scaled by `controller`; the run lasts until the last
    arrival plus `tail_s`, so the cool-down is paid for too. A request still unanswered at
    the end counts as missing the objective."""
    fleet = Fleet(fleet_spec, seed=seed)
    fleet.scale_to(initial_replicas, startup_s=0)
    fleet.offer(arrivals)
    observer = Observer(fleet, controller.window_s)
    target = FleetTarget(fleet)
    end = (arrivals[-1].t_s if arrivals else 0.0) + tail_s
    peak_queue, timeline = 0.0, []
    next_point, arrived = 0.0, 0
    steps = int(end / scrape_s)
    for step in range(steps + 1):
        t = step * scrape_s
        fleet.run_until(t)
        observation = observer.observe(t)
        peak_queue = max(peak_queue, observation.signals.queue)
        controller.step(observation, target)
        if t >= next_point:
            before = arrived
            while arrived < len(arrivals) and arrivals[arrived].t_s <= t:
                arrived += 1
            timeline.append(TimelinePoint(t, fleet.desired, (arrived - before) / timeline_every_s, observation.signals))
            next_point = t + timeline_every_s
    latencies = sorted(r.latency_s if r.latency_s is not None else end - r.arrival.t_s
                       for r in fleet.requests if not r.rejected)
    within = sum(1 for r in fleet.requests if r.latency_s is not None and r.latency_s <= slo_s)
    return PolicyResult(
        policy=controller.name,
        requests=len(fleet.requests),
        slo_attainment=within / len(fleet.requests) if fleet.requests else 1.0,
        p50_s=percentile(latencies, 0.50),
        p95_s=percentile(latencies, 0.95),
        p99_s=percentile(latencies, 0.99),
        rejected=sum(1 for r in fleet.requests if r.rejected),
        gpu_hours=fleet.gpu_hours(end),
        hours_at_zero=fleet.hours_at_zero(end),
        cold_starts=fleet.cold_starts,
        scale_events=target.events,
        peak_queue=peak_queue,
        timeline=timeline,
        work_bound_gpu_hours=work_bound_gpu_hours(arrivals, fleet_spec),
    )


def write_timelines(results: Sequence[PolicyResult], directory: Path | str, slo_s: float) -> list[Path]:
    """One PNG per policy in `directory`: replicas with arrivals, requests in flight, p95."""
    written = []
    for result in results:
        name = result.policy.replace(" ", "_").replace("=", "-").replace("/", "_") + ".png"
        title = (f"{result.policy}: {100 * result.slo_attainment:.1f} % within {slo_s:g} s, "
                 f"{result.gpu_hours:.2f} GPU-hours, {result.scale_events} scale events")
        written.append(write_timeline(result.timeline, Path(directory) / name, title, slo_s, minutes=True))
    return written


# -- replaying a local-stack run ---------------------------------------------------------

def exported_profile(record: Mapping) -> BatchProfile | None:
    """The batch profile the run's workers exported (`diffusion_batch_throughput_image_steps_per_second`
    by batch size, as `lab.stack --record` keeps it): seconds per batch of b images at the run's
    steps, b x steps / throughput; None where the record has none (no Prometheus, no batch)."""
    exported = record.get("exported") or {}
    rows = exported.get("image_steps_per_second") or []
    if not rows:
        return None
    steps = record["settings"]["steps"]
    return BatchProfile(tuple((int(r["batch"]), int(r["batch"]) * steps / float(r["value"]), 0.0) for r in rows), steps)


def replay_record(record: Mapping, profile: BatchProfile | None = None) -> PolicyResult:
    """Replays a local-stack run (`python -m lab.stack --record`) through the simulator: the
    same arrivals, batching, metadata, KEDA polling and HPA sync; the start-up delays and the
    batch profile the workers exported (`exported_profile`; `profile` where given instead, or
    where the record has none), and the stack's own start-up delays where they exported none.
    The profile is scaled so that a batch of the run's mean size takes the seconds per batch its
    workers' busy-seconds counter reported (CPU workers share cores, so a batch is slower than
    alone). Raises ValueError when there is no profile at all."""
    settings = record["settings"]
    profile = profile or exported_profile(record)
    if profile is None:
        raise ValueError("the record has no exported batch profile (a run without Prometheus, or without a batch); "
                         "pass one, e.g. from bench/worker_throughput.py --profile-out")
    batches = record.get("batches")
    if batches and batches["batches"] > 0:
        mean_images = batches["images"] / batches["batches"]
        scale = (batches["busy_seconds"] / batches["batches"]) / profile.seconds(round(mean_images), profile.reference_steps)
        profile = BatchProfile(tuple((b, s * scale, u) for b, s, u in profile.table), profile.reference_steps)
    exported = (record.get("exported") or {}).get("startup_seconds")
    delays = sorted(exported or record["startup_delays_s"]) or [0.0]
    startup = StartupDelay(delays[len(delays) // 2], max(delays[-1], delays[len(delays) // 2]))
    # the queue mode's workers pull from the stream; its KEDA cooldown is recorded as `cooldown_s`
    pull = settings.get("mode") == "queue" or settings["min_replicas"] == 0
    spec = FleetSpec(settings["max_batch"], settings["max_wait_ms"] / 1000, settings["max_queue"], profile, startup, pull)
    arrivals = [Arrival(t, 1, settings["steps"]) for t in record["arrivals"]]
    controller = CompositeController(record["metadata"], settings["min_replicas"], settings["max_replicas"],
                                     settings["polling_interval_s"], settings["sync_period_s"],
                                     cooldown_s=settings.get("cooldown_s", SHIPPED_QUEUE_COOLDOWN_PERIOD_S))
    return replay(arrivals, controller, spec, slo_s=float(record["metadata"].get("targetP95Seconds", 10)),
                  initial_replicas=settings["min_replicas"], tail_s=settings["seconds"] - (arrivals[-1].t_s if arrivals else 0),
                  timeline_every_s=1.0)


# -- running many replays ------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One replay, described so it can cross a process boundary (controllers hold lambdas)."""

    kind: str  # "composite", "oracle" or a baseline's name
    metadata: tuple[tuple[str, str], ...] = ()
    name: str = "composite"
    min_replicas: int | None = None  # None: the setup's
    target_utilization: float | None = None  # the oracle's; None: search `ORACLE_UTILIZATIONS`


@dataclass(frozen=True)
class Setup:
    fleet: FleetSpec
    slo_s: float
    min_replicas: int
    max_replicas: int
    polling_interval_s: float | None  # the composite's KEDA pollingInterval; None: as shipped at its min
    seed: int
    tail_s: float
    cooldown_s: float = SHIPPED_QUEUE_COOLDOWN_PERIOD_S  # the composite's KEDA cooldownPeriod (1 -> 0 at min 0)


_WORKER_STATE: tuple[Sequence[Arrival], Setup] | None = None


def _init_worker(arrivals: Sequence[Arrival], setup: Setup) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (arrivals, setup)


def _run_job(job: Job) -> PolicyResult:
    assert _WORKER_STATE is not None
    arrivals, setup = _WORKER_STATE
    return run_job(arrivals, setup, job)


def job_min_replicas(job: Job, setup: Setup) -> int:
    """The min replicas a job runs at: 0 for `keda-queue-min0`, else its own, else the setup's."""
    return 0 if job.kind == KEDA_QUEUE_MIN0 else setup.min_replicas if job.min_replicas is None else job.min_replicas


def oracle_candidates(job: Job) -> list[Job]:
    """An oracle job without a utilization as one job per `ORACLE_UTILIZATIONS`; others as they are."""
    if job.kind != ORACLE or job.target_utilization is not None:
        return [job]
    return [replace(job, target_utilization=u) for u in ORACLE_UTILIZATIONS]


def run_job(arrivals: Sequence[Arrival], setup: Setup, job: Job) -> PolicyResult:
    """One job's replay; a policy at min 0 (`keda-queue-min0` always) runs on a queue, opening with
    one ready replica like the others.
    An oracle job without a utilization replays at each of `ORACLE_UTILIZATIONS` and keeps the
    cheapest run at the best SLO attainment it reaches (`lab.sim.oracle.cheapest_best`)."""
    min_replicas = job_min_replicas(job, setup)
    opening = max(1, min_replicas)
    fleet = replace(setup.fleet, pull=True) if min_replicas == 0 else setup.fleet
    if job.kind == ORACLE:
        if job.target_utilization is None:
            return cheapest_best([run_job(arrivals, setup, candidate) for candidate in oracle_candidates(job)])
        controller: Controller = OracleController(arrivals, fleet, setup.seed, min_replicas, setup.max_replicas,
                                                  setup.slo_s, job.target_utilization, name=job.name, opening=opening)
    elif job.kind == "composite":
        controller = CompositeController(dict(job.metadata), min_replicas, setup.max_replicas,
                                         setup.polling_interval_s, name=job.name, cooldown_s=setup.cooldown_s)
    else:
        controller = baseline(job.kind, setup.fleet.max_batch, min_replicas, setup.max_replicas)
    # Every policy opens with at least one ready replica, as the hour before the run left the
    # fleet: a run at min 0 pays for the cold starts its own choices cause, not one at t = 0.
    return replay(arrivals, controller, fleet, setup.slo_s, initial_replicas=opening,
                  seed=setup.seed, tail_s=setup.tail_s)


def run_jobs(arrivals: Sequence[Arrival], setup: Setup, jobs: Sequence[Job], processes: int = 1) -> list[PolicyResult]:
    """Replays each job, in `processes` processes when above 1; results in the jobs' order. An
    oracle's search is spread over the processes as one replay per utilization."""
    if processes <= 1 or len(jobs) <= 1:
        return [run_job(arrivals, setup, job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    expanded = [oracle_candidates(job) for job in jobs]
    flat = [candidate for candidates in expanded for candidate in candidates]
    with ProcessPoolExecutor(min(processes, len(flat)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(arrivals, setup)) as pool:
        runs = iter(pool.map(_run_job, flat))
        return [cheapest_best([next(runs) for _ in candidates]) for candidates in expanded]
