"""Replays arrivals through the simulated fleet under several autoscaling policies, side by side.

Every policy sees the fleet only as Prometheus would: signals sampled every `scrape_s`, rates
and quantiles over `window_s`. The composite policy is the scaler's own decision code
(`adapter.policy.decide`, the module the service runs), polled as KEDA polls an external
scaler and applied through the HPA algorithm (`adapter.hpa`) with the pass-through behavior
of our manifests. The baselines are what users run today:

- `hpa-gpu`: HPA on GPU utilization, 75 % per replica (dcgm-exporter + prometheus-adapter),
  Kubernetes' default behavior;
- `keda-queue`: KEDA on queue length, 5 per replica, Kubernetes' default behavior;
- `fixed-interval`: every 30 s, one replica more when the queue exceeds the replicas' batch
  capacity, one fewer when it is empty;
- `knative`: Knative's KPA on concurrency (target = max batch per replica), 60 s stable
  window, 6 s panic window, panic at twice the capacity.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adapter.config import PolicySpec
from adapter.fleetsim import Fleet, FleetSpec
from adapter.hpa import PASS_THROUGH, HorizontalPodAutoscaler, HpaSpec, MetricTarget
from adapter.policy import PolicyState, Signals, decide
from adapter.traces import Arrival


@dataclass(frozen=True)
class Observation:
    """What Prometheus holds at `t`: the same series the worker and exporter export."""

    t: float
    queue: float  # requests in flight, summed
    ready: int
    serving: int  # replicas asked for and not draining
    gpu_util_percent: float | None  # mean over ready replicas of their utilization over the window
    p95_s: float | None  # p95 of requests finished inside the window


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
        finished = sorted(latency for _, latency in self._recent)
        p95 = finished[min(len(finished) - 1, math.ceil(0.95 * len(finished)) - 1)] if finished else None
        return Observation(now, float(fleet.in_flight()), len(ready), len(fleet.serving()),
                           sum(utils) / len(utils) if utils else None, p95)


class Controller:
    """A policy: called every `period_s` with an observation, answers a replica count."""

    name = "controller"
    period_s = 15.0

    def desired(self, observation: Observation) -> int:
        raise NotImplementedError


class CompositeController(Controller):
    """The scaler's decision core, polled by KEDA, applied by the HPA."""

    name = "composite"

    def __init__(self, spec: PolicySpec, min_replicas: int, max_replicas: int, sync_period_s: float = 15.0) -> None:
        self.spec = spec
        self.period_s = sync_period_s
        self.state = PolicyState()
        self.hpa = HorizontalPodAutoscaler(HpaSpec(min_replicas, max_replicas, PASS_THROUGH))

    def desired(self, o: Observation) -> int:
        signals = Signals(queue=o.queue, ready_replicas=o.ready, gpu_util_percent=o.gpu_util_percent, p95_seconds=o.p95_s)
        decision = decide(self.spec, signals, self.state, o.t)
        self.state = decision.state
        return self.hpa.sync(o.t, o.serving, [(MetricTarget("AverageValue", 1.0), decision.value)], o.ready).desired_replicas


class HpaController(Controller):
    """An HPA on one metric with Kubernetes' default behavior."""

    def __init__(self, name: str, metric: Callable[[Observation], float | None], target_per_replica: float,
                 min_replicas: int, max_replicas: int) -> None:
        self.name = name
        self.metric = metric
        self.target = MetricTarget("AverageValue", target_per_replica)
        self.hpa = HorizontalPodAutoscaler(HpaSpec(min_replicas, max_replicas))

    def desired(self, o: Observation) -> int:
        return self.hpa.sync(o.t, o.serving, [(self.target, self.metric(o))], o.ready).desired_replicas


class FixedIntervalController(Controller):
    """One replica more or fewer every 30 s, from the queue against the replicas' batch capacity."""

    name = "fixed-interval"
    period_s = 30.0

    def __init__(self, batch_capacity: int, min_replicas: int, max_replicas: int) -> None:
        self.capacity = batch_capacity
        self.min_replicas, self.max_replicas = min_replicas, max_replicas

    def desired(self, o: Observation) -> int:
        if o.queue > self.capacity * max(o.ready, 1):
            return min(self.max_replicas, o.serving + 1)
        if o.queue == 0:
            return max(self.min_replicas, o.serving - 1)
        return o.serving


