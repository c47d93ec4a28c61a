"""Loads a diffusers pipeline from a local directory and runs batches on it.

This is the torch boundary: the rest of the worker sees `DiffusionRunner.generate`, which
takes a batch's prompts and seeds and returns one HxWx3 uint8 array per image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batching import BatchKey

log = logging.getLogger("worker.pipeline")

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelDefaults:
    """What the loaded model implies for requests that do not say."""

    width: int
    height: int
    size_multiple: int  # the VAE's downscale factor; sizes must be multiples of it


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return device


class DiffusionRunner:
    """A loaded pipeline on one device; `generate` is called from the pipeline thread only."""

    def __init__(self, pipeline: Any, device: str, load_seconds: float) -> None:
        self.pipeline = pipeline
        self.device = device
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, model_dir: Path, device: str = "auto") -> DiffusionRunner:
        """Loads any diffusers text-to-image pipeline directory, offline; fp16 on CUDA.

        `load_seconds` covers importing torch and diffusers, reading the weights and moving
        them to the device: what a new replica spends before it can warm up.
        """
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline directory (no model_index.json)")
        # The load time a scaler must plan for starts before the imports: torch and diffusers
        # take seconds to import on a cold node.
        started = time.perf_counter()
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.disable_progress_bar()
            library.set_verbosity_error()
        device = resolve_device(device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipeline = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        if device == "cuda":
            torch.cuda.synchronize()
        load_seconds = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.2f s", model_dir, device, dtype, load_seconds)
        return cls(pipeline, device, load_seconds)

    def defaults(self) -> ModelDefaults:
        factor = int(getattr(self.pipeline, "vae_scale_factor", 8))
        sample = self.pipeline.unet.config.sample_size
        side = (sample if isinstance(sample, int) else sample[0]) * factor
        return ModelDefaults(width=side, height=side, size_multiple=factor)

    def generate(
        self, key: BatchKey, prompts: list[str], negative_prompts: list[str | None], seeds: list[int]
    ) -> list[Any]:
        import torch

        # One generator per image: an image's starting noise depends on its own seed only,
        # so it is the same picture whether it runs alone or in any batch.
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        negatives = [text or "" for text in negative_prompts]
        with torch.inference_mode():
            output = self.pipeline(
                prompt=prompts,
                negative_prompt=negatives,
                generator=generators,
                width=key.width,
                height=key.height,
                num_inference_steps=key.steps,
                guidance_scale=key.guidance_scale,
                output_type="pt",
            )
            # To bytes on the device: a quarter of the float32 transfer.
            pixels = (output.images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return list(pixels.numpy())

    def is_out_of_memory(self, error: BaseException) -> bool:
        import torch

        return isinstance(error, torch.OutOfMemoryError)

    def release_memory(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self, defaults: ModelDefaults) -> None:
        """One small call before readiness, so the first request does not pay for lazy setup."""
        key = BatchKey(defaults.width, defaults.height, steps=2, guidance_scale=7.5)
        self.generate(key, ["warm-up"], [None], [0])
