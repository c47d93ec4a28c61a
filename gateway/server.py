"""Runs the gateway: uvicorn serving the API, with the consumer group created beside it.

The HTTP server comes up whether Redis is up or not: liveness answers at once, readiness and
the APIs answer 503 until Redis does, and the consumer group is created as soon as it can be
(retried every GROUP_RETRY_S), so the scaler and the workers agree on it before any job.
On SIGTERM uvicorn stops accepting connections and lets the requests in flight finish; a job
already enqueued stays in the queue whatever happens to its waiting client.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from contract.apikey import warn_if_open

from .api import build_app
from .config import GatewayConfig
from .jobs import JobQueue, QueueUnavailable
from .metrics import GatewayMetrics

log = logging.getLogger("gateway.server")

GROUP_RETRY_S = 1.0


async def keep_trying_group(queue: JobQueue, retry_s: float = GROUP_RETRY_S) -> None:
    """Creates the consumer group, retrying until Redis answers; logs the first failure and
    the recovery, not every attempt."""
    failures = 0
    while True:
        try:
            await queue.ensure_group()
        except QueueUnavailable as error:
            if failures == 0:
                log.warning("cannot create consumer group %r on %r yet, retrying every %g s: %s",
                            queue.keys.group, queue.keys.stream, retry_s, error)
            failures += 1
            await asyncio.sleep(retry_s)
            continue
        log.info("consumer group %r on stream %r is there%s", queue.keys.group, queue.keys.stream,
                 f" after {failures} failed attempts" if failures else "")
        return


def gateway_app(config: GatewayConfig, registry: CollectorRegistry | None = None) -> FastAPI:
    """The app on a new queue client; its lifespan creates the group and closes the client."""
    queue = JobQueue.connect(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        group = asyncio.create_task(keep_trying_group(queue))
        try:
            yield
        finally:
            group.cancel()
            await queue.close()

    return build_app(queue, GatewayMetrics(registry or CollectorRegistry()), config, lifespan)


class GatewayServer(uvicorn.Server):
    """uvicorn, exiting 0 after a graceful stop on SIGTERM or Ctrl-C rather than re-raising the
    signal at the end; a second Ctrl-C still stops at once."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def serve(config: GatewayConfig) -> int:
    """Serves until SIGTERM or Ctrl-C; returns the process exit code."""
    log.info("gateway on %s:%d, queue %r (group %r), request timeout %g s, max backlog %d",
             config.host, config.port, config.stream, config.group, config.request_timeout_s, config.max_backlog)
    warn_if_open(config.api_keys, config.host, log)
    server = GatewayServer(uvicorn.Config(gateway_app(config), host=config.host, port=config.port, lifespan="on",
                                           access_log=config.access_log, log_config=None))
    server.run()
    return 0 if server.started else 1
