"""Scaler RPC benchmark: 500 ScaledObjects against a real Prometheus, GetMetrics from
concurrent client processes, the cached scaler side by side with one that queries
Prometheus on every call (what KEDA's built-in prometheus scaler does).

    make bench            # or: .venv/bin/python bench/scaler_rpc.py --help

Phases alternate (cached, direct, ceiling, cached, ...) so drift on a noisy machine hits all
alike; "ceiling" is grpcio's own asyncio server answering a constant (bench/grpc_ceiling.py),
the most any Python gRPC server can answer on the same cores. One server runs at a time.
Client-observed latency is measured per call with perf_counter in the client processes, so
it includes the client's own gRPC overhead. Open-loop phases then offer a fixed rate and
measure latency from each call's scheduled start (no coordinated omission).

On a machine with spare cores, --scaler-cpus pins the server under test to a 2-core slice,
and --client-cpus and --prometheus-cpus keep the clients and Prometheus off it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import pathlib
import platform
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import requests  # noqa: E402

from adapter._proto import externalscaler_pb2 as pb  # noqa: E402
from adapter._proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402
from lab.localprom import LocalPrometheus, free_port  # noqa: E402
from lab.sim.report import percentile  # noqa: E402
from lab.synthetic import PodLoad, SyntheticPods  # noqa: E402


def make_refs(count: int, prometheus_url: str, refresh_s: float = 5.0) -> list[pb.ScaledObjectRef]:
    refs = []
    for i in range(count):
        metadata = {
            "scalerAddress": "diffusion-scaler.keda:6000",
            "prometheusAddress": prometheus_url,
            "selector": f'namespace="bench",deployment="sd-{i}"',
            "signals": "queue,gpu",
            "targetQueuePerReplica": "8",
            "targetGpuUtilization": "75",
            "scaleDownWindowSeconds": "300",
            "refreshSeconds": f"{refresh_s:g}",
            "staleAfterSeconds": f"{max(60.0, 2 * refresh_s):g}",
        }
        refs.append(pb.ScaledObjectRef(name=f"sd-{i}", namespace="bench", scalerMetadata=metadata))
    return refs


# --- client processes ------------------------------------------------------------------


async def _timed_call(stub, rng, refs, since: float) -> float | None:
    """One GetMetrics on a random ScaledObject: seconds from `since` to its answer, None on error."""
    request = pb.GetMetricsRequest(scaledObjectRef=rng.choice(refs), metricName="composite")
    try:
        await stub.GetMetrics(request, timeout=10)
    except grpc.aio.AioRpcError:
        return None
    return time.perf_counter() - since


async def _closed_loop(address, refs, concurrency, duration_s, seed):
    rng = random.Random(seed)
    latencies, errors = [], 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        deadline = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                latency = await _timed_call(stub, rng, refs, since=time.perf_counter())
                if latency is None:
                    errors += 1
                else:
                    latencies.append(latency)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def _open_loop(address, refs, rate_per_s, duration_s, seed):
    rng = random.Random(seed)
    latencies, errors = [], 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=refs[0], metricName="composite"))
        start = time.perf_counter()
        total = int(rate_per_s * duration_s)
        pending = set()

        async def one(scheduled):
            nonlocal errors
            latency = await _timed_call(stub, rng, refs, since=scheduled)
            if latency is None:
                errors += 1
            else:
                latencies.append(latency)

        for i in range(total):
            scheduled = start + i / rate_per_s
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    return latencies, errors


def _client_process(mode, address, refs_bytes, arg, duration_s, seed, out, cpus):
    if cpus:
        os.sched_setaffinity(0, cpus)
    # The instrument must not pause: a client's GC pause would read as server latency.
    gc.disable()
    refs = [pb.ScaledObjectRef.FromString(b) for b in refs_bytes]
    if mode == "closed":
        result = asyncio.run(_closed_loop(address, refs, arg, duration_s, seed))
    else:
        result = asyncio.run(_open_loop(address, refs, arg, duration_s, seed))
    out.put(result)


def drive(mode, address, refs, processes, arg, duration_s, cpus=None):
    """Runs client processes; returns (calls/s, sorted latencies in seconds, errors)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    refs_bytes = [r.SerializeToString() for r in refs]
    procs = [
        ctx.Process(target=_client_process, args=(mode, address, refs_bytes, arg, duration_s, i, out, cpus))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration_s + 120) for _ in procs]
    for p in procs:
        p.join(30)
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = sum(e for _, e in results)
    return len(latencies) / duration_s, latencies, errors


# --- servers -----------------------------------------------------------------------------


def pin(pid: int, cpus: set[int] | None) -> None:
    """Moves every thread of a running process onto `cpus`."""
    if not cpus:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # a thread that ended meanwhile


