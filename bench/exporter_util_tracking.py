"""Does the exporter's sampled utilization track a load you generate? Run on a real GPU.

Phases of --phase-s seconds each: idle; a batch-1 diffusion-like loop (small fp16 convolutions
and matmuls, launch-bound, as SD-1.5 at batch 1 is); a large-batch loop (the same at batch 16).
The exporter's own NvmlReader collects every second throughout; per phase it prints the mean
of DCGM_FI_DEV_GPU_UTIL (mean of NVML's samples) next to NVML's instantaneous reading and the
GPM ratios (SM, tensor, DRAM activity) where the GPU supports them.

    python bench/exporter_util_tracking.py --phase-s 15 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract import names  # noqa: E402
from exporter.nvml import NvmlReader  # noqa: E402


def load(batch: int, stop: threading.Event) -> None:
    import torch

    conv = torch.nn.Conv2d(320, 320, 3, padding=1).cuda().half()
    x = torch.randn(batch * 2, 320, 64, 64, device="cuda", dtype=torch.half)  # CFG doubles the batch
    w = torch.randn(1280, 1280, device="cuda", dtype=torch.half)
    tokens = torch.randn(batch * 2 * 1024, 1280, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        while not stop.is_set():
            for _ in range(20):
                conv(x)
                tokens @ w
            torch.cuda.synchronize()


def column_mean(readings: list[tuple], column: int) -> float | None:
    values = [r[column] for r in readings if r[column] is not None]
    return statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import pynvml

    reader = NvmlReader(pynvml)
    results = []
    for phase, batch in (("idle", 0), ("batch 1", 1), ("batch 16", 16)):
        stop = threading.Event()
        worker = threading.Thread(target=load, args=(batch, stop)) if batch else None
        if worker:
            worker.start()
        time.sleep(2)  # let the phase settle
        reader.collect()  # drop samples from before the phase
        readings = []
        deadline = time.monotonic() + args.phase_s
        while time.monotonic() < deadline:
            time.sleep(1)
            snapshot = reader.collect()
            values = snapshot.devices[0].values
            instant = pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(0)).gpu
            readings.append((values.get(names.GPU_UTIL), instant, values.get(names.PROF_SM_ACTIVE),
                             values.get(names.PROF_PIPE_TENSOR_ACTIVE), values.get(names.PROF_DRAM_ACTIVE)))
        stop.set()
        if worker:
            worker.join()

        row = {"phase": phase, "gpu_util_sampled": column_mean(readings, 0), "gpu_util_instant": column_mean(readings, 1),
               "sm_active": column_mean(readings, 2), "tensor_active": column_mean(readings, 3),
               "dram_active": column_mean(readings, 4), "collections": len(readings)}
        results.append(row)
        print(row, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
