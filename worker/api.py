"""The worker's HTTP API: an OpenAI-images-shaped generation endpoint, probes and /metrics.

Only HTTP lives here: request and response schemas, status codes and headers. What happens
to a request is `WorkerService`'s business.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contract.apikey import UNAUTHORIZED_DESCRIPTION, ApiKeys, RequireApiKey
from contract.schema import ErrorResponse, GenerationRequest, GenerationResponse, ImageData

from .service import ClientGone, ImageSpec, InvalidRequest, Rejected, RequestFailed, WorkerService


def image_spec(body: GenerationRequest) -> ImageSpec:
    """The worker's terms for a validated request."""
    width, height = body.dimensions()
    return ImageSpec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.n,
        width=width,
        height=height,
        steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
    )


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away; the request body has been read already."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def build_app(service: WorkerService, api_keys: ApiKeys | None = None) -> FastAPI:
    """The worker's app on `service`. With `api_keys`, every route but the probes and /metrics
    (`contract.apikey.OPEN_PATHS`) answers 401 to a request without one of them, counted in
    `service.metrics.unauthorized`."""
    app = FastAPI(
        title="diffusion worker",
        summary="Text-to-image with dynamic batching, shaped like the OpenAI images API",
        version="0.1.0",
    )
    keyed: dict[int | str, dict] = {}  # the 401 in the OpenAPI document, where the API has one
    if api_keys is not None:
        app.add_middleware(RequireApiKey, keys=api_keys, on_refused=service.metrics.unauthorized.inc)
        keyed[401] = {"model": ErrorResponse, "description": UNAUTHORIZED_DESCRIPTION}

    @app.post(
        "/v1/images/generations",
        response_model=GenerationResponse,
        responses={
            429: {"model": ErrorResponse, "description": "Queue full; retry after Retry-After seconds"},
            500: {"model": ErrorResponse, "description": "The pipeline failed on this request's batch"},
            503: {"model": ErrorResponse, "description": "Draining or model not loaded"},
            504: {"model": ErrorResponse, "description": "Not done within the request timeout"},
            **keyed,
        },
    )
    async def generate(body: GenerationRequest, request: Request):
        try:
            generation = await service.generate(image_spec(body), lambda: _until_disconnected(request))
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
            data=[ImageData(b64_json=image.png_b64, seed=image.seed) for image in generation.images],
        )

    @app.get("/healthz", responses={200: {"description": "The process is alive"}})
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={
        503: {"model": ErrorResponse, "description": "Loading, draining, or (pull mode) the job queue unreachable"}})
    async def readyz():
        reason = service.unready_reason
        if reason is None:
            return {"status": "ready"}
        return _error(503, reason)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
