"""`python -m adapter`: the KEDA external scaler (gRPC) with its /metrics and /healthz server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from adapter.prometheus import PrometheusAuth
from contract.redisaccess import add_redis_flags, redis_access_from
from contract.cli import LOG_LEVELS, Environment, configure_logging
from adapter.server import ScalerServer, ServerConfig

ENV = Environment("SCALER_")
_DEFAULTS = ServerConfig()  # each flag's default is written once, in ServerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adapter",
        description=(
            "KEDA external scaler for GPU diffusion inference. Reads GPU utilization, queue length and "
            "p95 latency from Prometheus per ScaledObject in the background, combines them into one "
            "composite metric in replica units with stabilization windows, and answers KEDA's "
            "ExternalScaler RPCs from that cache. Per-ScaledObject settings come from the trigger "
            "metadata (see README); the flags below are process-wide. Every flag can also be set "
            "through the environment variable shown with it. `python -m lab.sim --help` "
            "is the replay simulator (docs/EVALUATION.md)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--listen-address", default=ENV.get("LISTEN_ADDRESS", _DEFAULTS.listen_address), help="address both servers bind (env SCALER_LISTEN_ADDRESS)")
    add("--grpc-port", type=int, default=ENV.get("GRPC_PORT", _DEFAULTS.grpc_port), help="gRPC port (ExternalScaler, health, reflection) (env SCALER_GRPC_PORT)")
    add("--http-port", type=int, default=ENV.get("HTTP_PORT", _DEFAULTS.http_port), help="HTTP port for /metrics and /healthz (env SCALER_HTTP_PORT)")
    tls = parser.add_argument_group("TLS for the gRPC port (KEDA: enableTLS, caCert, tlsClientCert)")
    tls.add_argument("--tls-cert-file", default=ENV.get("TLS_CERT_FILE"), help="server certificate, PEM; enables TLS (env SCALER_TLS_CERT_FILE)")
    tls.add_argument("--tls-key-file", default=ENV.get("TLS_KEY_FILE"), help="server private key, PEM (env SCALER_TLS_KEY_FILE)")
    tls.add_argument(
        "--tls-client-ca-file",
        default=ENV.get("TLS_CLIENT_CA_FILE"),
        help="CA bundle, PEM; when set, clients must present a certificate it signed (mTLS) (env SCALER_TLS_CLIENT_CA_FILE)",
    )
    prom = parser.add_argument_group(
        "Prometheus access (scaler-side: KEDA does not forward TriggerAuthentication to external scalers)"
    )
    prom.add_argument(
        "--prometheus-address",
        default=ENV.get("PROMETHEUS_ADDRESS"),
        help="the operator's Prometheus (base URL of its HTTP API): the credentials below go to it and nowhere else "
        "(a ScaledObject naming another prometheusAddress is read without them), and a trigger without "
        "prometheusAddress reads it; required with credentials (env SCALER_PROMETHEUS_ADDRESS)",
    )
    prom.add_argument("--prometheus-bearer-token-file", default=ENV.get("PROMETHEUS_BEARER_TOKEN_FILE"), help="send this file's token as a Bearer token to --prometheus-address only; re-read on every query (env SCALER_PROMETHEUS_BEARER_TOKEN_FILE)")
    prom.add_argument("--prometheus-username", default=ENV.get("PROMETHEUS_USERNAME"), help="basic auth user (env SCALER_PROMETHEUS_USERNAME)")
    prom.add_argument("--prometheus-password-file", default=ENV.get("PROMETHEUS_PASSWORD_FILE"), help="basic auth password, read from this file (env SCALER_PROMETHEUS_PASSWORD_FILE)")
    prom.add_argument("--prometheus-ca-file", default=ENV.get("PROMETHEUS_CA_FILE"), help="CA bundle to verify Prometheus' HTTPS certificate (env SCALER_PROMETHEUS_CA_FILE)")
    prom.add_argument(
        "--prometheus-insecure-skip-verify",
        action="store_true",
        default=ENV.flag("PROMETHEUS_INSECURE_SKIP_VERIFY"),
        help="do not verify Prometheus' HTTPS certificate (env SCALER_PROMETHEUS_INSECURE_SKIP_VERIFY)",
    )
    prom.add_argument(
        "--allowed-prometheus-urls",
        default=ENV.get("ALLOWED_PROMETHEUS_URLS", ""),
        help="comma list of URLs a ScaledObject's prometheusAddress must fall within (same scheme, host and port, "
        "a path at or below); --prometheus-address is always allowed; empty allows any address outside "
        "--denied-networks. Set it to --prometheus-address to refuse every other address (env SCALER_ALLOWED_PROMETHEUS_URLS)",
    )
    tenancy = parser.add_argument_group("What ScaledObjects may reach (docs/SECURITY.md)")
    tenancy.add_argument(
        "--denied-networks",
        default=ENV.get("DENIED_NETWORKS", ",".join(_DEFAULTS.denied_networks)),
        help="comma list of CIDR blocks a prometheusAddress or redisAddress a ScaledObject names may not resolve "
        "into (checked at connect time): the pod's loopback, link-local with the cloud metadata endpoints, "
        "unspecified; --prometheus-address, --allowed-prometheus-urls and --redis-address are exempt "
        "(env SCALER_DENIED_NETWORKS)",
    )
    tenancy.add_argument(
        "--allow-cross-namespace",
        action="store_true",
        default=ENV.flag("ALLOW_CROSS_NAMESPACE"),
        help="let a ScaledObject read series and streams of other namespaces (a selector, a query or a stream "
        "naming them). Off, its queries carry namespace=\"<its namespace>\" and a stream must be "
        "diffusion:<its namespace>:<name>. Only for a cluster whose every namespace is trusted: on, anyone who may "
        "create a ScaledObject reads every namespace's load (env SCALER_ALLOW_CROSS_NAMESPACE)",
    )
    tenancy.add_argument("--max-scaled-objects-per-namespace", type=int, default=ENV.get("MAX_SCALED_OBJECTS_PER_NAMESPACE", _DEFAULTS.max_scaled_objects_per_namespace), help="registered triggers of one namespace at most, so one namespace cannot exhaust the scaler for the others; beyond it RPCs are RESOURCE_EXHAUSTED (env SCALER_MAX_SCALED_OBJECTS_PER_NAMESPACE)")
    prom.add_argument(
        "--scrape-targets-dir",
        default=ENV.get("SCRAPE_TARGETS_DIR"),
        help="allow the direct-scrape source: a ScaledObject's scrapeTargetsFile may name a Prometheus file_sd "
        "JSON file inside this directory, and the scaler scrapes the pods it lists itself, without Prometheus; "
        "unset, scrapeTargetsFile is refused (env SCALER_SCRAPE_TARGETS_DIR)",
    )
    prom.add_argument("--max-concurrent-queries", type=int, default=ENV.get("MAX_CONCURRENT_QUERIES", _DEFAULTS.max_concurrent_queries), help="Prometheus queries in flight, across all ScaledObjects (env SCALER_MAX_CONCURRENT_QUERIES)")
    queue = parser.add_argument_group("Redis access (for ScaledObjects with redisAddress; credentials never in metadata)")
    queue.add_argument(
        "--redis-address",
        default=ENV.get("REDIS_ADDRESS"),
        help="the operator's Redis (redis://host:port or rediss://...): the password goes to it and nowhere else "
        "(a ScaledObject naming another redisAddress is read without it); required with a password "
        "(env SCALER_REDIS_ADDRESS)",
    )
    # The same flags as the gateway's and the workers'; all of them go to --redis-address only.
    add_redis_flags(queue.add_argument, ENV)
    add(
        "--kubernetes-api",
        default=ENV.get("KUBERNETES_API", _DEFAULTS.kubernetes_api),
        choices=["auto", "off"],
        help="auto: where the in-cluster configuration loads, read each scale target's replicas from the API "
        "(ScaledObject, then its target's readyReplicas), so an empty answer from Prometheus while it has ready replicas is "
        "missing data, not 0; off, outside a cluster or without RBAC, the last good reading decides "
        "(env SCALER_KUBERNETES_API)",
    )
    add(
        "--events",
        default=ENV.get("EVENTS", _DEFAULTS.events),
        choices=["auto", "off"],
        help="auto: wherever the Kubernetes API is used (--kubernetes-api), record an Event on the ScaledObject "
        "when the size it is asked for changes, is held by a stabilization window, or its data goes stale, saying "
        "why; rate-limited and aggregated, shown by kubectl describe scaledobject. Needs create and patch on "
        "events (manifests/components/scaler-access); without them the scaler logs that once and carries on "
        "(env SCALER_EVENTS)",
    )
    add("--idle-forget-seconds", type=float, default=ENV.get("IDLE_FORGET_SECONDS", f"{_DEFAULTS.idle_forget_s:g}"), help="forget a ScaledObject no RPC has asked about for this long (env SCALER_IDLE_FORGET_SECONDS)")
    add("--max-scaled-objects", type=int, default=ENV.get("MAX_SCALED_OBJECTS", _DEFAULTS.max_scaled_objects), help="registered triggers at most; beyond it RPCs are RESOURCE_EXHAUSTED (env SCALER_MAX_SCALED_OBJECTS)")
    add("--shutdown-grace-seconds", type=float, default=ENV.get("SHUTDOWN_GRACE_SECONDS", f"{_DEFAULTS.shutdown_grace_s:g}"), help="on SIGTERM, time given to RPCs in flight (env SCALER_SHUTDOWN_GRACE_SECONDS)")
    add("--log-level", default=ENV.get("LOG_LEVEL", "info"), choices=LOG_LEVELS, help="(env SCALER_LOG_LEVEL)")
    add("--log-format", default=ENV.get("LOG_FORMAT", "text"), choices=["text", "json"], help="(env SCALER_LOG_FORMAT)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    password = None
    if args.prometheus_password_file:
        with open(args.prometheus_password_file, encoding="utf-8") as f:
            password = f.read().strip()
    auth = PrometheusAuth(
        bearer_token_file=args.prometheus_bearer_token_file,
        username=args.prometheus_username,
        password=password,
        ca_file=args.prometheus_ca_file,
        insecure_skip_verify=args.prometheus_insecure_skip_verify,
    )
    return ServerConfig(
        listen_address=args.listen_address,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file,
        prometheus_auth=auth,
        prometheus_address=args.prometheus_address or None,
        allowed_prometheus_urls=tuple(u.strip() for u in args.allowed_prometheus_urls.split(",") if u.strip()),
        denied_networks=tuple(n.strip() for n in args.denied_networks.split(",") if n.strip()),
        allow_cross_namespace=args.allow_cross_namespace,
        max_scaled_objects_per_namespace=args.max_scaled_objects_per_namespace,
        redis_address=args.redis_address or None,
        scrape_targets_dir=args.scrape_targets_dir,
        max_concurrent_queries=args.max_concurrent_queries,
        redis_access=redis_access_from(args, ENV),
        idle_forget_s=args.idle_forget_seconds,
        max_scaled_objects=args.max_scaled_objects,
        shutdown_grace_s=args.shutdown_grace_seconds,
        kubernetes_api=args.kubernetes_api,
        events=args.events,
    )


async def serve(config: ServerConfig) -> bool:
    """Serves until SIGTERM or SIGINT; returns whether the shutdown was clean."""
    server = ScalerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log = logging.getLogger("adapter")
    log.info("shutting down")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)  # a second signal ends the process at once
    if not await server.stop():
        # asyncio.run would wait forever for the task that ignored its cancellation
        log.error("exiting without the refreshers that would not stop")
        logging.shutdown()
        os._exit(1)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        clean = asyncio.run(serve(config))
    except (OSError, RuntimeError) as e:  # e.g. a port already in use
        logging.getLogger("adapter").error("cannot start: %s", e)
        return 1
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
