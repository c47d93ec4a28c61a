"""The local stack assembled and run: workers, balancer, Prometheus (or direct scrapes), the
scaler, a local KEDA + HPA over gRPC, the load, the live view, the timeline and the record.
Everything it starts is stopped on exit, Ctrl-C or failure."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapter._proto import externalscaler_pb2 as pb
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from adapter.access import DENIED_NETWORKS_BUT_LOOPBACK
from adapter.server import ScalerServer, ServerConfig
from lab.hpa import PASS_THROUGH
from lab.keda import GrpcScaler, KedaLoop
from lab.target import FleetTarget
from lab.localprom import LocalPrometheus, PrometheusNotFound, find_binary
from lab.stack.discovery import SELECTOR, prometheus_config, write_targets
from lab.stack.load import LoadStats, Scenario, generate_load
from lab.stack.queue import QueueFront
from lab.stack.record import write_record
from lab.stack.sample import Sampler, view_header, view_line
from lab.stack.workers import Balancer, WorkerFleet
from lab.timeline import TimelinePoint, write_timeline

MAX_WAIT_MS = 20  # each worker's --max-wait-ms
QUEUE_BATCHES = 16  # each worker's --max-queue, in max batches


def prometheus_installed() -> bool:
    try:
        find_binary()
    except PrometheusNotFound:
        return False
    return True


def gpu_count() -> int:
    """GPUs NVML sees here; 0 without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU: all mean CPU
        return 0


@dataclass(frozen=True)
class Profile:
    """What a run uses on this machine: CPU with the tiny model, or one worker per GPU with sd15."""

    device: str
    gpus: tuple[int, ...]
    arch: str
    max_batch: int
    steps: int
    peak_rps: float
    burst_rps: float
    target_p95_s: float


