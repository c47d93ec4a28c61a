"""The generation request and response, written once: the gateway validates with them before a
job is enqueued, and the worker validates with them again, over HTTP or off the queue.

Shaped like OpenAI's images API (`POST /v1/images/generations`), plus diffusion controls.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

SIZE_PATTERN = re.compile(r"^(\d{2,4})x(\d{2,4})$")
MIN_SIDE, MAX_SIDE = 64, 2048


class GenerationRequest(BaseModel):
    """POST /v1/images/generations: OpenAI's images request plus diffusion controls."""

    prompt: str = Field(min_length=1, max_length=4000, description="What to draw")
    n: int = Field(default=1, ge=1, le=10, description="Images to generate, each with its own seed")
    size: str | None = Field(
        default=None,
        pattern=r"^[0-9]+x[0-9]+$",
        description=f"'WIDTHxHEIGHT', each a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}; default: the model's native size",
        examples=["512x512"],
    )
    response_format: Literal["b64_json"] = Field(default="b64_json", description="Only base64 PNG is served")
    negative_prompt: str | None = Field(default=None, max_length=4000, description="What to steer away from")
    num_inference_steps: int = Field(default=20, ge=1, le=150, description="Denoising steps")
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0, description="Classifier-free guidance strength")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63, description="Seed of the first image; image i uses seed + i. Random when absent"
    )

    @field_validator("size")
    @classmethod
    def _size_is_wxh(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = SIZE_PATTERN.match(value)
        if not match:
            raise ValueError("size must look like '512x512'")
        for side in map(int, match.groups()):
            if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(f"each side must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, got {side}")
        return value

    def dimensions(self) -> tuple[int | None, int | None]:
        """(width, height) in pixels; (None, None) for the model's native size."""
        if self.size is None:
            return None, None
        width, height = map(int, self.size.split("x"))
        return width, height


class ImageData(BaseModel):
    b64_json: str = Field(description="The image as base64-encoded PNG")
    seed: int = Field(description="The seed that reproduces this image")


class GenerationResponse(BaseModel):
    created: int = Field(description="Unix time of the response")
    data: list[ImageData]


class ErrorResponse(BaseModel):
    detail: str | list[dict]
