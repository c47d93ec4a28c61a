"""The gateway's HTTP API: the worker's synchronous images endpoint, the asynchronous jobs API,
probes and /metrics. Only HTTP lives here; the queue is `JobQueue`'s business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from contract.apikey import UNAUTHORIZED_DESCRIPTION, RequireApiKey
from contract.jobqueue import DONE, EXPIRED, FAILED, FINAL, QUEUED, STATUSES
from contract.schema import ErrorResponse, GenerationRequest, GenerationResponse, ImageData

from .bodylimit import MAX_BODY_BYTES, BodyLimit
from .config import GatewayConfig
from .jobs import BacklogFull, Enqueued, IdempotencyConflict, Job, JobQueue, QueueUnavailable
from .metrics import ASYNC, BACKLOG_FULL, INVALID, REDIS_UNAVAILABLE, SYNC, UNAUTHORIZED, GatewayMetrics

log = logging.getLogger("gateway.api")

# A full backlog drains at the fleet's pace, which the gateway does not see; a fixed, short
# wait spreads retries without guessing. A Redis outage is usually a restart or failover.
BACKLOG_RETRY_AFTER_S = 5
UNAVAILABLE_RETRY_AFTER_S = 2
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # on a 202 that returns the key's existing job

IdempotencyKey = Annotated[
    str | None,
    Header(alias=IDEMPOTENCY_HEADER, min_length=1, max_length=255,
           description="Makes a retry the same job: the same key and body return the job the first request made"),
]


class JobView(BaseModel):
    """A job as the asynchronous API shows it. Times are Unix seconds."""

    id: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    created_at: float
    deadline: float = Field(description="Not started by then, the job is not computed (status expired)")
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(description="Deliveries to workers so far")
    data: list[ImageData] | None = Field(default=None, description="The images, when done")
    error: str | None = Field(default=None, description="The worker's error, when failed")


class CancelRefused(ErrorResponse):
    id: str
    status: Literal[FINAL]  # type: ignore[valid-type]


def job_view(job: Job) -> JobView:
    return JobView(
        id=job.id, status=job.status, created_at=job.created_at, deadline=job.deadline, started_at=job.started_at,
        finished_at=job.finished_at, attempts=job.attempts, error=job.error,
        data=[ImageData(**image) for image in job.result] if job.status == DONE and job.result is not None else None,
    )


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _unavailable(headers: dict[str, str] | None = None) -> JSONResponse:
    """503 for a QueueUnavailable. Its text stays in the log (`JobQueue.outages`): redis-py's
    messages name hosts, ports and authentication failures, none of them a client's business."""
    return _error(503, "the job queue is unavailable",
                  {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S), **(headers or {})})


