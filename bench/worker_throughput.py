"""Worker throughput: the raw pipeline, our worker over HTTP, and LitServe, side by side in one run.

For each max batch size B, in this order on one GPU (never two at once):
  raw       the pipeline called directly with batches of B (seconds per batch, images/s)
  worker    `python -m worker serve --max-batch-size B`, closed-loop HTTP clients at each
            concurrency of --concurrency (multiples of B), counting images answered per second
            and request latency (p50/p95)
  litserve  bench/litserve_app.py with max_batch_size B and the same batch timeout, same loads

    python bench/worker_throughput.py --model /models/sd15 --batch-sizes 1,4,8,12,16 --out results.json

Every request is 512x512, 20 steps, CFG 7.5 by default (the settings of docs/BENCHMARKS.md's tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.sim.report import percentile  # noqa: E402 - the repository's one percentile (nearest rank)


@dataclass
class Result:
    system: str
    max_batch: int
    concurrency: int
    images_per_s: float  # closed loop: concurrency x images per request / mean latency (Little's law)
    counted_images_per_s: float  # images answered inside the window / window; coarse with long batches
    mean_s: float
    p50_s: float
    p95_s: float
    requests: int
    errors: int
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UtilizationSampler:
    """Mean NVML utilization of GPU 0 (every 20 ms) while the block runs; None without a GPU."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilizationSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML, no GPU: nothing to sample
            return self

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


utilization: dict[int, float | None] = {}  # raw batch size -> mean NVML utilization, for --profile-out


def raw_pipeline(model: Path, batch_sizes: list[int], width: int, height: int, steps: int,
                 repeats: int, sink: Path | None, compile_cache: Path | None = None) -> list[Result]:
    from worker.batching import BatchKey
    from worker.pipeline import DiffusionRunner

    runner = DiffusionRunner.load(model, "auto")
    if compile_cache is not None:  # the compiled runner, every batch size a bucket
        from worker.compiled import CompiledRunner, CompileSettings

        defaults = runner.defaults()
        runner = CompiledRunner(runner, CompileSettings(tuple(sorted(batch_sizes)), compile_cache), defaults)
        runner.warm_up(defaults)
        print(f"raw       compiled {sorted(batch_sizes)} in {runner.warm_up_seconds:.1f} s", flush=True)
    key = BatchKey(width, height, steps, 7.5)
    results = []
    for size in batch_sizes:
        prompts, negatives, seeds = ["a photo of a lighthouse"] * size, [None] * size, list(range(size))
        runner.generate(key, prompts, negatives, seeds)  # warm-up at this shape
        times = []
        with UtilizationSampler() as sampler:
            for _ in range(repeats):
                started = time.perf_counter()
                runner.generate(key, prompts, negatives, seeds)
                times.append(time.perf_counter() - started)
        utilization[size] = sampler.mean()
        median = statistics.median(times)
        results.append(record(Result("raw", size, size, size / median, size / median, statistics.mean(times), median,
                              max(times), repeats, 0, sum(times)), sink))
        print(f"raw       B={size:<3} {size / median:6.2f} images/s  {median:.3f} s/batch", flush=True)
    del runner
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - CPU-only runs
        pass
    return results


from contract import names  # noqa: E402

STARTUP_GAUGES = (names.STARTUP_SECONDS, names.MODEL_LOAD, names.WARM_UP_SECONDS)


def startup_figures(url: str) -> dict[str, float]:
    """The worker's exported start-up gauges, read once it is ready; {} for a server without them."""
    try:
        text = requests.get(url + "/metrics", timeout=5).text
    except requests.RequestException:
        return {}
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.split(" ")[0] in STARTUP_GAUGES}


@contextmanager
def server(command: list[str], url: str, ready_path: str, log_path: Path):
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
            try:
                if requests.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 600 s; see {log_path}")
            time.sleep(0.2)
        yield
    finally:
        # The measurement is over: a short grace, then the whole process group goes.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def closed_loop(url: str, body: dict, concurrency: int, warmup_s: float, duration_s: float) -> tuple[int, list[float], int]:
    """`concurrency` clients each send, wait, send again; returns (images, latencies, errors) in the window."""
    start = time.monotonic()
    window = (start + warmup_s, start + warmup_s + duration_s)
    lock = threading.Lock()
    images, latencies, errors = [0], [], [0]

    def client(index: int) -> None:
        session = requests.Session()
        sent = 0
        while time.monotonic() < window[1]:
            began = time.monotonic()
            try:
                response = session.post(url, json={**body, "seed": index * 100_000 + sent}, timeout=600)
                ok = response.status_code == 200 and len(response.json()["data"]) == body.get("n", 1)
            except requests.RequestException:
                ok = False
            ended = time.monotonic()
            sent += 1
            if window[0] <= ended <= window[1]:
                with lock:
                    if ok:
                        images[0] += body.get("n", 1)
                        latencies.append(ended - began)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return images[0], latencies, errors[0]


def record(result: Result, sink: Path | None) -> Result:
    """Appends the result to the JSON-lines sink at once, so a run cut short keeps what it measured."""
    if sink is not None:
        with sink.open("a") as lines:
            lines.write(json.dumps(asdict(result)) + "\n")
    return result


