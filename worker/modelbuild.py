"""Builds a Stable Diffusion pipeline with random weights, offline, and saves it to a directory.

Random weights cost exactly what trained weights cost to run, so a random `sd15` pipeline is a
faithful GPU benchmark subject and a random `tiny` one is a fast, real pipeline for tests and
CPU demos. Nothing here touches a model hub: every component comes from a config written
below, and the tokenizer is a byte-level CLIP BPE vocabulary made on the spot.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHES = ("tiny", "sd15")

# CLIP's byte-to-unicode table: every byte gets a printable character, so any UTF-8 prompt
# tokenizes without unknown tokens. With no merges, each character is one token.
def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of single bytes: each byte alone and at a word's end, plus the specials."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


@dataclass(frozen=True)
class ArchSpec:
    """Component configs for one architecture."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]


def arch_spec(arch: str, vocab_size: int) -> ArchSpec:
    if arch == "sd15":
        # The published SD-1.5 shapes (runwayml/stable-diffusion-v1-5): UNet 860M, VAE 84M,
        # CLIP ViT-L/14 text encoder 123M parameters.
        return ArchSpec(
            unet=dict(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            ),
            vae=dict(
                sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, scaling_factor=0.18215,
            ),
            # SD-1.5's text encoder keeps CLIP's 49,408-row embedding; our byte vocabulary
            # uses the first rows only, which changes nothing about the compute.
            text=dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768,
            ),
        )
    if arch == "tiny":
        # Four VAE levels keep SD's 8x latent downscale, so a 64x64 image is an 8x8 latent and
        # sizes follow the same multiple-of-8 rule as the real model.
        return ArchSpec(
            unet=dict(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
            ),
            vae=dict(
                sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=4, scaling_factor=0.18215,
            ),
            text=dict(
                vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=32,
            ),
        )
    raise ValueError(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")


def build_tokenizer():
    """A CLIPTokenizer over the byte-level vocabulary, model_max_length 77, built from local files."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "vocab.json").write_text(json.dumps(byte_level_vocab()))
        (root / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(scratch, model_max_length=77, local_files_only=True)


def build_pipeline(arch: str, seed: int = 0):
    """A StableDiffusionPipeline of `arch` with weights drawn from `seed`, in float32 on the CPU."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    spec = arch_spec(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    vae = AutoencoderKL(**spec.vae)
    text_config = CLIPTextConfig(
        **spec.text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    # SD-1.5's noise schedule; DDIM because the H100 figures in docs/BENCHMARKS.md were measured with it.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_model(directory: Path, arch: str, seed: int = 0, fp16: bool = False) -> Path:
    """Builds the pipeline and writes it with `save_pretrained` (safetensors); returns the directory."""
    import torch

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    pipeline = build_pipeline(arch, seed)
    if fp16:
        pipeline.to(torch.float16)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
