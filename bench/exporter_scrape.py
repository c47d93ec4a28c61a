"""Exporter cost on a real GPU: our exporter and nvitop-exporter side by side, both over HTTP.

For each exporter (started as its own process, both collecting every --interval seconds):
  idle window   no scrapes for --idle-s: CPU seconds per collection = process CPU / collections
  scrape window --scrapes sequential GET /metrics at 10 Hz: latency p50/p99, and CPU seconds
                per scrape = (CPU in the window - idle CPU rate x window) / scrapes
  RSS           VmRSS after both windows
  coverage      which of dcgm-exporter's default counters each one serves (ours by name,
                nvitop-exporter by its equivalent metric)

    python bench/exporter_scrape.py --out results.json     # needs NVML and `pip install nvitop-exporter`

Without a GPU, --fake runs the exporter of each given source tree (its exporter/, contract/ and
tests/exporter/fakenvml.py) against the tests' fake NVML, one tree after the other in the same
run, and prints each measure of the last tree as a ratio to the first: what a change costs or
saves in the exporter's own Python (the fake's calls take no driver time, unlike NVML's):

    git archive HEAD exporter contract tests | tar -x -C /tmp/before
    python bench/exporter_scrape.py --fake /tmp/before . --interval 0.1 --idle-s 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract import names  # noqa: E402

REFERENCE = Path(os.environ.get("DCGM_COUNTERS_CSV", REPO.parent / "shared" / "reference" / "nvidia"
                                 / "dcgm-exporter_default-counters.csv"))
TICKS = os.sysconf("SC_CLK_TCK")

# dcgm default counter -> nvitop-exporter's metric carrying the same quantity
NVITOP_EQUIVALENT = {
    names.SM_CLOCK: "gpu_clock_sm", names.MEM_CLOCK: "gpu_clock_memory",
    names.GPU_TEMP: "gpu_temperature", names.POWER_USAGE: "gpu_power_usage",
    names.GPU_UTIL: "gpu_utilization", names.MEM_COPY_UTIL: "gpu_memory_utilization",
    names.ENC_UTIL: "gpu_encoder_utilization", names.DEC_UTIL: "gpu_decoder_utilization",
    names.FB_FREE: "gpu_memory_free", names.FB_USED: "gpu_memory_used",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def default_counters() -> list[str]:
    rows = csv.reader(line for line in REFERENCE.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return [row[0].strip() for row in rows if row[0].strip().startswith("DCGM_FI_DEV") and row[1].strip() != "label"]


# The exporter of the source tree in the working directory, over the tests' fake NVML: argv is
# port, interval, number of GPUs. The GPUs keep a utilization sample every 1/6 s, as NVML does,
# so each collection reads new samples rather than falling back to the current reading.
FAKE_SERVER = """
import sys, threading, time
from types import SimpleNamespace
from exporter.__main__ import Exporter, build_parser
from exporter.config import ExporterConfig
from tests.exporter.fakenvml import FakeGpu, FakeNvml

STEP_US = 166_667
KEPT = 120  # samples NVML keeps per type, about