class KnativeController(Controller):
    """Knative's KPA: stable and panic windows over observed concurrency."""

    name = "knative"
    period_s = 2.0

    def __init__(self, target_concurrency: float, min_replicas: int, max_replicas: int,
                 stable_s: float = 60.0, panic_s: float = 6.0, panic_threshold: float = 2.0) -> None:
        self.target = target_concurrency
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.stable_s, self.panic_s, self.panic_threshold = stable_s, panic_s, panic_threshold
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
            want = stable_want
        return max(self.min_replicas, min(self.max_replicas, want))


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
    timeline: list[tuple[float, int, int, float, float | None]] = field(default_factory=list)  # t, serving, ready, queue, p95


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def replay(arrivals: Sequence[Arrival], controller: Controller, fleet_spec: FleetSpec, slo_s: float,
           initial_replicas: int = 1, scrape_s: float = 1.0, window_s: float = 60.0, seed: int = 0,
           tail_s: float = 300.0) -> PolicyResult:
    """Runs the arrivals through a fleet scaled by `controller`; the run lasts until the last
    arrival plus `tail_s`, so the cool-down is paid for too."""
    fleet = Fleet(fleet_spec, seed=seed)
    fleet.scale_to(initial_replicas, startup_s=0)
    fleet.offer(arrivals)
    observer = Observer(fleet, window_s)
    end = (arrivals[-1].t_s if arrivals else 0.0) + tail_s
    next_control = 0.0
    events, peak_queue, timeline = 0, 0.0, []
    t = 0.0
    while t <= end:
        fleet.run_until(t)
        observation = observer.observe(t)
        peak_queue = max(peak_queue, observation.queue)
        if t >= next_control:
            next_control = t + controller.period_s
            want = controller.desired(observation)
            if want != observation.serving:
                fleet.scale_to(want)
                events += 1
        if int(t) % 5 == 0:
            timeline.append((t, len(fleet.serving()), observation.ready, observation.queue, observation.p95_s))
        t += scrape_s
    served = [r for r in fleet.requests if not r.rejected]
    latencies = sorted(r.latency_s if r.latency_s is not None else end - r.arrival.t_s for r in served)
    within = sum(1 for r in fleet.requests if not r.rejected and r.latency_s is not None and r.latency_s <= slo_s)
    return PolicyResult(
        policy=controller.name,
        requests=len(fleet.requests),
        slo_attainment=within / len(fleet.requests) if fleet.requests else 1.0,
        p50_s=percentile(latencies, 0.50),
        p95_s=percentile(latencies, 0.95),
        p99_s=percentile(latencies, 0.99),
        rejected=sum(1 for r in fleet.requests if r.rejected),
        gpu_hours=fleet.gpu_hours(end),
        scale_events=events,
        peak_queue=peak_queue,
        timeline=timeline,
    )


def default_controllers(max_batch: int, min_replicas: int, max_replicas: int, target_p95_s: float,
                        scale_down_window_s: float) -> list[Controller]:
    """The five policies with the defaults users run (baselines) and our scaler's defaults."""
    composite = PolicySpec(signals=("queue", "gpu", "latency"), target_queue_per_replica=max_batch,
                           target_p95_seconds=target_p95_s, scale_down_window_s=scale_down_window_s,
                           min_replicas=min_replicas, max_replicas=max_replicas)
    return [
        CompositeController(composite, min_replicas, max_replicas),
        HpaController("hpa-gpu", lambda o: None if o.gpu_util_percent is None else o.gpu_util_percent * o.ready,
                      75.0, min_replicas, max_replicas),
        HpaController("keda-queue", lambda o: o.queue, 5.0, min_replicas, max_replicas),
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from adapter.traces import SCENARIOS, TraceError, load_trace, synthetic

    parser = argparse.ArgumentParser(prog="python -m adapter.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="CSV trace, one request per row")
    source.add_argument("--scenario", choices=SCENARIOS, help="a synthetic scenario instead of a trace")
    parser.add_argument("--time-column", default="TIMESTAMP")
    parser.add_argument("--images-column")
    parser.add_argument("--steps-column")
    parser.add_argument("--time-scale", type=float, default=1.0, help="2 plays the trace twice as fast")
    parser.add_argument("--duration", type=float, default=3600.0, help="scenario length, seconds")
    parser.add_argument("--base-rps", type=float, default=2.0)
    parser.add_argument("--peak-rps", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-seconds", type=float, default=10.0, help="the latency objective")
    parser.add_argument("--max-batch", type=int, default=12)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=32)
    parser.add_argument("--target-p95", type=float, default=8.0, help="the composite's targetP95Seconds")
    parser.add_argument("--scale-down-window", type=float, default=300.0, help="the composite's scaleDownWindowSeconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per policy instead of the table")
    args = parser.parse_args(argv)
    try:
        if args.trace:
            arrivals = load_trace(args.trace, args.time_column, args.images_column, args.steps_column, args.time_scale)
        else:
            arrivals = synthetic(args.scenario, args.duration, args.base_rps, args.peak_rps, args.seed)
    except (TraceError, ValueError) as error:
        print(f"python -m adapter.simulate: {error}", file=sys.stderr)
        return 2
    spec = FleetSpec(max_batch=args.max_batch, max_queue_images=8 * args.max_batch)
    results = [replay(arrivals, controller, spec, args.slo_seconds, initial_replicas=args.min_replicas, seed=args.seed)
               for controller in default_controllers(args.max_batch, args.min_replicas, args.max_replicas,
                                                     args.target_p95, args.scale_down_window)]
    if args.json:
        for result in results:
            print(json.dumps({k: v for k, v in asdict(result).items() if k != "timeline"}))
    else:
        print(markdown(results, args.slo_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
