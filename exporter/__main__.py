"""`python -m exporter`: the GPU exporter, as a sidecar (default) or a per-node DaemonSet."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from contract.httpserver import MetricsServer

from .collector import GpuCollector, render
from .nvml import DeviceFilter, DeviceIdentity, NvmlReader
from .podresources import DEFAULT_SOCKET, PodRef, PodResourcesCache
from .poller import Poller

ENV_PREFIX = "EXPORTER_"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _flag(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter",
        description=(
            "GPU exporter over NVML with dcgm-exporter's metric names and labels. Collects in the "
            "background every --interval and serves the latest snapshot on /metrics, so a scrape never "
            "waits on NVML. sidecar mode exports the GPUs visible to the pod (NVIDIA_VISIBLE_DEVICES or "
            "CUDA_VISIBLE_DEVICES) labelled with POD_NAME, POD_NAMESPACE and CONTAINER_NAME; daemonset "
            "mode exports every GPU of the node labelled with the pod that holds it, from the kubelet's "
            "PodResources API. Every flag can also be set through the environment variable shown with it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--listen-address", default=_env("LISTEN_ADDRESS", "0.0.0.0"), help="(env EXPORTER_LISTEN_ADDRESS)")
    add("--port", type=int, default=_env("PORT", "9400"), help="HTTP port for /metrics and /healthz (env EXPORTER_PORT)")
    add("--mode", choices=["sidecar", "daemonset"], default=_env("MODE", "sidecar"), help="(env EXPORTER_MODE)")
    add("--interval", type=_positive, default=_env("INTERVAL", "1"),
        help="seconds between collections (env EXPORTER_INTERVAL)")
    add("--collect-timeout", type=_positive, default=_env("COLLECT_TIMEOUT"),
        help="seconds a collection may take before it counts as hung; default 0.8 x interval, at least 0.5 "
        "(env EXPORTER_COLLECT_TIMEOUT)")
    add("--stale-after", type=_positive, default=_env("STALE_AFTER"),
        help="withhold device series when the last collection is older than this; default 3 x interval "
        "(env EXPORTER_STALE_AFTER)")
    add("--visible-devices", default=_env("VISIBLE_DEVICES"),
        help="sidecar: GPUs to export, by index or UUID, comma-separated, or all; default "
        "NVIDIA_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, else all (env EXPORTER_VISIBLE_DEVICES)")
    add("--visible-devices-file", default=_env("VISIBLE_DEVICES_FILE"),
        help="sidecar: read the GPUs to export from this file, written by the worker container from its own "
        "NVIDIA_VISIBLE_DEVICES (a sidecar without a GPU request cannot see that variable); re-read at every NVML "
        "init, waited for while absent (env EXPORTER_VISIBLE_DEVICES_FILE)")
    add("--kubelet-socket", default=_env("KUBELET_SOCKET", DEFAULT_SOCKET),
        help="daemonset: the PodResources socket (env EXPORTER_KUBELET_SOCKET)")
    add("--pod-resources-ttl", type=_positive, default=_env("POD_RESOURCES_TTL", "10"),
        help="daemonset: seconds a GPU -> pod mapping is reused (env EXPORTER_POD_RESOURCES_TTL)")
    add("--per-process", action="store_true", default=_flag(_env("PER_PROCESS", "false")),
        help="also export GPU memory per process (pods sharing a GPU) (env EXPORTER_PER_PROCESS)")
    add("--hostname", default=_env("HOSTNAME_LABEL") or os.environ.get("NODE_NAME"),
        help="the Hostname label; default NODE_NAME, else this host's name (env EXPORTER_HOSTNAME_LABEL)")
    add("--log-level", choices=["debug", "info", "warning", "error"], default=_env("LOG_LEVEL", "info"),
        help="(env EXPORTER_LOG_LEVEL)")
    return parser


class Exporter:
    """Reader, poller and HTTP server wired together for one mode."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str] = os.environ, nvml=None) -> None:
        if args.visible_devices_file:
            path = args.visible_devices_file
            visible = lambda: DeviceFilter.from_file(path)  # noqa: E731 - read at each NVML init
        elif args.visible_devices:
            visible = DeviceFilter(args.visible_devices)
        else:
            visible = DeviceFilter.from_environment(environ)
        pod = None
        self.podresources: PodResourcesCache | None = None
        if args.mode == "daemonset":
            visible = DeviceFilter("all")  # the node's every GPU; pods come from the kubelet
            self.podresources = PodResourcesCache(args.kubelet_socket, ttl_s=args.pod_resources_ttl)
        elif environ.get("POD_NAME"):
            pod = PodRef(environ["POD_NAME"], environ.get("POD_NAMESPACE", ""), environ.get("CONTAINER_NAME", ""))
        self.reader = NvmlReader(nvml, visible=visible, per_process=args.per_process, hostname=args.hostname)
        self.poller = Poller(self.reader, interval_s=args.interval, timeout_s=args.collect_timeout,
                             attribution=self._owners_of if self.podresources else None)
        self.registry = CollectorRegistry()
        self.registry.register(GpuCollector(
            lambda: self.poller.state, lambda: dict(self.reader.errors), pod=pod,
            stale_after_s=args.stale_after or 3 * args.interval, extra=self._podresources_metrics,
        ))
        self.server = MetricsServer(self.registry, self._health, args.listen_address, args.port, render=render)

    def _owners_of(self, identity: DeviceIdentity) -> tuple[PodRef, ...]:
        owners = self.podresources.owners()
        refs: set[PodRef] = set()
        for key in (identity.uuid, str(identity.index), *identity.mig_uuids):
            refs.update(owners.get(key, ()))
        return tuple(sorted(refs))

    def _podresources_metrics(self) -> Iterable[Metric]:
        if self.podresources is None:
            return
        errors = CounterMetricFamily("gpu_exporter_podresources_errors", "Failed PodResources List calls by gRPC code",
                                     labels=("code",))
        for code, count in sorted(self.podresources.errors.items()):
            errors.add_metric((code,), count)
        yield errors
        yield CounterMetricFamily("gpu_exporter_podresources_refreshes", "Successful PodResources List calls",
                                  value=self.podresources.refreshes)

    def _health(self) -> tuple[bool, str]:
        # Alive while the poller runs; NVML being down is a metric, not a reason to restart.
        alive = self.poller.alive
        return alive, "ok" if alive else "poller stopped"

    def start(self) -> None:
        self.poller.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.poller.stop()
        if self.podresources is not None:
            self.podresources.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exporter = Exporter(args)
    exporter.start()
    logging.getLogger("exporter").info("serving /metrics on %s:%d (%s mode, every %g s)",
                                       args.listen_address, exporter.server.port, args.mode, args.interval)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    exporter.stop()
    # A hung NVML call may still hold its thread; do not wait for it at exit.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