def _invalid(loc: list[str], msg: str) -> JSONResponse:
    """422 shaped like FastAPI's own validation errors, `loc` naming the field."""
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}, status_code=422)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away; the request body has been read already."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(queue: JobQueue, metrics: GatewayMetrics, config: GatewayConfig,
              lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """The gateway's app on `queue`. With `config.api_keys`, every route but the probes and
    /metrics (`contract.apikey.OPEN_PATHS`) answers 401 to a request without one of them,
    counted as a rejection for UNAUTHORIZED."""
    app = FastAPI(
        title="diffusion gateway",
        summary="Holds generation requests on the Redis job queue, so workers can scale to zero",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, on_refused=lambda: metrics.reject(INVALID))
    keyed: dict[int | str, dict] = {}  # the 401 in the OpenAPI document, where the API has one
    if config.api_keys is not None:
        # Added last, so it runs first: a client without a key gets no further, not even to upload a body.
        app.add_middleware(RequireApiKey, keys=config.api_keys, on_refused=lambda: metrics.reject(UNAUTHORIZED))
        keyed[401] = {"model": ErrorResponse, "description": UNAUTHORIZED_DESCRIPTION}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        metrics.reject(INVALID)
        return await request_validation_exception_handler(request, error)

    async def admit(body: GenerationRequest, key: str | None, api: str) -> Enqueued | JSONResponse:
        """Enqueues (or finds the key's job), or answers why not; nothing refused is enqueued."""
        if any(side is not None and side > config.max_image_side for side in body.dimensions()):
            metrics.reject(INVALID)
            return _invalid(["body", "size"], f"each side must be at most {config.max_image_side} pixels "
                                              "(the gateway's --max-image-side, as the workers')")
        try:
            enqueued = await queue.enqueue(body.model_dump_json(), key)
        except BacklogFull as full:
            metrics.reject(BACKLOG_FULL)
            return _error(429, str(full), {"Retry-After": str(BACKLOG_RETRY_AFTER_S)})
        except IdempotencyConflict as conflict:
            metrics.reject(INVALID)
            return _invalid(["header", IDEMPOTENCY_HEADER], str(conflict))
        except QueueUnavailable:
            metrics.reject(REDIS_UNAVAILABLE)
            return _unavailable()
        if enqueued.created:
            metrics.accept(api, body.n, body.num_inference_steps)
        return enqueued

    def answer(job: Job) -> JSONResponse:
        """The synchronous API's answer for an ended job."""
        metrics.job_ended(job)
        headers = {"X-Job-Id": job.id}
        if job.status == DONE:
            body = GenerationResponse(created=int(job.finished_at or time.time()),
                                      data=[ImageData(**image) for image in job.result or []])
            return JSONResponse(body.model_dump(), headers=headers)
        if job.status == FAILED:
            return _error(500, f"the worker failed on job {job.id}: {job.error}", headers)
        if job.status == EXPIRED:
            return _error(504, f"job {job.id} passed its deadline before a worker started it", headers)
        return _error(409, f"job {job.id} was cancelled (DELETE /v1/jobs/{job.id})", headers)

    async def wait_and_answer(job: Job, key: str | None, request: Request) -> Response:
        waiting = asyncio.ensure_future(queue.wait(job.id, min(job.deadline, time.time() + config.request_timeout_s)))
        gone = asyncio.ensure_future(_until_disconnected(request))
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
            # Without a key nobody can ever ask for this job again: do not compute it. With one,
            # the client said it may retry, and the retry should find the work under way.
            if key is None:
                try:
                    await queue.cancel(job.id)
                except QueueUnavailable as error:
                    log.warning("client of job %s went away; could not cancel it: %s", job.id, error)
            return Response(status_code=499)  # nobody reads it; nginx's code for a closed client
        headers = {"X-Job-Id": job.id}
        try:
            ended = waiting.result()
        except QueueUnavailable:
            return _unavailable(headers)
        if ended is None:
            return _error(503, f"job {job.id} is gone from Redis (evicted or flushed?)", headers)
        if ended.ended:
            return answer(ended)
        # Not cancelled: a running job's result stays readable (GET, or a retry with the key), and
        # a queued one past its deadline is expired by the worker that takes it (START). The
        # wait ends at the job's deadline unless a replay's job lives longer than this wait.
        if ended.status == QUEUED and time.time() >= ended.deadline:
            return _error(504, f"job {job.id} passed its deadline before a worker started it; "
                               "it will not be computed", headers)
        return _error(504, f"job {job.id} did not end within {config.request_timeout_s:g} s (--request-timeout); "
                           f"it is {ended.status}: GET /v1/jobs/{job.id} for its outcome", headers)

    @app.post(
        "/v1/images/generations",
        response_model=GenerationResponse,
        responses={
            409: {"model": ErrorResponse, "description": "The job was cancelled through DELETE /v1/jobs/{id}"},
            413: {"model": ErrorResponse, "description": f"The body is over {MAX_BODY_BYTES} bytes"},
            422: {"description": "Invalid body, or an Idempotency-Key reused with another body"},
            429: {"model": ErrorResponse, "description": "The backlog is at --max-backlog; retry after Retry-After"},
            500: {"model": ErrorResponse, "description": "The worker failed on this job; detail carries its error"},
            503: {"model": ErrorResponse, "description": "Redis is unavailable"},
            504: {"model": ErrorResponse, "description": "Not done within --request-timeout; a running job is left "
                                                         "to finish, for GET /v1/jobs/{id} (X-Job-Id)"},
            **keyed,
        },
    )
    async def generate(body: GenerationRequest, request: Request, idempotency_key: IdempotencyKey = None):
        arrival = time.monotonic()
        admitted = await admit(body, idempotency_key, SYNC)
        if isinstance(admitted, Response):
            return admitted
        try:
            return await wait_and_answer(admitted.job, idempotency_key, request)
        finally:
            metrics.latency.observe(time.monotonic() - arrival)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobView,
        responses={
            413: {"model": ErrorResponse, "description": f"The body is over {MAX_BODY_BYTES} bytes"},
            422: {"description": "Invalid body, or an Idempotency-Key reused with another body"},
            429: {"model": ErrorResponse, "description": "The backlog is at --max-backlog; retry after Retry-After"},
            503: {"model": ErrorResponse, "description": "Redis is unavailable"},
            **keyed,
        },
    )
    async def submit(body: GenerationRequest, idempotency_key: IdempotencyKey = None):
        admitted = await admit(body, idempotency_key, ASYNC)
        if isinstance(admitted, Response):
            return admitted
        headers = {"Location": f"/v1/jobs/{admitted.job.id}"}
        if not admitted.created:
            headers[REPLAYED_HEADER] = "true"
        return JSONResponse(job_view(admitted.job).model_dump(mode="json"), status_code=202, headers=headers)

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobView,
        responses={404: {"model": ErrorResponse, "description": "No such job, or its record expired"},
                   503: {"model": ErrorResponse, "description": "Redis is unavailable"}, **keyed},
    )
    async def status(job_id: str):
        try:
            job = await queue.get(job_id)
        except QueueUnavailable:
            return _unavailable()
        if job is None:
            return _error(404, f"no job {job_id}: unknown, or its record expired after it ended")
        metrics.job_ended(job)
        return job_view(job)

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobView,
        responses={404: {"model": ErrorResponse, "description": "No such job, or its record expired"},
                   409: {"model": CancelRefused, "description": "The job had ended already; it keeps its status"},
                   503: {"model": ErrorResponse, "description": "Redis is unavailable"}, **keyed},
    )
    async def cancel(job_id: str):
        try:
            before = await queue.cancel(job_id)
            job = await queue.get(job_id) if before is not None else None
        except QueueUnavailable:
            return _unavailable()
        if job is None:
            return _error(404, f"no job {job_id}: unknown, or its record expired after it ended")
        if before in FINAL:
            refused = CancelRefused(detail=f"job {job_id} had ended already ({before}); it keeps its status",
                                    id=job_id, status=before)
            return JSONResponse(refused.model_dump(), status_code=409)
        return job_view(job)

    @app.get("/healthz", responses={200: {"description": "The process is alive"}})
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse, "description": "Redis does not answer"}})
    async def readyz():
        try:
            await queue.ping()
        except QueueUnavailable:
            return _unavailable()
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response)
    async def metrics_text() -> Response:
        await metrics.refresh_backlog(queue.backlog, time.monotonic())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
