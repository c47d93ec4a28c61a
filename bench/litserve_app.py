"""LitServe serving the same pipeline with the same batch settings, for bench/worker_throughput.py.

It calls the worker's own `DiffusionRunner.generate` (same generators, same uint8 transfer)
and encodes PNGs the same way, so the comparison is of the serving layers only.

    python bench/litserve_app.py --model DIR --port 8100 --max-batch-size 8 --batch-timeout-ms 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.batching import BatchKey  # noqa: E402
from worker.pipeline import DiffusionRunner  # noqa: E402
from worker.encoding import encode_png  # noqa: E402


class DiffusionAPI(ls.LitAPI):
    def __init__(self, model: Path, device: str, compile_cache: Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.device_name = device
        self.compile_cache = compile_cache

    def setup(self, device) -> None:
        self.runner = DiffusionRunner.load(self.model, self.device_name)
        defaults = self.runner.defaults()
        if self.compile_cache is not None:  # the worker's compiled runner, same buckets as `--compile on`
            from worker.compiled import CompiledRunner, CompileSettings, default_buckets

            self.runner = CompiledRunner(self.runner, CompileSettings(default_buckets(self.max_batch_size),
                                                                      self.compile_cache), defaults)
        self.runner.warm_up(defaults)

    def decode_request(self, request: dict) -> tuple:
        width, height = map(int, request.get("size", "512x512").split("x"))
        key = BatchKey(width, height, int(request.get("num_inference_steps", 20)), float(request.get("guidance_scale", 7.5)))
        return key, request["prompt"], request.get("negative_prompt"), int(request.get("seed", 0))

    def predict(self, inputs):
        # LitServe passes one decoded request when max_batch_size is 1, else a list of them.
        if isinstance(inputs, tuple):
            return self.predict([inputs])[0]
        # The benchmark sends one shape per run, so one key serves the whole batch.
        key = inputs[0][0]
        return self.runner.generate(key, [i[1] for i in inputs], [i[2] for i in inputs], [i[3] for i in inputs])

    def encode_response(self, pixels) -> dict:
        return {"data": [{"b64_json": encode_png(pixels)}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=50)
    parser.add_argument("--compile-cache-dir", type=Path, help="serve the compiled runner, its artifacts cached here")
    args = parser.parse_args()
    api = DiffusionAPI(
        args.model, args.device, args.compile_cache_dir, max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000, api_path="/v1/images/generations",
    )
    accelerator = "cpu" if args.device == "cpu" else "auto"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=600)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
