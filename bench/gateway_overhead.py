"""The gateway's cost: requests through gateway + Redis stream + a pull-mode worker, side by side
with the same requests sent to a worker directly, on loopback with the tiny model.

    .venv/bin/python bench/gateway_overhead.py            # about 2 minutes on 2 CPU cores

Two workers run the same model: one serving HTTP directly, one pulling from the stream behind
the gateway; only one path is loaded at a time. Phases alternate (direct, gateway, direct, ...)
so drift on a noisy machine hits both alike:
- latency: one client, one request at a time; the added latency is the difference of the
  medians, and the ratio of the medians is reported too;
- throughput: `--concurrency` clients in a closed loop for `--seconds` each; images per second.
Each worker runs with the same batching flags. The pull-mode worker's batches form from what
it pulls (at most two max batches in hand: one running, one forming), the direct worker's from what
arrives, so throughput at concurrency compares the two front doors with their batchers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import requests  # noqa: E402

from lab.localprom import free_port  # noqa: E402
from lab.stack.queue import QueueFront  # noqa: E402


def start_worker(model: Path, port: int, flags: tuple[str, ...], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", *flags],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout_s:g}s")


async def one(session: aiohttp.ClientSession, url: str, steps: int, seed: int) -> float:
    body = {"prompt": "a lighthouse at dusk", "num_inference_steps": steps, "seed": seed}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/images/generations", json=body) as answer:
        await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{url} answered {answer.status}")
    return time.perf_counter() - started


async def latencies(url: str, count: int, steps: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        return [await one(session, url, steps, seed) for seed in range(count)]


async def throughput(url: str, concurrency: int, seconds: float, steps: int) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        nonlocal done
        seed = index * 100_000
        while time.perf_counter() < deadline:
            await one(session, url, steps, seed)
            seed += 1
            done += 1

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a pipeline directory; default: build the tiny model")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths")
    parser.add_argument("--requests", type=int, default=30, help="sequential requests per latency phase")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in a throughput phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a throughput phase")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    model = args.model
    if model is None:
        from worker.modelbuild import make_model

        model = workdir / "tiny"
        make_model(model, "tiny", 0, False)
    batching = ("--max-batch-size", str(args.max_batch_size), "--max-wait-ms", "10", "--no-warm-up")
    front = QueueFront(workdir)
    processes: list[subprocess.Popen] = []
    try:
        front.start()
        direct_port, pull_port = free_port(), free_port()
        processes.append(start_worker(model, direct_port, batching, workdir / "direct.log"))
        processes.append(start_worker(model, pull_port, batching + front.worker_flags(), workdir / "pull.log"))
        direct = f"http://127.0.0.1:{direct_port}"
        wait_ready(direct)
        wait_ready(f"http://127.0.0.1:{pull_port}")
        paths = {"direct": direct, "gateway": front.url}
        for url in paths.values():  # warm both paths up
            asyncio.run(latencies(url, 3, args.steps))
        latency: dict[str, list[float]] = {name: [] for name in paths}
        rate: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(args.rounds):
            for name, url in paths.items():
                latency[name] += asyncio.run(latencies(url, args.requests, args.steps))
                rate[name].append(asyncio.run(throughput(url, args.concurrency, args.seconds, args.steps)))
                print(f"round {round_ + 1}: {name:8s} median {statistics.median(latency[name]) * 1000:7.1f} ms, "
                      f"{rate[name][-1]:6.2f} images/s at concurrency {args.concurrency}", flush=True)
        medians = {name: statistics.median(values) for name, values in latency.items()}
        rates = {name: statistics.median(values) for name, values in rate.items()}
        figures = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "steps": args.steps, "requests_per_path": len(latency["direct"]), "concurrency": args.concurrency,
            "median_latency_ms": {name: round(value * 1000, 1) for name, value in medians.items()},
            "added_latency_ms": round((medians["gateway"] - medians["direct"]) * 1000, 1),
            "latency_ratio": round(medians["gateway"] / medians["direct"], 3),
            "images_per_s": {name: round(value, 2) for name, value in rates.items()},
            "throughput_ratio": round(rates["gateway"] / rates["direct"], 3),
        }
        print(json.dumps(figures, indent=2))
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        front.close()


if __name__ == "__main__":
    sys.exit(main())
