"""`python -m adapter.stack`: the whole loop on one machine, scaling real workers.

Real parts, all of them:
- worker processes (`python -m worker serve`: the tiny model on the CPU, or, where NVML sees
  GPUs, the sd15 model with one worker per GPU and an exporter beside each), behind a
  balancer that sends each request to the worker with the fewest in flight;
- Prometheus (the packaged binary) scraping the workers (file discovery, rewritten as
  workers come and go) and the scaler, every second; without Prometheus, the scaler scrapes
  the same file's workers itself (`scrapeTargetsFile`, adapter/directscrape.py);
- the scaler, and a local KEDA + HPA (`lab.keda`, `lab.hpa`) that calls it over
  gRPC on KEDA's schedule and scales the worker processes: new workers start, surplus ones
  get SIGTERM and drain.

A load generator plays a scenario (idle, ramp, burst, cool-down) against the balancer; a line
a second shows replicas desired and ready, queue, p95, busy fraction and each signal's
proposal; at the end a PNG timeline is written. Everything started is stopped on exit,
Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import requests

from adapter._proto import externalscaler_pb2 as pb
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from lab.hpa import PASS_THROUGH
from lab.keda import GrpcScaler, KedaLoop, Tick
from lab.stack.workers import Balancer, WorkerFleet
from lab.localprom import LocalPrometheus, PrometheusNotFound, find_binary
from adapter.server import ScalerServer, ServerConfig

log = logging.getLogger("adapter.stack")

MAX_WAIT_MS = 20  # each worker's --max-wait-ms
QUEUE_BATCHES = 16  # each worker's --max-queue, in max batches


@dataclass(frozen=True)
class Scenario:
    """Offered load in requests per second over a run of `length_s`."""

    length_s: float
    idle_rps: float = 0.5
    peak_rps: float = 6.0
    burst_rps: float = 10.0

    def rate(self, t: float) -> float:
        phase = t / self.length_s
        if phase < 0.15:
            return self.idle_rps
        if phase < 0.45:
            return self.idle_rps + (phase - 0.15) / 0.30 * (self.peak_rps - self.idle_rps)
        if phase < 0.65:
            return self.burst_rps
        return self.idle_rps


@dataclass
class Sample:
    t: float
    offered_rps: float
    desired: int
    ready: int
    queue: float | None
    p95_s: float | None
    busy: float | None
    proposals: dict[str, float] = field(default_factory=dict)
    composite: float | None = None
    served: float | None = None


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # seconds from the scenario's start, as sent


def prometheus_config(targets_file: str, exporters_file: str, scaler_address: str) -> str:
    return json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "diffusion-worker", "scrape_timeout": "1s",
             "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}]},
            # The exporters label their series with their worker as the pod: keep those labels.
            {"job_name": "diffusion-gpu-exporter", "honor_labels": True, "scrape_timeout": "1s",
             "file_sd_configs": [{"files": [exporters_file], "refresh_interval": "1s"}]},
            {"job_name": "diffusion-scaler", "honor_labels": True, "scrape_timeout": "1s",
             "static_configs": [{"targets": [scaler_address]}]},
        ],
    })


def write_targets(path: Path, exporters_path: Path, fleet: WorkerFleet, direct: bool) -> None:
    """The file discovery of the workers (and of their exporters: a file of their own for
    Prometheus, the same file for the scaler's direct scrapes)."""
    workers = [{"targets": [w.address], "labels": {"namespace": "local", "deployment": "sd-worker", "pod": w.name}}
               for w in fleet.workers if w.alive()]
    exporters = [{"targets": [address], "labels": {"namespace": "local", "deployment": "sd-worker"}}
                 for address, _ in fleet.exporter_addresses()]
    files = {path: workers + exporters} if direct else {path: workers, exporters_path: exporters}
    for target, groups in files.items():
        scratch = target.with_suffix(".tmp")
        scratch.write_text(json.dumps(groups))
        scratch.replace(target)  # atomic: a reader never sees half a file


async def generate_load(url: str, scenario: Scenario, steps: int, stats: LoadStats, stop: asyncio.Event,
                        started: float) -> None:
    """Open-loop Poisson arrivals at the scenario's rate; each request in its own task."""
    rng = random.Random(7)
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one() -> None:
            began = time.monotonic()
            try:
                body = {"prompt": "a lighthouse at dusk", "num_inference_steps": steps, "seed": rng.randrange(1 << 30)}
                async with session.post(url, json=body) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except aiohttp.ClientError:
                ok = False
            stats.ok += ok
            stats.failed += not ok
            if ok:
                stats.latencies.append(time.monotonic() - began)

        while not stop.is_set():
            rate = scenario.rate(time.monotonic() - started)
            await asyncio.sleep(rng.expovariate(rate))
            if stop.is_set():
                break
            stats.sent += 1
            stats.arrivals.append(time.monotonic() - started)
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=60)


