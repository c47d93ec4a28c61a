"""The replay simulator: observations as Prometheus would see them, and the policies side by side."""

from __future__ import annotations

import pytest

from adapter.config import PolicySpec
from adapter.fleetsim import Fleet, FleetSpec
from adapter.simulate import (
    CompositeController, FixedIntervalController, HpaController, KnativeController, Observation, Observer, replay,
)
from adapter.traces import Arrival, synthetic


def controllers():
    spec = PolicySpec(signals=("queue", "gpu", "latency"), target_queue_per_replica=12, target_p95_seconds=8,
                      min_replicas=1, max_replicas=12)
    return [
        CompositeController(spec, 1, 12),
        HpaController("hpa-gpu", lambda o: None if o.gpu_util_percent is None else o.gpu_util_percent * o.ready, 75, 1, 12),
        HpaController("keda-queue", lambda o: o.queue, 5, 1, 12),
        FixedIntervalController(12, 1, 12),
        KnativeController(12, 1, 12),
    ]


def test_a_saturated_replica_reads_its_batch_utilization_over_the_window():
    fleet = Fleet(FleetSpec(max_queue_images=10_000))
    fleet.scale_to(1, startup_s=0)
    fleet.offer(Arrival(0.0) for _ in range(2000))
    observer = Observer(fleet, window_s=30)
    for t in range(0, 61):
        fleet.run_until(t)
        observation = observer.observe(t)
    assert observation.gpu_util_percent == pytest.approx(92, abs=1)  # batch 12 on the H100 table
    assert observation.queue > 1000 and observation.ready == 1
    assert observation.p95_s is not None and observation.p95_s > 30


def test_every_policy_replays_deterministically_and_accounts_for_every_request():
    arrivals = synthetic("step", 600, 1, 20, seed=4)
    for controller, again in zip(controllers(), controllers(), strict=True):
        first = replay(arrivals, controller, FleetSpec(), slo_s=10, tail_s=120)
        second = replay(arrivals, again, FleetSpec(), slo_s=10, tail_s=120)
        assert first == second, controller.name
        assert first.requests == len(arrivals)
        assert 0 <= first.slo_attainment <= 1 and first.gpu_hours > 0
        assert max(serving for _, serving, _, _, _ in first.timeline) > 1, f"{controller.name} never scaled up"


def test_the_composite_runs_the_scalers_own_decision_code():
    import adapter.simulate as simulate

    assert simulate.decide is __import__("adapter.policy", fromlist=["decide"]).decide


def test_knative_does_not_scale_down_while_panicking():
    knative = KnativeController(target_concurrency=10, min_replicas=1, max_replicas=20)
    assert knative.desired(Observation(0, queue=100, ready=1, serving=1, gpu_util_percent=None, p95_s=None)) == 10
    # the burst ends, but the panic window (60 s) holds the peak
    assert knative.desired(Observation(10, queue=0, ready=10, serving=10, gpu_util_percent=None, p95_s=None)) == 10
    assert knative.desired(Observation(80, queue=0, ready=10, serving=10, gpu_util_percent=None, p95_s=None)) == 1
