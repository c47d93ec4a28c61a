"""A small threaded HTTP server for `/metrics` and `/healthz`, separate from what it serves."""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, make_wsgi_app

HealthCheck = Callable[[], tuple[bool, str]]
Render = Callable[[CollectorRegistry], bytes]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - scrapes every second would flood the log
        pass


def make_app(registry: CollectorRegistry, health: HealthCheck, render: Render | None = None):
    """/metrics and /healthz; `render` replaces prometheus_client's text writer when given."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics" and render is not None:
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [render(registry)]
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok, reason = health()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [(reason or ("ok" if ok else "unhealthy")).encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class MetricsServer:
    """Serves the registry and a health check on a daemon thread."""

    def __init__(
        self, registry: CollectorRegistry, health: HealthCheck, address: str, port: int, render: Render | None = None
    ):
        self._server = make_server(
            address, port, make_app(registry, health, render), server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
