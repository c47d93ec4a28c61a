"""Replays arrivals through the simulated fleet under several autoscaling policies, side by side.

Every policy sees the fleet only as Prometheus would: signals sampled every `scrape_s`, rates
and quantiles over a window. The composite policy is the scaler's own code: its trigger
metadata goes through the real parser (`adapter.config.parse_metadata`), a simulated
refresher runs the real decision core (`adapter.policy.decide`) every `refreshSeconds` and
caches the value, and KEDA's loop (`lab.keda.KedaLoop`, the one the local stack runs)
polls it and feeds the HPA algorithm (`lab.hpa`) with the pass-through behavior of our
ScaledObject. The baselines are what users run today:

- `hpa-gpu`: HPA on GPU utilization, 75 % per replica (dcgm-exporter + prometheus-adapter,
  utilization averaged over 1 m), Kubernetes' default behavior;
- `keda-queue`: KEDA's Prometheus scaler on requests in flight, 5 per replica, through the
  same KEDA loop, Kubernetes' default behavior;
- `fixed-interval`: every 30 s, one replica more when the queue exceeds the replicas' batch
  capacity, one fewer when it is empty (the Lightning approach);
- `knative`: Knative's KPA with its defaults on concurrency, the container concurrency set
  to the max batch (70 % of it is the target), 60 s stable window, 6 s panic window, panic
  at twice the ready pods, at most halving per decision.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from adapter.config import ScalerSpec, parse_duration_seconds, parse_metadata
from adapter.directscrape import histogram_quantile
from lab.sim.fleet import BatchProfile, Fleet, FleetSpec, StartupDelay
from lab.hpa import PASS_THROUGH, HorizontalPodAutoscaler, HpaSpec, MetricTarget
from lab.keda import KedaLoop
from adapter.policy import Decision, PolicyState, Signals, decide
from lab.sim.traces import Arrival
from worker.metrics import LATENCY_BUCKETS_S  # the worker's buckets, so the p95 interpolates as Prometheus' does

# The trigger metadata our ScaledObject ships (manifests/base/scaledobject.yaml, less its
# addresses and selector); a test keeps the two equal. The simulator's composite starts here.
SHIPPED_METADATA: dict[str, str] = {
    "targetQueuePerReplica": "16",
    "targetGpuUtilization": "90",
    "targetP95Seconds": "6",
    "scaleDownWindowSeconds": "180",
    "minBusyReplicas": "2",
}
# The worker Deployment's batching (manifests/base/worker.yaml) and the ScaledObject's bounds.
SHIPPED_MAX_BATCH = 12
SHIPPED_MAX_WAIT_S = 0.05
SHIPPED_MAX_QUEUE = 96
SHIPPED_MIN_REPLICAS = 1
SHIPPED_MAX_REPLICAS = 16
SHIPPED_POLLING_INTERVAL_S = 15.0


@dataclass(frozen=True)
class Observation:
    """What Prometheus holds at `t`: the same series the worker and exporter export."""

    t: float
    queue: float  # requests in flight, summed over every pod still up
    ready: int
    serving: int  # replicas asked for and not draining
    gpu_util_percent: float | None  # mean over ready replicas of their utilization over the window
    p95_s: float | None  # histogram_quantile(0.95) over the worker's buckets, requests finished inside the window


class Observer:
    """Samples the fleet every scrape and answers window queries as PromQL would."""

    def __init__(self, fleet: Fleet, window_s: float) -> None:
        self.fleet = fleet
        self.window_s = window_s
        self._util: deque[tuple[float, dict[int, float]]] = deque()  # (t, replica -> util integral)
        self._seen = 0  # requests of fleet.finished already taken into the window
        self._recent: deque[tuple[float, float]] = deque()  # (finished at, latency) inside the window

    def observe(self, now: float) -> Observation:
        fleet = self.fleet
        ready = fleet.ready()
        integrals = {r.id: r.util_integral_at(now) for r in ready}
        self._util.append((now, integrals))
        while self._util and self._util[0][0] < now - self.window_s:
            self._util.popleft()
        oldest_t, oldest = self._util[0]
        utils = [(integrals[i] - oldest.get(i, integrals[i])) / (now - oldest_t)
                 for i in integrals if now > oldest_t and i in oldest]
        for request in fleet.finished[self._seen:]:
            self._recent.append((request.finished_s, request.latency_s))
        self._seen = len(fleet.finished)
        while self._recent and self._recent[0][0] <= now - self.window_s:
            self._recent.popleft()
        return Observation(now, float(fleet.in_flight()), len(ready), len(fleet.serving()),
                           sum(utils) / len(utils) if utils else None, self._p95())

    def _p95(self) -> float | None:
        """histogram_quantile(0.95, ...) over the worker's latency buckets, as the scaler reads it."""
        if not self._recent:
            return None
        counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        for _, latency in self._recent:
            counts[bisect.bisect_left(LATENCY_BUCKETS_S, latency)] += 1
        cumulative, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return histogram_quantile(0.95, cumulative)