def http_runs(system: str, command: list[str], ready_path: str, size: int, concurrencies: list[int],
              body: dict, warmup_s: float, duration_s: float, logs: Path) -> list[Result]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results = []
    began = time.monotonic()
    with server([*command, "--port", str(port)], url, ready_path, logs / f"{system}-b{size}.log"):
        figures = {"system": system, "max_batch": size, "seconds_to_ready_from_spawn": time.monotonic() - began,
                   **startup_figures(url)}
        with (logs / "startup.jsonl").open("a") as lines:
            lines.write(json.dumps(figures) + "\n")
        print(f"{system:<9} B={size:<3} ready: {figures}", flush=True)
        for concurrency in concurrencies:
            images, latencies, errors = closed_loop(url + "/v1/images/generations", body, concurrency, warmup_s, duration_s)
            mean = statistics.mean(latencies) if latencies else float("nan")
            ordered = sorted(latencies)
            p50, p95 = (percentile(ordered, q) if ordered else float("nan") for q in (0.5, 0.95))
            # Every client always has one request out, so throughput = clients / mean latency
            # exactly; counting completions in a window is off by up to a batch per window.
            result = Result(system, size, concurrency, concurrency * body.get("n", 1) / mean, images / duration_s,
                            mean, p50, p95, len(latencies), errors,
                            duration_s)
            results.append(record(result, logs / "results.jsonl"))
            print(f"{system:<9} B={size:<3} c={concurrency:<3} {result.images_per_s:6.2f} images/s "
                  f"(counted {result.counted_images_per_s:5.2f})  "
                  f"p50 {result.p50_s:.2f} s  p95 {result.p95_s:.2f} s  errors {errors}", flush=True)
    return results


def table(results: list[Result]) -> str:
    raw = {r.max_batch: r.images_per_s for r in results if r.system == "raw"}
    lines = ["| system | max batch | clients | images/s | vs raw | counted images/s | p50 s | p95 s | requests | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = f"{r.images_per_s / raw[r.max_batch]:.0%}" if r.max_batch in raw and r.system != "raw" else ""
        lines.append(f"| {r.system} | {r.max_batch} | {r.concurrency} | {r.images_per_s:.2f} | {ratio} | {r.counted_images_per_s:.2f} | "
                     f"{r.p50_s:.2f} | {r.p95_s:.2f} | {r.requests} | {r.errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="pipeline directory (python -m worker make-model)")
    parser.add_argument("--batch-sizes", default="1,4,8,12,16")
    parser.add_argument("--systems", default="raw,worker,litserve", help="any of raw, worker, litserve")
    parser.add_argument("--concurrency", default="2", help="closed-loop clients as multiples of the max batch, e.g. 1,2")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-wait-ms", type=float, default=50, help="worker --max-wait-ms and LitServe batch_timeout")
    parser.add_argument("--warmup-s", type=float, default=8)
    parser.add_argument("--duration-s", type=float, default=20)
    parser.add_argument("--raw-repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--logs", type=Path, default=Path("bench-logs"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker-args", default="", help="more flags for `python -m worker serve`, e.g. "
                        "'--encode-processes 0'")
    parser.add_argument("--compile-cache-dir", type=Path, help="compiled: every system runs the compiled runner "
                        "(worker --compile on), its artifacts cached here")
    parser.add_argument("--profile-out", type=Path, help="write the raw pipeline's seconds per batch as a batch "
                        "profile for the replay simulator (python -m lab.sim --profile); needs raw")
    args = parser.parse_args()
    if args.profile_out and "raw" not in args.systems.split(","):
        parser.error("--profile-out needs the raw system")

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    systems = args.systems.split(",")
    multiples = [float(m) for m in args.concurrency.split(",")]
    width, height = map(int, args.size.split("x"))
    body = {"prompt": "a photo of a lighthouse", "size": args.size, "num_inference_steps": args.steps, "guidance_scale": 7.5}
    args.logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    if "raw" in systems:
        results += raw_pipeline(args.model, batch_sizes, width, height, args.steps, args.raw_repeats,
                                args.logs / "results.jsonl", args.compile_cache_dir)
    for size in batch_sizes:
        concurrencies = sorted({max(1, round(size * m)) for m in multiples})
        if "worker" in systems:
            command = [sys.executable, "-m", "worker", "serve", "--model", str(args.model), "--host", "127.0.0.1",
                       "--device", args.device, "--max-batch-size", str(size), "--max-wait-ms", str(args.max_wait_ms),
                       "--max-queue", str(max(64, 4 * size)), "--max-image-side", str(max(width, height))]
            if args.compile_cache_dir:
                command += ["--compile", "on", "--compile-cache-dir", str(args.compile_cache_dir)]
            command += args.worker_args.split()
            results += http_runs("worker", command, "/readyz", size,
                                 concurrencies, body, args.warmup_s, args.duration_s, args.logs)
        if "litserve" in systems:
            command = [sys.executable, str(REPO / "bench" / "litserve_app.py"), "--model", str(args.model),
                       "--device", args.device, "--max-batch-size", str(size), "--batch-timeout-ms", str(args.max_wait_ms)]
            if args.compile_cache_dir:
                command += ["--compile-cache-dir", str(args.compile_cache_dir)]
            results += http_runs("litserve", command, "/health", size, concurrencies, body,
                                 args.warmup_s, args.duration_s, args.logs)
    print()
    print(table(results))
    if args.profile_out:
        # NVML utilization is sampled during the timed batches where a GPU is present; without
        # one it is left out (the simulator then reads 0 %, which only the hpa-gpu baseline uses).
        profile = {"reference_steps": args.steps, "size": args.size, "batches": [
            {"batch": r.max_batch, "seconds": r.p50_s,
             **({"gpu_util_percent": round(utilization[r.max_batch], 1)} if utilization.get(r.max_batch) is not None else {})}
            for r in results if r.system == "raw"]}
        args.profile_out.write_text(json.dumps(profile, indent=1))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "python": platform.python_version(),
                "argv": sys.argv, "settings": {k: str(v) for k, v in vars(args).items()}}
        try:
            import torch

            meta["torch"] = torch.__version__
            meta["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            pass
        args.out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
