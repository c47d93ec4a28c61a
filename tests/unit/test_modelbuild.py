"""The offline model builder: SD-1.5's exact shapes, and a tokenizer that needs no hub."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from worker.modelbuild import arch_spec, build_tokenizer, byte_level_vocab


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_has_the_published_parameter_counts():
    spec = arch_spec("sd15", vocab_size=514)
    with torch.device("meta"):  # shapes only: no 4 GB of random numbers in a unit test
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text = CLIPTextModel(CLIPTextConfig(**spec.text))
    # runwayml/stable-diffusion-v1-5: UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text 123.06M
    assert parameters(unet) == 859_520_964
    assert parameters(vae) == 83_653_863
    assert parameters(text) == 123_060_480


def test_the_byte_vocabulary_covers_every_byte_alone_and_word_final():
    vocab = byte_level_vocab()
    assert len(vocab) == 2 * 256 + 2
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_the_tokenizer_handles_any_text_without_unknowns_and_pads_to_77():
    tokenizer = build_tokenizer()
    assert tokenizer.model_max_length == 77
    ids = tokenizer("héllo 🐱 wörld").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert all(token < 512 for token in ids[1:-1])  # byte tokens only, never <|endoftext|> as unknown
    assert len(tokenizer("a cat", padding="max_length").input_ids) == 77
    long = tokenizer("x" * 500, truncation=True).input_ids
    assert len(long) == 77


def test_an_unknown_arch_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="tiny, sd15"):
        arch_spec("sdxl", vocab_size=514)