class FleetTarget:
    """The simulated fleet as a scale target (KEDA's and every controller's), counting changes."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.events = 0

    @property
    def desired(self) -> int:
        return len(self.fleet.serving())

    def ready_count(self) -> int:
        return len(self.fleet.ready())

    def scale_to(self, replicas: int) -> None:
        if replicas != self.desired:
            self.fleet.scale_to(replicas)
            self.events += 1


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


class SimulatedScaler:
    """Our scaler's refresher in process: every `refreshSeconds` it reads the signals and
    runs `decide`; KEDA's calls are answered from that cache, as the service answers them."""

    def __init__(self, spec: ScalerSpec) -> None:
        self.spec = spec
        self.state = PolicyState()
        self.decision: Decision | None = None
        self._next_refresh = 0.0

    def refresh(self, o: Observation) -> None:
        if o.t < self._next_refresh:
            return
        self._next_refresh = o.t + self.spec.refresh_s
        signals = Signals(queue=o.queue, ready_replicas=o.ready, gpu_util_percent=o.gpu_util_percent, p95_seconds=o.p95_s)
        self.decision = decide(self.spec.policy, signals, self.state, o.t)
        self.state = self.decision.state

    def metric_target(self) -> float:
        return 1.0  # the composite is in replicas; GetMetricSpec's targetSizeFloat

    def is_active(self) -> bool:
        return self.decision is not None and self.decision.active

    def metric(self) -> float:
        if self.decision is None:
            raise LookupError("no refresh has run yet")
        return self.decision.value


class CompositeController(Controller):
    """The scaler's decision core behind its cache, polled by KEDA, applied by the HPA."""

    name = "composite"

    def __init__(self, metadata: Mapping[str, str], min_replicas: int, max_replicas: int,
                 polling_interval_s: float = SHIPPED_POLLING_INTERVAL_S, sync_period_s: float = 15.0,
                 name: str = "composite") -> None:
        self.name = name
        self.spec = composite_spec(metadata)
        self.window_s = parse_duration_seconds(self.spec.window)
        self.scaler = SimulatedScaler(self.spec)
        self.keda = KedaLoop(self.scaler, min_replicas, max_replicas, PASS_THROUGH, polling_interval_s, sync_period_s)
        self._started = False

    def step(self, o: Observation, target: FleetTarget) -> None:
        self.scaler.refresh(o)
        if not self._started:
            self.keda.start(o.t)
            self._started = True
        self.keda.step(o.t, target)


def composite_spec(metadata: Mapping[str, str]) -> ScalerSpec:
    """Trigger metadata through the scaler's own parser; the address is a placeholder, as
    nothing is queried. Raises `adapter.config.MetadataError` naming a bad key."""
    return parse_metadata({"prometheusAddress": "http://simulated:9090", **metadata})


class PrometheusQueueScaler:
    """KEDA's built-in Prometheus scaler on requests in flight: queried at each call."""

    def __init__(self, target_per_replica: float) -> None:
        self.target = target_per_replica
        self.latest: Observation | None = None

    def metric_target(self) -> float:
        return self.target

    def is_active(self) -> bool:
        return self.latest is not None and self.latest.queue > 0

    def metric(self) -> float:
        if self.latest is None:
            raise LookupError("nothing scraped yet")
        return self.latest.queue