class SampledNvml(FakeNvml):
    def nvmlDeviceGetSamples(self, device, sampling_type, timeStamp):
        self._call("nvmlDeviceGetSamples", device)
        last = int(time.time() * 1e6) // STEP_US
        first = max(timeStamp // STEP_US + 1, last - KEPT + 1)
        if first > last:
            raise self.NVMLError(6)  # NOT_FOUND: nothing since timeStamp
        return (1, [SimpleNamespace(timeStamp=k * STEP_US, sampleValue=SimpleNamespace(uiVal=k * 37 % 101))
                    for k in range(first, last + 1)])

port, interval, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
gpus = [FakeGpu(f"GPU-{i:08x}-0000-4000-8000-000000000000", minor=i, bus_id=f"00000000:{i + 1:02X}:00.0")
        for i in range(count)]
args = build_parser().parse_args(["--listen-address", "127.0.0.1", "--port", port, "--interval", interval,
                                  "--hostname", "bench-node"])
environ = {"POD_NAME": "sd-worker-0", "POD_NAMESPACE": "bench", "CONTAINER_NAME": "worker"}
Exporter(ExporterConfig.from_args(args), environ=environ, nvml=SampledNvml(gpus)).start()
threading.Event().wait()
"""


def measure(name: str, command: list[str], port: int, interval_s: float, idle_s: float, scrapes: int,
            cwd: Path | None = None) -> dict:
    env = None if cwd is None else {**os.environ, "PYTHONPATH": str(cwd)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                               cwd=cwd, env=env)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        time.sleep(2 * interval_s)
        cpu0 = cpu_seconds(process.pid)
        time.sleep(idle_s)
        idle_cpu = cpu_seconds(process.pid) - cpu0
        session = requests.Session()
        latencies = []
        cpu1 = cpu_seconds(process.pid)
        started = time.monotonic()
        for _ in range(scrapes):
            began = time.perf_counter()
            text = session.get(url, timeout=5).text
            latencies.append(time.perf_counter() - began)
            time.sleep(0.1)
        window = time.monotonic() - started
        scrape_cpu = cpu_seconds(process.pid) - cpu1 - idle_cpu / idle_s * window
        ordered = sorted(latencies)
        return {
            "exporter": name,
            "scrape_p50_ms": 1000 * statistics.median(ordered),
            "scrape_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "cpu_ms_per_collection": 1000 * idle_cpu / (idle_s / interval_s),
            "cpu_ms_per_scrape": 1000 * max(scrape_cpu, 0.0) / scrapes,
            "rss_mib": rss_mib(process.pid),
            "bytes_per_scrape": len(text),
            "text": text,
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fake", type=Path, nargs="+", metavar="TREE",
                        help="run each tree's exporter against the tests' fake NVML instead of NVML")
    parser.add_argument("--fake-gpus", type=int, default=8, help="GPUs the fake NVML has (--fake)")
    args = parser.parse_args()
    if args.fake:
        fake(args)
        return
    results = []
    port = free_port()
    results.append(measure("ours", [sys.executable, "-m", "exporter", "--listen-address", "127.0.0.1", "--port",
                                    str(port), "--interval", str(args.interval)], port, args.interval, args.idle_s,
                           args.scrapes))
    nvitop = shutil.which("nvitop-exporter")
    if nvitop:
        port = free_port()
        results.append(measure("nvitop-exporter", [nvitop, "--bind-address", "127.0.0.1", "--port", str(port),
                                                   "--interval", str(args.interval)], port, args.interval,
                               args.idle_s, args.scrapes))
    print_table(results)
    print()
    print("| dcgm-exporter default counter | ours | nvitop-exporter |")
    print("| --- | --- | --- |")
    texts = {r["exporter"]: r.pop("text") for r in results}
    coverage = {}
    for counter in default_counters():
        ours = counter + "{" in texts.get("ours", "")
        equivalent = NVITOP_EQUIVALENT.get(counter)
        theirs = bool(equivalent and equivalent in texts.get("nvitop-exporter", ""))
        coverage[counter] = {"ours": ours, "nvitop-exporter": theirs}
        print(f"| {counter} | {'yes' if ours else 'no'} | {equivalent if theirs else 'no'} |")
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results, "coverage": coverage},
                                       indent=1))


MEASURES = ("scrape_p50_ms", "scrape_p99_ms", "cpu_ms_per_collection", "cpu_ms_per_scrape", "rss_mib",
            "bytes_per_scrape")


def print_table(results: list[dict]) -> None:
    print("| exporter | scrape p50 ms | scrape p99 ms | CPU ms / collection | CPU ms / scrape | RSS MiB | bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['exporter']} | {r['scrape_p50_ms']:.2f} | {r['scrape_p99_ms']:.2f} | "
              f"{r['cpu_ms_per_collection']:.2f} | {r['cpu_ms_per_scrape']:.2f} | {r['rss_mib']:.1f} | {r['bytes_per_scrape']} |")


def fake(args: argparse.Namespace) -> None:
    """Each tree's exporter over the fake NVML, in turn; then the last tree's measures as ratios to the first's."""
    results = []
    for tree in args.fake:
        tree = tree.resolve()
        if not (tree / "exporter").is_dir() or not (tree / "tests" / "exporter" / "fakenvml.py").is_file():
            raise SystemExit(f"--fake {tree}: no exporter/ or tests/exporter/fakenvml.py there")
        port = free_port()
        result = measure(str(tree), [sys.executable, "-c", FAKE_SERVER, str(port), str(args.interval),
                                     str(args.fake_gpus)], port, args.interval, args.idle_s, args.scrapes, cwd=tree)
        result.pop("text")
        results.append(result)
    print(f"{args.fake_gpus} fake GPUs, a collection every {args.interval:g} s, {args.scrapes} scrapes at 10 Hz")
    print_table(results)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print("| last / first | " + " | ".join(
            f"{last[key] / first[key]:.2f}" if first[key] else "-" for key in MEASURES) + " |")
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "fake_gpus": args.fake_gpus,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
