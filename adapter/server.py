"""Assembles the scaler process: gRPC (ExternalScaler, health, reflection, optional TLS/mTLS),
the refresher registry, and the HTTP server for /metrics and /healthz."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from adapter._proto import externalscaler_pb2_grpc as pb_grpc
from contract.httpserver import MetricsServer
from adapter.metrics import ScalerMetrics, TargetCollector
from adapter.access import DEFAULT_DENIED_NETWORKS, AccessRules, Endpoint, parse_networks
from adapter.prometheus import PrometheusAuth, PrometheusClient
from contract.redisaccess import RedisAccess
from adapter.service import SERVICE_NAME, ExternalScalerService
from adapter.directscrape import DirectSignalReader, SignalRouter
from adapter.kube import MODES, OFF, KubernetesReplicas, in_cluster_configuration
from adapter.kubeevents import KubernetesEventSink
from adapter.recorder import EventRecorder
from adapter.redisqueue import QueueFromRedis, RedisBacklog
from adapter.signals import SignalReader
from adapter.targets import TargetRegistry

log = logging.getLogger(__name__)

# /healthz fails when the event loop has not ticked for this long (a wedged loop).
_HEARTBEAT_LIMIT_S = 10.0
# The Events' source (kubectl describe's From column), with the pod's name as the instance.
EVENT_COMPONENT = "diffusion-scaler"


@dataclass(frozen=True)
class ServerConfig:
    """The process's settings (flags and environment), parsed once."""

    listen_address: str = "0.0.0.0"
    grpc_port: int = 6000
    http_port: int = 9102
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # set: clients must present a certificate it signed
    prometheus_auth: PrometheusAuth = field(default_factory=PrometheusAuth)
    # The operator's Prometheus: the credentials go there only; a trigger without prometheusAddress reads it.
    prometheus_address: str | None = None
    allowed_prometheus_urls: tuple[str, ...] = ()  # set: metadata may name addresses within these only
    denied_networks: tuple[str, ...] = DEFAULT_DENIED_NETWORKS  # metadata's addresses never reach these
    allow_cross_namespace: bool = False  # True: a ScaledObject may read other namespaces' series and streams
    scrape_targets_dir: str | None = None  # set: ScaledObjects may name file_sd files in it (scrapeTargetsFile)
    max_concurrent_queries: int = 32
    redis_address: str | None = None  # the operator's Redis: the password goes there only
    # Who the scaler is to Redis (ACL user, password, client certificate): sent to redis_address
    # only; its CA file verifies that Redis. A ScaledObject's other redisAddress gets none of it.
    redis_access: RedisAccess = field(default_factory=RedisAccess)
    idle_forget_s: float = 900.0
    max_scaled_objects: int = 2000
    max_scaled_objects_per_namespace: int = 200
    shutdown_grace_s: float = 5.0
    kubernetes_api: str = "auto"  # auto: read scale targets' replicas where in-cluster config loads; off: never
    kubernetes_api_ttl_s: float = 30.0  # a target's replica count is read at most this often
    kubernetes_api_timeout_s: float = 2.0  # per API request
    events: str = "auto"  # auto: record Events on ScaledObjects wherever the Kubernetes API is used; off: never

    def __post_init__(self):
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file (mTLS) needs --tls-cert-file and --tls-key-file")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name.replace('_', '-')} must be a port number, 0 to 65535")
        if self.kubernetes_api not in MODES:
            raise ValueError(f"--kubernetes-api must be one of {', '.join(MODES)}, not {self.kubernetes_api!r}")
        if self.events not in MODES:
            raise ValueError(f"--events must be one of {', '.join(MODES)}, not {self.events!r}")
        if self.max_concurrent_queries < 1 or self.max_scaled_objects < 1 or self.max_scaled_objects_per_namespace < 1:
            raise ValueError("--max-concurrent-queries, --max-scaled-objects and --max-scaled-objects-per-namespace "
                             "must be at least 1")
        for flag, url, schemes in (("--prometheus-address", self.prometheus_address, ("http", "https")),
                                   ("--redis-address", self.redis_address, ("redis", "rediss")),
                                   *(("--allowed-prometheus-urls", u, ("http", "https")) for u in self.allowed_prometheus_urls)):
            if url is None:
                continue
            try:
                scheme = Endpoint.of(url).scheme
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None
            if scheme not in schemes:
                raise ValueError(f"{flag}: {url!r} must be a {' or '.join(schemes)} URL")
        if self.prometheus_auth.bearer_token_file and self.prometheus_auth.username:
            raise ValueError("--prometheus-bearer-token-file and --prometheus-username are two ways to authenticate; "
                             "set one (both would be one Authorization header)")
        if self.prometheus_auth.configured() and not self.prometheus_address:
            raise ValueError("Prometheus credentials are set (--prometheus-bearer-token-file, --prometheus-username) but "
                             "--prometheus-address (SCALER_PROMETHEUS_ADDRESS) is not: the scaler sends them only to "
                             "the Prometheus you name there, never to a prometheusAddress a ScaledObject names")
        credentials = self.redis_access.password or self.redis_access.username or self.redis_access.cert_file
        if credentials and not self.redis_address:
            raise ValueError("Redis credentials are set (--redis-password-file or SCALER_REDIS_PASSWORD, --redis-username, "
                             "--redis-cert-file) but --redis-address (SCALER_REDIS_ADDRESS) is not: the scaler sends "
                             "them only to the Redis you name there, never to a redisAddress a ScaledObject names")
        if self.redis_address:
            self.redis_access.check_url(self.redis_address, "--redis-address")
        parse_networks(self.denied_networks)  # raises ValueError naming a bad block

    @property
    def access(self) -> AccessRules:
        """The rules for what trigger metadata may reach (adapter/access.py)."""
        return AccessRules(
            prometheus_address=self.prometheus_address,
            redis_address=self.redis_address,
            allowed_prometheus_urls=self.allowed_prometheus_urls,
            denied_networks=parse_networks(self.denied_networks),
            cross_namespace=self.allow_cross_namespace,
            max_per_namespace=self.max_scaled_objects_per_namespace,
        )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS credentials that pick up rotated certificate files (cert-manager) on new handshakes."""
    paths = [p for p in (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) if p]

    def load() -> grpc.ServerCertificateConfiguration:
        pair = [(_read(config.tls_key_file), _read(config.tls_cert_file))]
        ca = _read(config.tls_client_ca_file) if config.tls_client_ca_file else None
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=ca)

    def mtimes() -> tuple[float, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in paths)

    loaded = {"mtimes": mtimes()}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            current = mtimes()
            if current == loaded["mtimes"]:
                return None
            fresh = load()
        except (OSError, ValueError) as e:
            log.error("keeping the current TLS certificate: cannot load the new one: %s", e)
            return None
        loaded["mtimes"] = current
        log.info("TLS certificate files changed; new connections use them")
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        load(), fetch, require_client_authentication=config.tls_client_ca_file is not None
    )


class ScalerServer:
    """One scaler process's servers; `start` binds the ports, `stop` drains and closes them."""

    def __init__(
        self,
        config: ServerConfig,
        metrics_registry: CollectorRegistry | None = None,
        kubernetes_configuration: object | None = None,
    ):
        """`kubernetes_configuration` (a `kubernetes.client.Configuration`) replaces the in-cluster
        one: an API server elsewhere (tests use a fake one on loopback)."""
        self.config = config
        self._kubernetes_configuration = kubernetes_configuration
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._client = PrometheusClient(config.prometheus_auth, rules=config.access)
        self._heartbeat = time.monotonic()
        self._serving = False

    async def start(self) -> None:
        config = self.config
        metrics = ScalerMetrics(self.metrics_registry)
        self._direct = DirectSignalReader()
        if config.kubernetes_api == OFF:
            kubernetes, unavailable = None, OFF
        else:
            kubernetes, unavailable = self._kubernetes_configuration or in_cluster_configuration(), None
        self._kube = KubernetesReplicas(
            kubernetes,
            ttl_s=config.kubernetes_api_ttl_s,
            timeout_s=config.kubernetes_api_timeout_s,
            on_fallback=metrics.kubernetes_api_fallback,
            **({"unavailable": unavailable} if unavailable else {}),
        )
        self._events: EventRecorder | None = None
        if config.events != OFF and kubernetes is not None:
            self._event_sink = KubernetesEventSink(kubernetes, timeout_s=config.kubernetes_api_timeout_s)
            self._events = EventRecorder(self._event_sink, component=EVENT_COMPONENT, instance=socket.gethostname(),
                                         on_result=metrics.kubernetes_event)
        log.info("Kubernetes Events on ScaledObjects: %s", "recorded" if self._events else
                 "off (--events off)" if config.events == OFF else "off (no Kubernetes API)")
        self._redis = RedisBacklog(config.redis_access, rules=config.access)
        reader = QueueFromRedis(
            SignalRouter(SignalReader(self._client.query, config.max_concurrent_queries), self._direct), self._redis
        )
        self.registry = TargetRegistry(
            reader,
            access=config.access,
            scrape_targets_dir=config.scrape_targets_dir,
            idle_forget_s=config.idle_forget_s,
            max_targets=config.max_scaled_objects,
            on_reading=metrics.observe_reading,
            replicas=self._kube,
            on_refresh=self._events.observe if self._events else None,
        )
        self.metrics_registry.register(TargetCollector(self.registry.targets, self.registry.now))

        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(ExternalScalerService(self.registry, metrics), self._grpc)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        address = f"{config.listen_address}:{config.grpc_port}"
        if config.tls_cert_file:
            self.grpc_port = self._grpc.add_secure_port(address, server_credentials(config))
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

        self._http = MetricsServer(self.metrics_registry, self.health, config.listen_address, config.http_port)
        self.http_port = self._http.port
        self._http.start()
        self._beat_task = asyncio.get_running_loop().create_task(self._beat())
        # Everything allocated so far (modules, gRPC, protobuf descriptors) lives as long as
        # the process: keep it out of the collector's full passes, which otherwise stall
        # the event loop for milliseconds at a time under load.
        gc.freeze()
        self._serving = True
        log.info(
            "serving ExternalScaler on %s:%d (%s), metrics on :%d",
            config.listen_address, self.grpc_port,
            "mTLS" if config.tls_client_ca_file else "TLS" if config.tls_cert_file else "plaintext",
            self.http_port,
        )  # fmt: skip

    async def _beat(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            await asyncio.sleep(1.0)

    def health(self) -> tuple[bool, str]:
        if not self._serving:
            return False, "not serving (starting or shutting down)"
        silent = time.monotonic() - self._heartbeat
        if silent > _HEARTBEAT_LIMIT_S:
            return False, f"event loop stalled for {silent:.0f}s"
        return True, "ok"

    async def stop(self) -> bool:
        """Reports NOT_SERVING, lets RPCs in flight finish (bounded), then closes everything.
        Returns False when a refresher would not stop: the caller should exit regardless."""
        self._serving = False
        await self._health.enter_graceful_shutdown()
        await self._grpc.stop(self.config.shutdown_grace_s)
        self._beat_task.cancel()
        clean = await self.registry.close()
        self._http.stop()
        await self._client.close()
        await self._direct.close()
        await self._redis.close()
        self._kube.close()
        if self._events is not None:
            await asyncio.to_thread(self._events.close)
            self._event_sink.close()
        return clean
