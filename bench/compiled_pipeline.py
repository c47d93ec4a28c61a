"""The raw pipeline eager against compiled (`worker/compiled.py`), in one process on one GPU.

1. eager: the pipeline as `python -m worker serve` runs it without --compile, each batch size
   timed (median of --repeats calls after one warm-up call), and reference images kept;
2. compiled: the same pipeline under `CompiledRunner` (UNet and VAE decode compiled with CUDA
   graphs, channels_last, fused QKV), every batch size a bucket; its warm-up (compile and
   capture of every bucket) is timed, then every batch size as in 1;
3. same seed, same picture: the reference images against the compiled ones (uint8 pixels:
   largest and mean absolute difference, PSNR);
4. padding: for every batch of n images up to the largest bucket, images per second when it
   runs padded to its bucket, from the compiled timings, against eager at its bucket size.

    python bench/compiled_pipeline.py --model /tmp/sd15 --buckets 1,2,4,8,16,32 --cache-dir /tmp/cc --out r.json

Run it twice with the same --cache-dir for the warm-cache compile time. Every call is 512x512
(the model's default size), 20 DDIM steps, CFG 7.5 by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.batching import BatchKey  # noqa: E402
from worker.compiled import CompiledRunner, CompileSettings, bucket_for, parse_buckets  # noqa: E402
from worker.pipeline import DiffusionRunner  # noqa: E402

PROMPT = "a photo of a lighthouse at dusk"


def timed(runner, key: BatchKey, size: int, repeats: int) -> float:
    """Median seconds per call of a batch of `size`, after one untimed call."""
    prompts, negatives, seeds = [PROMPT] * size, [None] * size, list(range(size))
    runner.generate(key, prompts, negatives, seeds)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        runner.generate(key, prompts, negatives, seeds)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def agreement(reference, images) -> dict:
    import numpy as np

    a = np.stack(reference).astype(np.float64)
    b = np.stack(images).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--buckets", type=parse_buckets, default=parse_buckets("1,2,4,8,16,32"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-eager", action="store_true", help="time the compiled runner only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    report: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "argv": sys.argv}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))

    began = time.perf_counter()
    runner = DiffusionRunner.load(args.model, "cuda")
    report["load_s"] = time.perf_counter() - began
    import torch

    report["meta"].update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
    defaults = runner.defaults()
    key = BatchKey(defaults.width, defaults.height, args.steps, 7.5)
    seeds = [11, 12, 13]
    reference = runner.generate(key, [PROMPT] * 3, [None] * 3, seeds)

    def time_buckets(name: str, timed_runner) -> None:
        report[f"{name}_s"] = {}
        for size in args.buckets:
            seconds = report[f"{name}_s"][size] = timed(timed_runner, key, size, args.repeats)
            print(f"{name:<8} B={size:<3} {seconds:.3f} s  {size / seconds:6.2f} images/s", flush=True)
            save()

    if not args.skip_eager:
        time_buckets("eager", runner)

    compiled = CompiledRunner(runner, CompileSettings(args.buckets, args.cache_dir), defaults)
    began = time.perf_counter()
    compiled.warm_up(defaults)
    report["compile_s"] = time.perf_counter() - began
    print(f"compiled {args.buckets} in {report['compile_s']:.1f} s", flush=True)
    save()
    time_buckets("compiled", compiled)
    images = compiled.generate(key, [PROMPT] * 3, [None] * 3, seeds)  # 3 images, padded to a bucket of 4
    report["agreement"] = agreement(reference, images)
    report["batches"] = {"compiled": compiled.compiled_batches, "eager": compiled.eager_batches}
    print(f"agreement with eager: {report['agreement']}", flush=True)
    # Padding: n images run as their bucket's batch.
    report["padded_images_per_s"] = {
        n: n / report["compiled_s"][bucket_for(n, args.buckets)] for n in range(1, args.buckets[-1] + 1)}
    save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