class KedaQueueController(Controller):
    """KEDA on queue length: its Prometheus scaler, its loop, the HPA's default behavior."""

    def __init__(self, target_per_replica: float, min_replicas: int, max_replicas: int,
                 polling_interval_s: float = 30.0, sync_period_s: float = 15.0, name: str = "keda-queue") -> None:
        self.name = name
        self.scaler = PrometheusQueueScaler(target_per_replica)
        self.keda = KedaLoop(self.scaler, min_replicas, max_replicas, None, polling_interval_s, sync_period_s)
        self._started = False

    def step(self, o: Observation, target: FleetTarget) -> None:
        self.scaler.latest = o
        if not self._started:
            self.keda.start(o.t)
            self._started = True
        self.keda.step(o.t, target)


class HpaController(PeriodicController):
    """An HPA on one metric (through prometheus-adapter) with Kubernetes' default behavior."""

    def __init__(self, name: str, metric: Callable[[Observation], float | None], target_per_replica: float,
                 min_replicas: int, max_replicas: int) -> None:
        super().__init__()
        self.name = name
        self.metric = metric
        self.target = MetricTarget("AverageValue", target_per_replica)
        self.hpa = HorizontalPodAutoscaler(HpaSpec(min_replicas, max_replicas))

    def desired(self, o: Observation) -> int:
        return self.hpa.sync(o.t, o.serving, [(self.target, self.metric(o))], o.ready).desired_replicas


class FixedIntervalController(PeriodicController):
    """One replica more or fewer every 30 s, from the queue against the replicas' batch capacity."""

    name = "fixed-interval"
    period_s = 30.0

    def __init__(self, batch_capacity: int, min_replicas: int, max_replicas: int) -> None:
        super().__init__()
        self.capacity = batch_capacity
        self.min_replicas, self.max_replicas = min_replicas, max_replicas

    def desired(self, o: Observation) -> int:
        if o.queue > self.capacity * max(o.ready, 1):
            return min(self.max_replicas, o.serving + 1)
        if o.queue == 0:
            return max(self.min_replicas, o.serving - 1)
        return o.serving


class KnativeController(PeriodicController):
    """Knative's KPA with its defaults: every 2 s, concurrency averaged over a 60 s stable window
    and a 6 s panic window, aimed at 70 % of the container concurrency; panic when the panic
    window asks for at least twice the ready pods, and while panicking never scale down; at most
    halve the pods per decision (max-scale-down-rate 2)."""

    name = "knative"
    period_s = 2.0

    def __init__(self, container_concurrency: float, min_replicas: int, max_replicas: int,
                 stable_s: float = 60.0, panic_s: float = 6.0, panic_threshold: float = 2.0,
                 target_utilization: float = 0.7, max_scale_down_rate: float = 2.0) -> None:
        super().__init__()
        self.target = container_concurrency * target_utilization
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.stable_s, self.panic_s, self.panic_threshold = stable_s, panic_s, panic_threshold
        self.max_scale_down_rate = max_scale_down_rate
        self.history: deque[tuple[float, float]] = deque()
        self.panicking_until = -math.inf
        self.panic_peak = 0

    def desired(self, o: Observation) -> int:
        self.history.append((o.t, o.queue))
        while self.history[0][0] <= o.t - self.stable_s:
            self.history.popleft()
        stable = sum(q for _, q in self.history) / len(self.history)
        recent = [q for t, q in self.history if t > o.t - self.panic_s]
        panic = sum(recent) / len(recent)
        stable_want = math.ceil(stable / self.target)
        panic_want = math.ceil(panic / self.target)
        if panic / self.target >= self.panic_threshold * max(o.ready, 1):
            self.panicking_until = o.t + self.stable_s
        if o.t < self.panicking_until:  # in panic: never scale down, follow the panic window up
            self.panic_peak = max(self.panic_peak, panic_want, o.serving)
            want = self.panic_peak
        else:
            self.panic_peak = 0
            want = max(stable_want, math.ceil(o.ready / self.max_scale_down_rate))
        return max(self.min_replicas, min(self.max_replicas, want))