def profile_for(args: argparse.Namespace, gpus: int) -> Profile:
    use_gpu = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise SystemExit("stack: --device cuda, but NVML sees no GPU here")
        # sd15 at 512x512, 20 steps: about 6 images/s per H100 at batch 12 (docs/ARCHITECTURE.md)
        return Profile("cuda", tuple(range(gpus)), "sd15", args.max_batch or 12, args.steps or 20,
                       args.peak_rps or 5.0 * gpus, args.burst_rps or 8.0 * gpus, args.target_p95 or 8.0)
    return Profile("cpu", (), "tiny", args.max_batch or 4, args.steps or 8, args.peak_rps or 6.0,
                   args.burst_rps or 10.0, args.target_p95 or 2.0)


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="diffusion-stack-"))
    profile = profile_for(args, gpu_count() if args.device != "cpu" else 0)
    max_replicas = min(args.max_replicas, len(profile.gpus)) if profile.gpus else args.max_replicas
    model = args.model or workdir / profile.arch
    if args.model is None:
        from worker.modelbuild import make_model

        print(f"stack: building the {profile.arch} model (random weights) ...", flush=True)
        await asyncio.to_thread(make_model, model, profile.arch, 0, profile.device == "cuda")
    targets_file = workdir / "workers.json"
    exporters_file = workdir / "exporters.json"
    queued = args.mode == "queue"
    min_replicas = args.min_replicas if args.min_replicas is not None else (0 if queued else 1)
    front = QueueFront(workdir) if queued else None
    fleet = WorkerFleet(model, flags=("--max-batch-size", str(profile.max_batch), "--max-wait-ms", str(MAX_WAIT_MS),
                                      "--max-queue", str(QUEUE_BATCHES * profile.max_batch), "--drain-timeout", "30",
                                      *(front.worker_flags() if front else ())),
                        log_dir=workdir, device=profile.device, gpus=profile.gpus, exporters=bool(profile.gpus))
    direct = args.metrics_source == "direct" or (args.metrics_source == "auto" and not prometheus_installed())
    # kubernetes_api off: the stack has no cluster, and a machine with a service-account token
    # must not have the stack read a real one.
    # denied_networks: every server of the stack runs on loopback, which a cluster's scaler refuses.
    scaler = ScalerServer(ServerConfig(listen_address="127.0.0.1", grpc_port=0, http_port=0, kubernetes_api="off",
                                       scrape_targets_dir=str(workdir) if direct else None,
                                       denied_networks=DENIED_NETWORKS_BUT_LOOPBACK))
    balancer = Balancer(fleet)
    prometheus: LocalPrometheus | None = None
    channel = None
    points: list[TimelinePoint] = []
    sampler: Sampler | None = None
    stats = LoadStats()
    stop = asyncio.Event()
    try:
        if front is not None:
            await asyncio.to_thread(front.start)
        await scaler.start()
        fleet.scale_to(min_replicas)
        write_targets(targets_file, exporters_file, fleet, direct)
        if direct:
            source = {"scrapeTargetsFile": targets_file.name}
        else:
            try:
                prometheus = LocalPrometheus([], config_text=prometheus_config(
                    str(targets_file), str(exporters_file), f"127.0.0.1:{scaler.http_port}"))
                await asyncio.to_thread(prometheus.start)
            except PrometheusNotFound as error:
                print(f"stack: {error}", file=sys.stderr)
                return 2
            source = {"prometheusAddress": prometheus.url}
        if front is not None:
            source.update(front.scaler_metadata())
        sampler = Sampler(scaler, prometheus.url if prometheus else None, queue_from_scaler=queued)
        await balancer.start()
        policy_metadata = {
            "window": "10s",
            "signals": "queue,gpu,latency" if profile.gpus else "queue,latency",
            "targetQueuePerReplica": str(profile.max_batch),
            "targetP95Seconds": str(profile.target_p95_s),
            "scaleDownWindowSeconds": str(args.scale_down_window),
            "refreshSeconds": "1",
            # the policy's own windows, compressed like the rest: the queue's mean over 5 s, and
            # an idle fleet kept warm at most 10 s after its last request (then the cooldown)
            "queueSmoothingSeconds": "5",
            "keepWarmMaxSeconds": "10",
            "minReplicas": str(min_replicas),
            "maxReplicas": str(max_replicas),
            **dict(args.metadata),
        }
        ref = pb.ScaledObjectRef(name="sd-worker", namespace="local", scalerMetadata={
            **source, "selector": SELECTOR, **policy_metadata})
        channel = grpc.insecure_channel(f"127.0.0.1:{scaler.grpc_port}")
        keda = KedaLoop(GrpcScaler(pb_grpc.ExternalScalerStub(channel), ref), min_replicas, max_replicas, PASS_THROUGH,
                         polling_interval_s=args.polling_interval, sync_period_s=args.sync_period,
                         cooldown_s=args.cooldown)

        target = FleetTarget(fleet, lambda: write_targets(targets_file, exporters_file, fleet, direct))
        print(f"stack: waiting for {min_replicas} worker(s) to load the model ...", flush=True)
        while len(fleet.ready) < min_replicas:
            await asyncio.to_thread(fleet.refresh)
            await asyncio.sleep(0.5)
        await asyncio.to_thread(keda.start, time.monotonic())
        # Queue mode opens and ends quiet: the fleet starts at zero and must return there.
        scenario = Scenario(args.seconds, idle_rps=0.0 if queued else 0.5, peak_rps=profile.peak_rps,
                            burst_rps=profile.burst_rps)
        where = f"Prometheus {prometheus.url}" if prometheus else "no Prometheus: the scaler scrapes the workers itself"
        front_url = front.url if front else f"http://127.0.0.1:{balancer.port}"
        through = f"the gateway {front_url} (Redis {front.redis.url})" if front else front_url
        print(f"stack: {args.seconds:.0f} s scenario through {through}; {where}; "
              f"scaler gRPC 127.0.0.1:{scaler.grpc_port}; logs in {workdir}")
        print(view_header())
        started = time.monotonic()
        load = asyncio.create_task(generate_load(f"{front_url}/v1/images/generations", scenario,
                                                 profile.steps, stats, stop, started))
        while (elapsed := time.monotonic() - started) < args.seconds:
            await asyncio.to_thread(fleet.refresh)
            await asyncio.to_thread(keda.step, time.monotonic(), target)
            write_targets(targets_file, exporters_file, fleet, direct)
            point = await sampler.point(elapsed, scenario.rate(elapsed), fleet)
            points.append(point)
            print(view_line(point), flush=True)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started - elapsed)))
        stop.set()
        await load
        if args.timeline and points:
            write_timeline(points, args.timeline, "diffusion-autoscaler local stack" + (" (queue mode)" if queued else ""),
                           queue_label="backlog (Redis stream)" if queued else "requests in flight")
            print(f"stack: timeline written to {args.timeline}")
        if args.record:
            settings = {"max_batch": profile.max_batch, "max_wait_ms": MAX_WAIT_MS,
                        "max_queue": QUEUE_BATCHES * profile.max_batch, "steps": profile.steps,
                        "min_replicas": min_replicas, "max_replicas": max_replicas, "mode": args.mode,
                        "cooldown_s": args.cooldown,
                        "polling_interval_s": args.polling_interval, "sync_period_s": args.sync_period,
                        "seconds": args.seconds, "device": profile.device}
            write_record(Path(args.record), settings, policy_metadata, points, stats, fleet,
                         await sampler.batches(args.seconds + 120), await sampler.exported(args.seconds + 120))
            print(f"stack: record written to {args.record}")
        peak = max(p.desired for p in points) if points else 0
        print(f"stack: {stats.sent} requests, {stats.ok} ok, {stats.failed} failed; replicas peaked at {peak}, "
              f"ended at {fleet.desired}")
        return 0
    finally:
        stop.set()
        if channel is not None:
            channel.close()
        if sampler is not None:
            await sampler.close()
        await balancer.close()
        await asyncio.to_thread(fleet.close)
        await scaler.stop()
        if prometheus is not None:
            prometheus.close()
        if front is not None:
            await asyncio.to_thread(front.close)
