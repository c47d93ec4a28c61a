"""The worker's HTTP API: an OpenAI-images-shaped generation endpoint, probes and /metrics.

Only HTTP lives here: request and response schemas, status codes and headers. What happens
to a request is `WorkerService`'s business.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator

from .service import ClientGone, ImageSpec, InvalidRequest, Rejected, RequestFailed, WorkerService

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

    def to_spec(self) -> ImageSpec:
        width = height = None
        if self.size is not None:
            width, height = map(int, self.size.split("x"))
        return ImageSpec(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            n=self.n,
            width=width,
            height=height,
            steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )


class ImageData(BaseModel):
    b64_json: str = Field(description="The image as base64-encoded PNG")
    seed: int = Field(description="The seed that reproduces this image")


class GenerationResponse(BaseModel):
    created: int = Field(description="Unix time of the response")
    data: list[ImageData]


class ErrorResponse(BaseModel):
    detail: str | list[dict]


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away; the request body has been read already."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def build_app(service: WorkerService) -> FastAPI:
    app = FastAPI(
        title="diffusion worker",
        summary="Text-to-image with dynamic batching, shaped like the OpenAI images API",
        version="0.1.0",
    )

    @app.post(
        "/v1/images/generations",
        response_model=GenerationResponse,
        responses={
            429: {"model": ErrorResponse, "description": "Queue full; retry after Retry-After seconds"},
            500: {"model": ErrorResponse, "description": "The pipeline failed on this request's batch"},
            503: {"model": ErrorResponse, "description": "Draining or model not loaded"},
            504: {"model": ErrorResponse, "description": "Not done within the request timeout"},
        },
    )
    async def generate(body: GenerationRequest, request: Request):
        try:
            images = await service.generate(body.to_spec(), lambda: _until_disconnected(request))
        except InvalidRequest as invalid:
            return JSONResponse(
                {"detail": [{"loc": ["body", invalid.field], "msg": str(invalid), "type": "value_error"}]},
                status_code=422,
            )
        except Rejected as rejected:
            return _error(rejected.status, str(rejected), rejected.retry_after_s)
        except RequestFailed as failed:
            return _error(failed.status, str(failed))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's code for a closed client
        return GenerationResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=image.png_b64, seed=image.seed) for image in images],
        )

    @app.get("/healthz", responses={200: {"description": "The process is alive"}})
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse, "description": "Loading or draining"}})
    async def readyz():
        if service.ready:
            return {"status": "ready"}
        reason = "draining" if service.draining else "model loading"
        return _error(503, reason)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