@dataclass(frozen=True)
class Point:
    """One timeline sample."""

    t: float
    serving: int
    ready: int
    queue: float
    p95_s: float | None
    arrivals_per_s: float


@dataclass
class PolicyResult:
    policy: str
    requests: int
    slo_attainment: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    rejected: int
    gpu_hours: float
    scale_events: int
    peak_queue: float
    timeline: list[Point] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The JSON object `--json` prints: every field but the timeline."""
        return {k: v for k, v in self.__dict__.items() if k != "timeline"}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


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
        peak_queue = max(peak_queue, observation.queue)
        controller.step(observation, target)
        if t >= next_point:
            before = arrived
            while arrived < len(arrivals) and arrivals[arrived].t_s <= t:
                arrived += 1
            timeline.append(Point(t, len(fleet.serving()), observation.ready, observation.queue, observation.p95_s,
                                  (arrived - before) / timeline_every_s))
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
        scale_events=target.events,
        peak_queue=peak_queue,
        timeline=timeline,
    )


def default_controllers(max_batch: int, min_replicas: int, max_replicas: int,
                        composite_metadata: Mapping[str, str] | None = None) -> list[Controller]:
    """The composite (shipped metadata unless given) and the four baselines as users run them."""
    metadata = {**SHIPPED_METADATA, **(composite_metadata or {})}
    return [
        CompositeController(metadata, min_replicas, max_replicas),
        *baselines(max_batch, min_replicas, max_replicas),
    ]


def baselines(max_batch: int, min_replicas: int, max_replicas: int) -> list[Controller]:
    return [
        HpaController("hpa-gpu", lambda o: None if o.gpu_util_percent is None else o.gpu_util_percent * o.ready,
                      75.0, min_replicas, max_replicas),
        KedaQueueController(5.0, min_replicas, max_replicas),
        FixedIntervalController(max_batch, min_replicas, max_replicas),
        KnativeController(float(max_batch), min_replicas, max_replicas),
    ]


def markdown(results: Sequence[PolicyResult], slo_s: float) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [f"| policy | SLO attainment (<= {slo_s:g} s) | p50 s | p95 s | p99 s | rejected | GPU-hours | scale events | peak queue |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.policy} | {100 * r.slo_attainment:.1f} % | {seconds(r.p50_s)} | {seconds(r.p95_s)} | "
                     f"{seconds(r.p99_s)} | {r.rejected} | {r.gpu_hours:.2f} | {r.scale_events} | {r.peak_queue:.0f} |")
    return "\n".join(lines)


def pareto_front(results: Sequence[PolicyResult]) -> list[PolicyResult]:
    """The results no other beats on both counts (SLO attainment up, GPU-hours down), cheapest first."""
    def dominated(r: PolicyResult) -> bool:
        return any(o.slo_attainment >= r.slo_attainment and o.gpu_hours <= r.gpu_hours
                   and (o.slo_attainment > r.slo_attainment or o.gpu_hours < r.gpu_hours) for o in results)

    return sorted((r for r in results if not dominated(r)), key=lambda r: (r.gpu_hours, -r.slo_attainment))


def sweep_grid(assignments: Sequence[str]) -> list[dict[str, str]]:
    """`KEY=V1,V2` (or `KEY=V1|V2` where values hold commas) assignments to every combination,
    as metadata overrides; raises ValueError."""
    axes: list[tuple[str, list[str]]] = []
    for assignment in assignments:
        key, sep, values = assignment.partition("=")
        # values that hold commas themselves (signals, weights) are separated by "|" instead
        choices = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ValueError(f"--sweep wants KEY=V1,V2,..., got {assignment!r}")
        if any(key.strip() == k for k, _ in axes):
            raise ValueError(f"--sweep names {key.strip()} twice")
        axes.append((key.strip(), choices))
    grid: list[dict[str, str]] = [{}]
    for key, choices in axes:
        grid = [{**point, key: value} for point in grid for value in choices]
    return grid


def sweep_name(overrides: Mapping[str, str]) -> str:
    return "composite " + " ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "composite"


def write_timelines(results: Sequence[PolicyResult], directory, slo_s: float) -> list:
    """One PNG per policy: replicas (asked for, ready) with arrivals, requests in flight, p95."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        t = [p.t / 60 for p in result.timeline]
        figure, (replicas, queue, latency) = plt.subplots(3, 1, sharex=True, figsize=(10, 7))
        replicas.step(t, [p.serving for p in result.timeline], where="post", label="replicas asked for")
        replicas.step(t, [p.ready for p in result.timeline], where="post", label="replicas ready")
        rate = replicas.twinx()
        rate.plot(t, [p.arrivals_per_s for p in result.timeline], color="0.6", linewidth=0.7, label="arrivals/s")
        rate.set_ylabel("arrivals/s")
        replicas.set_ylabel("replicas")
        replicas.legend(loc="upper left")
        queue.plot(t, [p.queue for p in result.timeline], label="requests in flight")
        queue.set_ylabel("requests in flight")
        latency.plot(t, [math.nan if p.p95_s is None else p.p95_s for p in result.timeline], label="p95 latency (1 m)")
        latency.axhline(slo_s, color="red", linestyle=":", label=f"objective {slo_s:g} s")
        latency.set_ylabel("seconds")
        latency.set_xlabel("minutes")
        latency.legend(loc="upper left")
        figure.suptitle(f"{result.policy}: {100 * result.slo_attainment:.1f} % within {slo_s:g} s, "
                        f"{result.gpu_hours:.2f} GPU-hours, {result.scale_events} scale events")
        figure.tight_layout()
        path = directory / (result.policy.replace(" ", "_").replace("=", "-").replace("/", "_") + ".png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


# -- replaying a local-stack run ---------------------------------------------------------

def replay_record(record: Mapping, profile: BatchProfile) -> PolicyResult:
    """Replays a local-stack run (`python -m adapter.stack --record`) through the simulator: the
    same arrivals, batching, metadata, KEDA polling and HPA sync, its workers' start-up delays,
    and `profile`'s shape scaled so that a batch of the run's mean size takes the seconds per
    batch its workers reported (CPU workers share cores, so a batch is slower than alone)."""
    settings = record["settings"]
    batches = record.get("batches")
    if batches and batches["batches"] > 0:
        mean_images = batches["images"] / batches["batches"]
        scale = (batches["busy_seconds"] / batches["batches"]) / profile.seconds(round(mean_images), profile.reference_steps)
        profile = BatchProfile(tuple((b, s * scale, u) for b, s, u in profile.table), profile.reference_steps)
    delays = sorted(record["startup_delays_s"]) or [0.0]
    startup = StartupDelay(delays[len(delays) // 2], max(delays[-1], delays[len(delays) // 2]))
    spec = FleetSpec(settings["max_batch"], settings["max_wait_ms"] / 1000, settings["max_queue"], profile, startup)
    arrivals = [Arrival(t, 1, settings["steps"]) for t in record["arrivals"]]
    controller = CompositeController(record["metadata"], settings["min_replicas"], settings["max_replicas"],
                                     settings["polling_interval_s"], settings["sync_period_s"])
    return replay(arrivals, controller, spec, slo_s=float(record["metadata"].get("targetP95Seconds", 10)),
                  initial_replicas=settings["min_replicas"], tail_s=settings["seconds"] - (arrivals[-1].t_s if arrivals else 0),
                  timeline_every_s=1.0)


# -- running many replays ------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One replay, described so it can cross a process boundary (controllers hold lambdas)."""

    kind: str  # "composite" or a baseline's name
    metadata: tuple[tuple[str, str], ...] = ()
    name: str = "composite"


@dataclass(frozen=True)
class Setup:
    fleet: FleetSpec
    slo_s: float
    min_replicas: int
    max_replicas: int
    polling_interval_s: float
    seed: int
    tail_s: float


_WORKER_STATE: tuple[Sequence[Arrival], Setup] | None = None


def _init_worker(arrivals: Sequence[Arrival], setup: Setup) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (arrivals, setup)


def _run_job(job: Job) -> PolicyResult:
    assert _WORKER_STATE is not None
    arrivals, setup = _WORKER_STATE
    return run_job(arrivals, setup, job)


def run_job(arrivals: Sequence[Arrival], setup: Setup, job: Job) -> PolicyResult:
    if job.kind == "composite":
        controller: Controller = CompositeController(dict(job.metadata), setup.min_replicas, setup.max_replicas,
                                                     setup.polling_interval_s, name=job.name)
    else:
        [controller] = [c for c in baselines(setup.fleet.max_batch, setup.min_replicas, setup.max_replicas)
                        if c.name == job.kind]
    return replay(arrivals, controller, setup.fleet, setup.slo_s, initial_replicas=setup.min_replicas,
                  seed=setup.seed, tail_s=setup.tail_s)


def run_jobs(arrivals: Sequence[Arrival], setup: Setup, jobs: Sequence[Job], processes: int = 1) -> list[PolicyResult]:
    """Replays each job, in `processes` processes when above 1; results in the jobs' order."""
    if processes <= 1 or len(jobs) <= 1:
        return [run_job(arrivals, setup, job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(arrivals, setup)) as pool:
        return list(pool.map(_run_job, jobs))


BASELINE_NAMES = ("hpa-gpu", "keda-queue", "fixed-interval", "knative")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    from adapter.config import MetadataError
    from lab.sim.fleet import BatchProfile, StartupDelay
    from lab.sim.traces import SCENARIOS, TraceError, load_trace, synthetic

    parser = argparse.ArgumentParser(prog="python -m adapter simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="CSV trace, one request per row")
    source.add_argument("--scenario", choices=SCENARIOS, help="a synthetic scenario instead of a trace")
    parser.add_argument("--time-column", default="TIMESTAMP", help="the trace's timestamp column (default TIMESTAMP)")
    parser.add_argument("--images-column", help="the trace's images-per-request column (default: 1 each)")
    parser.add_argument("--steps-column", help="the trace's denoising-steps column (default: 20 each)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="2 plays the trace twice as fast (default 1)")
    parser.add_argument("--duration", type=float, default=3600.0, help="scenario length, seconds (default 3600)")
    parser.add_argument("--base-rps", type=float, default=2.0, help="scenario's base rate (default 2)")
    parser.add_argument("--peak-rps", type=float, default=15.0, help="scenario's peak rate (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="arrivals' and start-up delays' seed (default 0)")
    parser.add_argument("--slo-seconds", type=float, default=10.0, help="the latency objective (default 10)")
    parser.add_argument("--max-batch", type=int, default=SHIPPED_MAX_BATCH, help="each replica's max batch (default 12)")
    parser.add_argument("--max-wait-ms", type=float, default=1000 * SHIPPED_MAX_WAIT_S, help="batch deadline (default 50)")
    parser.add_argument("--max-queue", type=int, default=SHIPPED_MAX_QUEUE,
                        help="images a replica holds waiting before it rejects (default 96)")
    parser.add_argument("--profile", type=Path, help="batch profile JSON {\"reference_steps\": 20, \"batches\": "
                        "[{\"batch\": 1, \"seconds\": 1.07, \"gpu_util_percent\": 27}, ...]} (default: DESIGN.md's H100 table)")
    parser.add_argument("--startup-median", type=float, default=23.0, help="replica start-up delay median, s (default 23)")
    parser.add_argument("--startup-p99", type=float, default=52.0, help="replica start-up delay p99, s (default 52)")
    parser.add_argument("--min-replicas", type=int, default=SHIPPED_MIN_REPLICAS, help="(default 1)")
    parser.add_argument("--max-replicas", type=int, default=SHIPPED_MAX_REPLICAS, help="(default 16)")
    parser.add_argument("--polling-interval", type=float, default=SHIPPED_POLLING_INTERVAL_S,
                        help="KEDA pollingInterval for the composite (default 15, the ScaledObject's)")
    parser.add_argument("--composite", action="append", default=[], metavar="KEY=VALUE",
                        help="composite trigger metadata over the shipped ScaledObject's (repeatable)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="run the composite over every combination of these metadata values (repeatable; "
                        "separate values with | where they hold commas, e.g. signals=queue,gpu|queue) "
                        "and print the Pareto front of SLO attainment against GPU-hours")
    parser.add_argument("--policies", default="composite," + ",".join(BASELINE_NAMES),
                        help="which policies to run, comma-separated (default: all five)")
    parser.add_argument("--tail", type=float, default=300.0, help="seconds simulated after the last arrival (default 300)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write a PNG timeline per policy into DIR")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON object per policy instead of the table")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"python -m adapter simulate: {message}", file=sys.stderr)
        return 2

    if args.min_replicas < 1 or args.max_replicas < args.min_replicas:
        return fail("need 1 <= --min-replicas <= --max-replicas (requests to zero replicas would have nowhere to wait)")
    if args.max_batch < 1 or args.max_queue < args.max_batch or args.max_wait_ms < 0:
        return fail("need --max-batch >= 1, --max-queue >= --max-batch and --max-wait-ms >= 0")
    if not 0 < args.startup_median <= args.startup_p99:
        return fail("need 0 < --startup-median <= --startup-p99")
    if args.slo_seconds <= 0 or args.tail < 0:
        return fail("need --slo-seconds > 0 and --tail >= 0")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in ("composite", *BASELINE_NAMES)]
    if unknown or not policies:
        return fail(f"--policies: unknown {', '.join(unknown) or '(none given)'}; "
                    f"accepted: composite, {', '.join(BASELINE_NAMES)}")
    try:
        overrides = dict(_assignment(a) for a in args.composite)
        grid = sweep_grid(args.sweep) if args.sweep else [{}]
        for point in grid:
            composite_spec({**SHIPPED_METADATA, **overrides, **point})
        profile = BatchProfile.from_file(args.profile) if args.profile else BatchProfile()
        if args.trace:
            arrivals = load_trace(args.trace, args.time_column, args.images_column, args.steps_column, args.time_scale)
        else:
            arrivals = synthetic(args.scenario, args.duration, args.base_rps, args.peak_rps, args.seed)
    except (TraceError, MetadataError, ValueError, OSError) as error:
        return fail(str(error))
    setup = Setup(FleetSpec(args.max_batch, args.max_wait_ms / 1000, args.max_queue, profile,
                            StartupDelay(args.startup_median, args.startup_p99)),
                  args.slo_seconds, args.min_replicas, args.max_replicas, args.polling_interval, args.seed, args.tail)
    jobs = []
    if "composite" in policies or args.sweep:
        for point in grid:
            metadata = {**SHIPPED_METADATA, **overrides, **point}
            jobs.append(Job("composite", tuple(sorted(metadata.items())), sweep_name(point)))
    jobs += [Job(name, name=name) for name in BASELINE_NAMES if name in policies]
    results = run_jobs(arrivals, setup, jobs, args.jobs)
    if args.json:
        front = {id(r) for r in pareto_front(results)}
        for result in results:
            print(json.dumps({**result.summary(), **({"pareto": id(result) in front} if args.sweep else {})}))
    else:
        print(f"{len(arrivals)} requests over {arrivals[-1].t_s / 60:.1f} min; objective {args.slo_seconds:g} s")
        print(markdown(results, args.slo_seconds))
        if args.sweep:
            print("\nPareto front (SLO attainment against GPU-hours, cheapest first):\n")
            print(markdown(pareto_front(results), args.slo_seconds))
    if args.plots:
        try:
            written = write_timelines(results, args.plots, args.slo_seconds)
        except ImportError:
            return fail("--plots needs matplotlib: pip install '.[stack]'")
        print(f"timelines: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--composite wants KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


if __name__ == "__main__":
    raise SystemExit(main())
