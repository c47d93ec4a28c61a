"""The gRPC ExternalScaler servicer: KEDA's RPCs answered from the target cache.

Status codes: bad trigger metadata is INVALID_ARGUMENT (naming the key, the value and what
is accepted); no value to serve (none yet, or stale past staleAfterSeconds) is UNAVAILABLE,
so KEDA's `fallback` takes over instead of reading a made-up number (IsActive, with the queue
read from Redis, needs only a fresh backlog: `Target.is_active`); an unknown metric name
is NOT_FOUND; a full registry is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Awaitable, Callable, TypeVar

import grpc

from adapter._proto import externalscaler_pb2 as pb
from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from adapter.config import MetadataError
from adapter.metrics import ScalerMetrics
from adapter.policy import ceil_replicas
from adapter.targets import Target, TargetRegistry, TooManyTargets, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name

# KEDA names the HPA metric `s{triggerIndex}-{metricName}` and strips the prefix before
# calling us; accept it either way.
_TRIGGER_PREFIX = re.compile(r"^s\d+-")

T = TypeVar("T")


class MetricNotFound(Exception):
    """GetMetrics asked for a metric this trigger does not serve."""


def _status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, MetadataError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, MetricNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, TooManyTargets):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class ExternalScalerService(pb_grpc.ExternalScalerServicer):
    def __init__(self, registry: TargetRegistry, metrics: ScalerMetrics):
        self._registry = registry
        self._metrics = metrics
        # Resolved once: a labels() lookup per call costs as much as the rest of the answer.
        unary = ("IsActive", "GetMetricSpec", "GetMetrics")
        self._ok = {m: metrics.grpc_requests.labels(m, "OK") for m in unary}
        self._duration = {m: metrics.grpc_duration.labels(m) for m in unary}

    # --- unary RPCs -------------------------------------------------------------------

    async def IsActive(self, request: pb.ScaledObjectRef, context) -> pb.IsActiveResponse:
        async def answer() -> pb.IsActiveResponse:
            target = await self._ready(request)
            return pb.IsActiveResponse(result=target.is_active(self._registry.now()))

        return await self._unary("IsActive", context, answer)

    async def GetMetricSpec(self, request: pb.ScaledObjectRef, context) -> pb.GetMetricSpecResponse:
        async def answer() -> pb.GetMetricSpecResponse:
            return self._spec_response(self._resolve(request))

        return await self._unary("GetMetricSpec", context, answer)

    async def GetMetrics(self, request: pb.GetMetricsRequest, context) -> pb.GetMetricsResponse:
        async def answer() -> pb.GetMetricsResponse:
            target = await self._ready(request.scaledObjectRef)
            name = target.spec.metric_name
            asked = request.metricName
            if asked and _TRIGGER_PREFIX.sub("", asked).lower() != name.lower() and asked.lower() != name.lower():
                raise MetricNotFound(f"this trigger serves metric {name!r}, not {asked!r}")
            value = target.current(self._registry.now()).decision.value
            return pb.GetMetricsResponse(
                metricValues=[
                    pb.MetricValue(metricName=asked or name, metricValue=ceil_replicas(value), metricValueFloat=value)
                ]
            )

        return await self._unary("GetMetrics", context, answer)

    # --- streaming RPCs ---------------------------------------------------------------

    async def StreamIsActive(self, request: pb.ScaledObjectRef, context) -> None:
        async def stream(target: Target) -> None:
            await self._registry.first_refresh(target)
            last_sent: bool | None = None
            while True:
                active = target.is_active(self._registry.now())
                if active != last_sent:
                    await context.write(pb.IsActiveResponse(result=active))
                    last_sent = active
                target.last_used_at = self._registry.now()
                await target.changed(timeout_s=2 * target.spec.refresh_s)

        await self._stream("StreamIsActive", context, request, stream)

    async def StreamMetricSpec(self, request: pb.ScaledObjectRef, context) -> None:
        async def stream(target: Target) -> None:
            # A trigger's spec never changes: edited metadata is a new target, and KEDA
            # opens a new stream for it. Send once, then hold the stream open.
            await context.write(self._spec_response(target))
            while True:
                target.last_used_at = self._registry.now()
                await target.changed(timeout_s=60.0)

        await self._stream("StreamMetricSpec", context, request, stream)

    # --- plumbing ---------------------------------------------------------------------

    def _resolve(self, ref: pb.ScaledObjectRef) -> Target:
        return self._registry.resolve(ref.namespace, ref.name, ref.scalerMetadata)

    async def _ready(self, ref: pb.ScaledObjectRef) -> Target:
        target = self._resolve(ref)
        await self._registry.first_refresh(target)
        return target

    @staticmethod
    def _spec_response(target: Target) -> pb.GetMetricSpecResponse:
        return pb.GetMetricSpecResponse(
            metricSpecs=[pb.MetricSpec(metricName=target.spec.metric_name, targetSize=1, targetSizeFloat=1.0)]
        )

    async def _unary(self, method: str, context, answer: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            response = await answer()
        except Exception as error:
            code = self._failed(method, error)
            self._duration[method].observe(time.perf_counter() - started)
            await context.abort(code, str(error) or code.name)
        self._ok[method].inc()
        self._duration[method].observe(time.perf_counter() - started)
        return response

    async def _stream(
        self, method: str, context, ref: pb.ScaledObjectRef, run: Callable[[Target], Awaitable[None]]
    ) -> None:
        target: Target | None = None
        try:
            target = self._resolve(ref)
            target.open_streams += 1
            await run(target)
        except asyncio.CancelledError:
            self._metrics.grpc_requests.labels(method, "CANCELLED").inc()
            raise
        except Exception as error:
            code = self._failed(method, error)
            await context.abort(code, str(error) or code.name)
        finally:
            if target is not None:
                target.open_streams -= 1

    def _failed(self, method: str, error: Exception) -> grpc.StatusCode:
        code = _status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=error)
        self._metrics.grpc_requests.labels(method, code.name).inc()
        return code