def query(prometheus: LocalPrometheus, promql: str) -> float | None:
    try:
        result = requests.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=2).json()["data"]["result"]
    except (requests.RequestException, KeyError, ValueError):
        return None
    return float(result[0]["value"][1]) if result else None


def view_line(sample: Sample) -> str:
    def number(value: float | None, width: int, digits: int = 1) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else "-".rjust(width)

    proposals = "/".join(f"{sample.proposals[s]:.1f}" if s in sample.proposals else "-"
                         for s in ("queue", "gpu", "latency"))
    composite = f"{number(sample.composite, 4)} -> {number(sample.served, 3, 0)}" if sample.composite is not None else "-"
    return (f"{sample.t:5.0f} {sample.offered_rps:6.1f} {sample.desired:4d} {sample.ready:5d} {number(sample.queue, 6)} "
            f"{number(sample.p95_s, 6, 2)} {number(sample.busy, 5, 2)}  {proposals:>13}  {composite}")


def prometheus_installed() -> bool:
    try:
        find_binary()
    except PrometheusNotFound:
        return False
    return True


def write_timeline(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    figure, (replicas, queue, latency) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    replicas.step(t, [s.desired for s in samples], where="post", label="desired")
    replicas.step(t, [s.ready for s in samples], where="post", label="ready")
    replicas.plot(t, [s.offered_rps for s in samples], ":", label="offered req/s")
    replicas.set_ylabel("replicas")
    replicas.legend(loc="upper left")
    queue.plot(t, [s.queue if s.queue is not None else float("nan") for s in samples], label="requests in flight")
    for signal_name in ("queue", "gpu", "latency"):
        queue.plot(t, [s.proposals.get(signal_name, float("nan")) for s in samples], "--", label=f"{signal_name} proposal")
    queue.set_ylabel("requests / replicas")
    queue.legend(loc="upper left")
    latency.plot(t, [s.p95_s if s.p95_s is not None else float("nan") for s in samples], label="p95 latency (s)")
    latency.plot(t, [s.busy if s.busy is not None else float("nan") for s in samples], label="busy fraction")
    latency.set_xlabel("seconds")
    latency.legend(loc="upper left")
    figure.suptitle("diffusion-autoscaler local stack")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class FleetTarget:
    """The worker fleet as the controller's scale target; `on_change` republishes discovery."""

    def __init__(self, fleet: WorkerFleet, on_change) -> None:
        self.fleet = fleet
        self.on_change = on_change

    @property
    def desired(self) -> int:
        return self.fleet.desired

    def ready_count(self) -> int:
        return len(self.fleet.ready)

    def scale_to(self, replicas: int) -> None:
        self.fleet.scale_to(replicas)
        self.on_change()


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
        # sd15 at 512x512, 20 steps: about 6 images/s per H100 at batch 12 (DESIGN.md)
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
    fleet = WorkerFleet(model, flags=("--max-batch-size", str(profile.max_batch), "--max-wait-ms", str(MAX_WAIT_MS),
                                      "--max-queue", str(QUEUE_BATCHES * profile.max_batch), "--drain-timeout", "30"),
                        log_dir=workdir, device=profile.device, gpus=profile.gpus, exporters=bool(profile.gpus))
    direct = args.metrics_source == "direct" or (args.metrics_source == "auto" and not prometheus_installed())
    scaler = ScalerServer(ServerConfig(listen_address="127.0.0.1", grpc_port=0, http_port=0,
                                       scrape_targets_dir=str(workdir) if direct else None))
    balancer = Balancer(fleet)
    prometheus: LocalPrometheus | None = None
    channel = None
    samples: list[Sample] = []
    stats = LoadStats()
    stop = asyncio.Event()
    try:
        await scaler.start()
        fleet.scale_to(args.min_replicas)
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
        await balancer.start()
        policy_metadata = {
            "window": "10s",
            "signals": "queue,gpu,latency" if profile.gpus else "queue,latency",
            "targetQueuePerReplica": str(profile.max_batch),
            "targetP95Seconds": str(profile.target_p95_s),
            "scaleDownWindowSeconds": str(args.scale_down_window),
            "refreshSeconds": "1",
            "minReplicas": str(args.min_replicas),
            "maxReplicas": str(max_replicas),
            **dict(metadata_override(item) for item in args.metadata),
        }
        ref = pb.ScaledObjectRef(name="sd-worker", namespace="local", scalerMetadata={
            **source, "selector": 'namespace="local",deployment="sd-worker"', **policy_metadata})
        channel = grpc.insecure_channel(f"127.0.0.1:{scaler.grpc_port}")
        keda = KedaLoop(GrpcScaler(pb_grpc.ExternalScalerStub(channel), ref), args.min_replicas, max_replicas, PASS_THROUGH,
                         polling_interval_s=args.polling_interval, sync_period_s=args.sync_period)

        target = FleetTarget(fleet, lambda: write_targets(targets_file, exporters_file, fleet, direct))
        print(f"stack: waiting for {args.min_replicas} worker(s) to load the model ...", flush=True)
        while len(fleet.ready) < args.min_replicas:
            await asyncio.to_thread(fleet.refresh)
            await asyncio.sleep(0.5)
        await asyncio.to_thread(keda.start, time.monotonic())
        scenario = Scenario(args.seconds, peak_rps=profile.peak_rps, burst_rps=profile.burst_rps)
        where = f"Prometheus {prometheus.url}" if prometheus else "no Prometheus: the scaler scrapes the workers itself"
        print(f"stack: {args.seconds:.0f} s scenario through http://127.0.0.1:{balancer.port}; {where}; "
              f"scaler gRPC 127.0.0.1:{scaler.grpc_port}; logs in {workdir}")
        print(f"{'t':>5} {'req/s':>6} {'want':>4} {'ready':>5} {'queue':>6} {'p95 s':>6} {'busy':>5}  {'q/g/l propose':>13}  composite -> served")
        started = time.monotonic()
        load = asyncio.create_task(generate_load(f"http://127.0.0.1:{balancer.port}/v1/images/generations", scenario,
                                                 profile.steps, stats, stop, started))
        while (elapsed := time.monotonic() - started) < args.seconds:
            await asyncio.to_thread(fleet.refresh)
            tick: Tick | None = await asyncio.to_thread(keda.step, time.monotonic(), target)
            del tick
            write_targets(targets_file, exporters_file, fleet, direct)
            decision = signals = None
            for registered in scaler.registry.targets():
                if registered.snapshot is not None:
                    decision, signals = registered.snapshot.decision, registered.snapshot.signals
            if prometheus is not None:
                queue = query(prometheus, 'sum(diffusion_requests_in_flight{deployment="sd-worker"})')
                p95 = query(prometheus, 'histogram_quantile(0.95, sum by (le) '
                                        '(rate(diffusion_request_duration_seconds_bucket{deployment="sd-worker"}[10s])))')
                busy = query(prometheus, 'avg(rate(diffusion_busy_seconds_total{deployment="sd-worker"}[10s]))')
            else:  # what the scaler itself read from the workers
                queue = signals.queue if signals else None
                p95 = signals.p95_seconds if signals else None
                busy = None
            sample = Sample(
                t=elapsed,
                offered_rps=scenario.rate(elapsed),
                desired=fleet.desired,
                ready=len(fleet.ready),
                queue=queue,
                p95_s=p95,
                busy=busy,
                proposals=dict(decision.proposals) if decision else {},
                composite=decision.composite if decision else None,
                served=decision.value if decision else None,
            )
            samples.append(sample)
            print(view_line(sample), flush=True)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started - elapsed)))
        stop.set()
        await load
        if args.timeline and samples:
            write_timeline(samples, Path(args.timeline))
            print(f"stack: timeline written to {args.timeline}")
        if args.record:
            write_record(Path(args.record), args, profile, policy_metadata, max_replicas, samples, stats, fleet,
                         prometheus)
            print(f"stack: record written to {args.record}")
        peak = max(s.desired for s in samples) if samples else 0
        print(f"stack: {stats.sent} requests, {stats.ok} ok, {stats.failed} failed; replicas peaked at {peak}, "
              f"ended at {fleet.desired}")
        return 0
    finally:
        stop.set()
        if channel is not None:
            channel.close()
        await balancer.close()
        await asyncio.to_thread(fleet.close)
        await scaler.stop()
        if prometheus is not None:
            prometheus.close()