def parse_cpus(text: str | None) -> set[int] | None:
    if not text:
        return None
    cpus = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def start_scaler(command: list[str], grpc_port: int, http_port: int, cpus: set[int] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        command + ["--listen-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                   "--log-level", "warning", "--idle-forget-seconds", "3600"],
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{command} did not become healthy")


def register(address: str, refs: list[pb.ScaledObjectRef]) -> float:
    """KEDA's first contact for every ScaledObject: GetMetricSpec, then GetMetrics."""
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        for r in refs:
            stub.GetMetricSpec(r, timeout=30)
        futures = [stub.GetMetrics.future(pb.GetMetricsRequest(scaledObjectRef=r, metricName="composite"), timeout=60) for r in refs]
        for f in futures:
            f.result()
    return time.perf_counter() - started


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(name, rate, latencies, errors) -> dict:
    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "phase": name,
        "rpc_per_s": round(rate, 1),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "calls": len(latencies),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaled-objects", type=int, default=500)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument(
        "--concurrency", default="1,4", help="comma list: calls in flight per client process in the closed-loop phases"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of closed-loop phases, one per server")
    parser.add_argument(
        "--servers",
        default="cached,direct,ceiling",
        help="closed-loop phases per round among cached, direct, ceiling and idle (the cached scaler "
        "with refreshes an hour apart: what the background refresh costs)",
    )
    parser.add_argument("--open-loop-rates", default="1000,2000", help="comma list of RPC/s offered open-loop ('' skips)")
    parser.add_argument("--scaler-cpus", help="pin the server under test to these CPUs, e.g. 0,1")
    parser.add_argument("--prometheus-cpus", help="pin Prometheus to these CPUs (default: with the scaler)")
    parser.add_argument("--client-cpus", help="pin the client processes to these CPUs, e.g. 2-7")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()
    scaler_cpus, client_cpus = parse_cpus(args.scaler_cpus), parse_cpus(args.client_cpus)
    prometheus_cpus = parse_cpus(args.prometheus_cpus) or scaler_cpus

    fleet = SyntheticPods()
    fleet_port = fleet.start()
    rng = random.Random(1)
    for i in range(args.scaled_objects):
        load = PodLoad(queue=rng.randint(0, 40), gpu_util_percent=rng.uniform(20, 100))
        fleet.set_pod("bench", f"sd-{i}", f"sd-{i}-0", load)

    prom = LocalPrometheus([f"127.0.0.1:{fleet_port}"], scrape_interval_s=1.0).start()
    pin(prom.pid, prometheus_cpus)
    refs = make_refs(args.scaled_objects, prom.url)
    idle_refs = make_refs(args.scaled_objects, prom.url, refresh_s=3600)
    prom.wait_for_scrapes()
    time.sleep(1.5)  # one more scrape, so every selector has series

    python = sys.executable
    commands = {
        "cached": [python, "-m", "adapter"],
        "direct": [python, "bench/direct_scaler.py"],
        "ceiling": [python, "bench/grpc_ceiling.py"],
        "idle": [python, "-m", "adapter"],
    }
    results = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
        "scaler_cpus": args.scaler_cpus or "all",
        "client_cpus": args.client_cpus or "all",
        "prometheus_cpus": args.prometheus_cpus or args.scaler_cpus or "all",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "scaled_objects": args.scaled_objects,
        "client_processes": args.client_processes,
        "concurrency_per_process": args.concurrency,
        "phase_seconds": args.seconds,
        "phases": [],
    }

    def phase(name: str, label: str, mode: str, arg: float) -> dict:
        # One server at a time: a scaler refreshes 500 targets in the background, and two
        # would share the cores with each other as well as with the clients.
        grpc_port = free_port()
        process = start_scaler(commands[name], grpc_port, free_port(), scaler_cpus)
        address = f"127.0.0.1:{grpc_port}"
        these_refs = idle_refs if name == "idle" else refs
        try:
            seconds = register(address, these_refs) if name != "ceiling" else 0.0
            cpu_before, wall_before = process_cpu_s(process.pid), time.monotonic()
            rate, latencies, errors = drive(
                mode, address, these_refs, args.client_processes, arg, args.seconds, client_cpus
            )
            # over the whole drive, client start-up included: a lower bound while loaded
            cpu_s, wall_s = process_cpu_s(process.pid) - cpu_before, time.monotonic() - wall_before
            row = summary(label, rate, latencies, errors)
            row["server_cpu_cores"] = round(cpu_s / wall_s, 2)
            row["registration_s"] = round(seconds, 1)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        results["phases"].append(row)
        print(json.dumps(row), flush=True)
        return row

    servers = args.servers.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    closed: dict[tuple[str, int], list[dict]] = {}
    try:
        for round_index in range(args.rounds):
            for level in levels:
                in_flight = level * args.client_processes
                for name in servers:
                    label = f"{name} closed-loop, {in_flight} in flight, #{round_index + 1}"
                    closed.setdefault((name, level), []).append(phase(name, label, "closed", level))
        for rate in (float(r) for r in args.open_loop_rates.split(",") if r.strip()):
            for name in ("cached", "ceiling"):
                phase(name, f"{name} open-loop at {rate:g}/s", "open", rate / args.client_processes)
    finally:
        prom.close()
        fleet.stop()

    for other in ("direct", "ceiling", "idle"):
        ratios = {}
        for level in levels:
            pairs = zip(closed.get(("cached", level), []), closed.get((other, level), []))
            ratios[level * args.client_processes] = [
                round(c["rpc_per_s"] / max(o["rpc_per_s"], 1e-9), 2) for c, o in pairs
            ]
        if any(ratios.values()):
            results[f"cached_over_{other}_throughput_by_in_flight"] = ratios
            print(f"cached/{other} throughput, by calls in flight, per round: {ratios}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
