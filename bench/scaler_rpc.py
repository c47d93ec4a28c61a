"""Scaler RPC benchmark: 500 ScaledObjects against a real Prometheus, GetMetrics from
concurrent client processes, the cached scaler side by side with one that queries
Prometheus on every call (what KEDA's built-in prometheus scaler does).

    make bench            # or: .venv/bin/python bench/scaler_rpc.py --help

Phases alternate (cached, direct, cached, direct, ...) so drift on a noisy machine hits both
alike. Client-observed latency is measured per call with perf_counter in the client
processes, so it includes the client's own gRPC overhead. An open-loop phase then offers the
cached scaler a fixed rate and measures latency from each call's scheduled start
(no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
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
from adapter.localprom import LocalPrometheus, free_port  # noqa: E402
from adapter.synthetic import PodLoad, SyntheticFleet  # noqa: E402


def make_refs(count: int, prometheus_url: str) -> list[pb.ScaledObjectRef]:
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
        }
        refs.append(pb.ScaledObjectRef(name=f"sd-{i}", namespace="bench", scalerMetadata=metadata))
    return refs


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# --- client processes ------------------------------------------------------------------


async def _closed_loop(address, refs, concurrency, duration_s, seed):
    rng = random.Random(seed)
    latencies, errors = [], 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        deadline = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                request = pb.GetMetricsRequest(scaledObjectRef=rng.choice(refs), metricName="composite")
                started = time.perf_counter()
                try:
                    await stub.GetMetrics(request, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

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
            request = pb.GetMetricsRequest(scaledObjectRef=rng.choice(refs), metricName="composite")
            try:
                await stub.GetMetrics(request, timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - scheduled)

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


def _client_process(mode, address, refs_bytes, arg, duration_s, seed, out):
    refs = [pb.ScaledObjectRef.FromString(b) for b in refs_bytes]
    if mode == "closed":
        result = asyncio.run(_closed_loop(address, refs, arg, duration_s, seed))
    else:
        result = asyncio.run(_open_loop(address, refs, arg, duration_s, seed))
    out.put(result)


def drive(mode, address, refs, processes, arg, duration_s):
    """Runs client processes; returns (calls/s, sorted latencies in seconds, errors)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    refs_bytes = [r.SerializeToString() for r in refs]
    procs = [
        ctx.Process(target=_client_process, args=(mode, address, refs_bytes, arg, duration_s, i, out))
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


def start_scaler(command: list[str], grpc_port: int, http_port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        command + ["--listen-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                   "--log-level", "warning", "--idle-forget-seconds", "3600"],
        cwd=ROOT,
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
    return {
        "phase": name,
        "rpc_per_s": round(rate, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "calls": len(latencies),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaled-objects", type=int, default=500)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight per client process (closed loop)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="cached/direct pairs")
    parser.add_argument("--open-loop-rate", type=float, default=2000.0, help="RPC/s offered in the open-loop phase (0: skip)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()

    fleet = SyntheticFleet()
    fleet_port = fleet.start()
    rng = random.Random(1)
    for i in range(args.scaled_objects):
        load = PodLoad(queue=rng.randint(0, 40), gpu_util_percent=rng.uniform(20, 100))
        fleet.set_pod("bench", f"sd-{i}", f"sd-{i}-0", load)

    prom = LocalPrometheus([f"127.0.0.1:{fleet_port}"], scrape_interval_s=1.0).start()
    refs = make_refs(args.scaled_objects, prom.url)
    prom.wait_for_scrapes()
    time.sleep(1.5)  # one more scrape, so every selector has series

    python = sys.executable
    commands = {"cached": [python, "-m", "adapter"], "direct": [python, "bench/direct_scaler.py"]}
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
               "scaled_objects": args.scaled_objects, "client_processes": args.client_processes,
               "concurrency_per_process": args.concurrency, "phase_seconds": args.seconds, "phases": []}  # fmt: skip

    def phase(name: str, label: str, mode: str, arg: float) -> None:
        # One scaler at a time: each refreshes 500 targets in the background, and two
        # would share the two cores with each other as well as with the clients.
        grpc_port = free_port()
        process = start_scaler(commands[name], grpc_port, free_port())
        address = f"127.0.0.1:{grpc_port}"
        try:
            seconds = register(address, refs)
            cpu_before = process_cpu_s(process.pid)
            rate, latencies, errors = drive(mode, address, refs, args.client_processes, arg, args.seconds)
            row = summary(label, rate, latencies, errors)
            row["scaler_cpu_cores"] = round((process_cpu_s(process.pid) - cpu_before) / args.seconds, 2)
            row["registration_s"] = round(seconds, 1)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        results["phases"].append(row)
        print(json.dumps(row), flush=True)

    try:
        for round_index in range(args.rounds):
            for name in ("cached", "direct"):
                phase(name, f"{name} closed-loop #{round_index + 1}", "closed", args.concurrency)
        if args.open_loop_rate > 0:
            per_process = args.open_loop_rate / args.client_processes
            phase("cached", f"cached open-loop at {args.open_loop_rate:g}/s", "open", per_process)
    finally:
        prom.close()
        fleet.stop()

    pairs = [(c, d) for c, d in zip(results["phases"][0::2], results["phases"][1::2]) if "closed" in c["phase"]]
    ratios = [round(c["rpc_per_s"] / d["rpc_per_s"], 1) for c, d in pairs if d["rpc_per_s"] > 0]
    results["throughput_ratio_cached_over_direct"] = ratios
    print(f"throughput ratio cached/direct per round: {ratios}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