def metadata_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"stack: --metadata wants KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


def write_record(path: Path, args: argparse.Namespace, profile: Profile, metadata: dict[str, str], max_replicas: int,
                 samples: list[Sample], stats: LoadStats, fleet: WorkerFleet, prometheus: LocalPrometheus | None) -> None:
    """What a replay of this run needs (adapter/simulate.py): the settings, the arrivals as sent,
    the replicas over time, the workers' start-up delays, and their batches as Prometheus saw them."""
    batches = None
    if prometheus is not None:
        span = f"{int(args.seconds) + 120}s"
        sums = {name: query(prometheus, f'sum(increase({metric}{{deployment="sd-worker"}}[{span}]))')
                for name, metric in (("busy_seconds", "diffusion_busy_seconds_total"),
                                     ("batches", "diffusion_batch_size_count"), ("images", "diffusion_batch_size_sum"))}
        batches = sums if all(v is not None for v in sums.values()) else None
    path.write_text(json.dumps({
        "settings": {"max_batch": profile.max_batch, "max_wait_ms": MAX_WAIT_MS,
                     "max_queue": QUEUE_BATCHES * profile.max_batch,
                     "steps": profile.steps, "min_replicas": args.min_replicas, "max_replicas": max_replicas,
                     "polling_interval_s": args.polling_interval, "sync_period_s": args.sync_period,
                     "seconds": args.seconds, "device": profile.device},
        "metadata": metadata,
        "arrivals": stats.arrivals,
        "timeline": [{"t": s.t, "desired": s.desired, "ready": s.ready} for s in samples],
        "startup_delays_s": fleet.startup_delays,
        "batches": batches,
        "requests": {"sent": stats.sent, "ok": stats.ok, "failed": stats.failed},
    }, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adapter.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="length of the scenario")
    parser.add_argument("--model", type=Path, help="a pipeline directory; default: build the tiny model")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4, help="at most one per GPU on GPUs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: one worker per GPU with the sd15 model and an exporter each when NVML sees "
                        "GPUs, else the tiny model on the CPU")
    parser.add_argument("--max-batch", type=int, help="each worker's --max-batch-size, and the queue target "
                        "(default 4 on CPU, 12 on GPU)")
    parser.add_argument("--steps", type=int, help="denoising steps per request (default 8 on CPU, 20 on GPU)")
    parser.add_argument("--peak-rps", type=float, help="requests per second at the top of the ramp "
                        "(default 6 on CPU, 5 per GPU)")
    parser.add_argument("--burst-rps", type=float, help="requests per second during the burst (default 10 on CPU, 8 per GPU)")
    parser.add_argument("--target-p95", type=float, help="the ScaledObject's targetP95Seconds (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--scale-down-window", type=float, default=20.0, help="scaleDownWindowSeconds, compressed")
    parser.add_argument("--polling-interval", type=float, default=2.0, help="KEDA pollingInterval, compressed")
    parser.add_argument("--sync-period", type=float, default=3.0, help="the HPA's sync period, compressed")
    parser.add_argument("--metrics-source", choices=["auto", "prometheus", "direct"], default="auto",
                        help="where the scaler reads the signals: Prometheus (when installed, for auto) or the "
                        "workers' /metrics scraped by the scaler itself (adapter/directscrape.py)")
    parser.add_argument("--timeline", default="stack-timeline.png", help="PNG written at the end; empty for none")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="trigger metadata over the stack's own (repeatable), e.g. minBusyReplicas=1")
    parser.add_argument("--record", help="write what a replay of this run needs (settings, arrivals, replicas over "
                        "time, start-up delays, batches) as JSON here, for adapter.simulate.replay_record (tests/integration/test_stack.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # workers share the cores: one thread each
    loop = asyncio.new_event_loop()
    task = loop.create_task(run(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("stack: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
