"""`python -m adapter.demo` (`make demo`): the scaler in its loop on one machine.

Real parts: Prometheus (the packaged binary, 1 s scrapes), the scaler service, and a client
that speaks the ExternalScaler protocol over gRPC on KEDA's schedule. Simulated, until the
local stack brings real workers: the fleet. Its pods report the worker's and the exporter's
metric names, with load from a scenario (idle, ramp, burst, cool-down) and service times
from the H100 SD-1.5 batching table in DESIGN.md; replicas the scaler asks for become ready
after a model-load delay. The HPA step here is plain `ceil(value / 1)` with the HPA's 10 %
tolerance, every 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import sys
import time

import grpc

from adapter._proto import externalscaler_pb2 as pb
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from adapter.localprom import LocalPrometheus, PrometheusNotFound
from adapter.server import ScalerServer, ServerConfig
from adapter.synthetic import PodLoad, SyntheticFleet

# DESIGN.md, H100 80GB, SD-1.5 shape, fp16, 512x512, 20 steps: batch -> (s per batch, NVML util %)
BATCH_TABLE = {1: (1.07, 27), 4: (1.18, 56), 8: (1.42, 78), 12: (1.85, 92), 16: (2.36, 96)}
MAX_BATCH = 16


def _interpolate(batch: float, column: int) -> float:
    sizes = sorted(BATCH_TABLE)
    batch = min(max(batch, sizes[0]), sizes[-1])
    i = bisect.bisect_left(sizes, batch)
    if sizes[i] == batch:
        return BATCH_TABLE[batch][column]
    low, high = sizes[i - 1], sizes[i]
    share = (batch - low) / (high - low)
    return BATCH_TABLE[low][column] + share * (BATCH_TABLE[high][column] - BATCH_TABLE[low][column])


def arrivals_per_s(t: float, length_s: float) -> float:
    """The scenario: idle, a ramp, a burst, a cool-down (images per second)."""
    phase = t / length_s
    if phase < 0.15:
        return 0.5
    if phase < 0.45:
        return 0.5 + (phase - 0.15) / 0.30 * 11.5
    if phase < 0.65:
        return 24.0
    return 1.0


class FleetModel:
    """A fluid model of batching replicas: one shared backlog, served in batches."""

    def __init__(self, startup_s: float):
        self.startup_s = startup_s
        self.backlog = 0.0  # images waiting or running
        self.ready_at: list[float] = [0.0]  # one replica, ready from the start

    def ready(self, now: float) -> int:
        return sum(1 for t in self.ready_at if t <= now)

    def scale_to(self, replicas: int, now: float) -> None:
        while len(self.ready_at) < replicas:
            self.ready_at.append(now + self.startup_s)
        # Scale-down removes the newest replicas first (those still loading go first).
        del self.ready_at[max(replicas, 0) :]

    def step(self, now: float, dt: float, arriving: float) -> PodLoad:
        """Advances the backlog; returns what each ready pod reports."""
        ready = self.ready(now)
        self.backlog += arriving * dt
        if ready == 0:
            return PodLoad(queue=self.backlog, ready=False)
        batch = min(MAX_BATCH, max(1.0, self.backlog / ready))
        seconds_per_batch = _interpolate(batch, 0)
        served = min(self.backlog, ready * batch / seconds_per_batch * dt)
        self.backlog -= served
        waiting = max(0.0, self.backlog - ready * batch)
        latency = seconds_per_batch + waiting / max(ready * batch / seconds_per_batch, 1e-9)
        util = _interpolate(batch, 1) if self.backlog > 0.01 else 0.0
        return PodLoad(
            queue=self.backlog / ready,
            ready=True,
            gpu_util_percent=util,
            latency_s=latency,
            requests_per_s=served / dt / ready,
        )


async def run(length_s: float, startup_s: float, max_replicas: int) -> int:
    fleet = SyntheticFleet()
    fleet_port = fleet.start()
    try:
        prometheus = LocalPrometheus([f"127.0.0.1:{fleet_port}"], scrape_interval_s=1.0).start()
    except PrometheusNotFound as e:
        fleet.stop()
        print(f"demo: {e}", file=sys.stderr)
        return 2
    scaler = ScalerServer(ServerConfig(listen_address="127.0.0.1", grpc_port=0, http_port=0))
    await scaler.start()
    model = FleetModel(startup_s)
    so = pb.ScaledObjectRef(
        name="sd-worker",
        namespace="demo",
        scalerMetadata={
            "prometheusAddress": prometheus.url,
            "selector": 'namespace="demo",deployment="sd-worker"',
            "window": "15s",
            "targetQueuePerReplica": str(MAX_BATCH),
            "targetGpuUtilization": "75",
            "targetP95Seconds": "6",
            "scaleDownWindowSeconds": "30",
            "refreshSeconds": "1",
            "minReplicas": "1",
            "maxReplicas": str(max_replicas),
        },
    )
    print(
        f"demo: Prometheus {prometheus.url}, scaler gRPC 127.0.0.1:{scaler.grpc_port}, "
        f"metrics http://127.0.0.1:{scaler.http_port}/metrics; {length_s:.0f} s, replicas load in {startup_s:.0f} s"
    )
    print(f"{'t':>5} {'img/s':>6} {'queue':>6} {'ready':>5} {'want':>4} {'gpu%':>5} {'lat s':>6}  proposals q/g/l  composite -> value")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}")
    stub = pb_grpc.ExternalScalerStub(channel)
    start = time.monotonic()
    next_hpa = next_print = 0.0
    desired, value, dt = 1, None, 0.25
    try:
        while (now := time.monotonic() - start) < length_s:
            load = model.step(now, dt, arrivals_per_s(now, length_s))
            ready = model.ready(now)
            for i, ready_at in enumerate(model.ready_at):
                is_ready = ready_at <= now
                pod_load = load if is_ready else PodLoad(queue=0, ready=False, gpu_util_percent=0.0)
                fleet.set_pod("demo", "sd-worker", f"sd-worker-{i}", pod_load)
            for i in range(len(model.ready_at), max_replicas):
                fleet.remove_pod("demo", "sd-worker", f"sd-worker-{i}")
            if now >= next_hpa:
                next_hpa += 15.0
                # KEDA's order: spec, then value and activity back to back.
                await stub.GetMetricSpec(so)
                try:
                    answer = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=so, metricName="composite"))
                    value = answer.metricValues[0].metricValueFloat
                    await stub.IsActive(so)
                except grpc.aio.AioRpcError as e:
                    print(f"      scaler: {e.code().name}: {e.details()}")
                else:
                    current = len(model.ready_at)
                    if abs(value / max(current, 1) - 1) > 0.1:  # the HPA's tolerance
                        desired = min(max(math.ceil(value - 1e-9), 1), max_replicas)
                        model.scale_to(desired, now)
            if now >= next_print:
                next_print += 3.0
                print(_line(scaler, now, arrivals_per_s(now, length_s), model, ready, desired, load))
            await asyncio.sleep(dt)
    finally:
        await channel.close()
        await scaler.stop()
        prometheus.close()
        fleet.stop()
    print("demo: done; the fleet was simulated, Prometheus and the scaler were real")
    return 0


def _line(scaler: ScalerServer, now: float, rate: float, model: FleetModel, ready: int, desired: int, load: PodLoad) -> str:
    targets = scaler.registry.targets()
    decision = targets[0].snapshot.decision if targets and targets[0].snapshot else None
    if decision is None:
        proposals = "   -/-/-"
        composite = "      -"
    else:
        p = decision.proposals
        proposals = "/".join(f"{p[s]:.0f}" if s in p else "-" for s in ("queue", "gpu", "latency"))
        composite = f"{decision.composite:>4.0f} -> {decision.value:.0f}" + (f" ({decision.held_by})" if decision.held_by else "")
    gpu = f"{load.gpu_util_percent:5.0f}" if load.gpu_util_percent is not None else "    -"
    return (
        f"{now:5.0f} {rate:6.1f} {model.backlog:6.1f} {ready:5d} {desired:4d} {gpu} "
        f"{load.latency_s if load.ready else 0:6.1f}  {proposals:>15}  {composite}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the scenario")
    parser.add_argument("--startup-seconds", type=float, default=20.0, help="model load time of a new replica")
    parser.add_argument("--max-replicas", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.seconds, args.startup_seconds, args.max_replicas))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
