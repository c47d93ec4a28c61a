"""`python -m exporter`: the GPU exporter, as a sidecar (default) or a per-node DaemonSet."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from contract import names
from contract.cli import LOG_LEVELS, Environment, configure_logging, positive_float
from contract.httpserver import MetricsServer

from .collector import GpuExposition, podresources_text
from .config import MODES, ExporterConfig
from .devices import DeviceFilter, DeviceIdentity
from .nvml import NvmlReader
from .podresources import PodRef, PodResourcesCache
from .poller import Poller

ENV = Environment("EXPORTER_")


def build_parser() -> argparse.ArgumentParser:
    """The flags; each default comes from its EXPORTER_* variable, else from ExporterConfig."""
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
    default = ExporterConfig  # the class's field defaults
    add = parser.add_argument
    add("--listen-address", default=ENV.get("LISTEN_ADDRESS", default.listen_address),
        help="(env EXPORTER_LISTEN_ADDRESS)")
    add("--port", type=int, default=ENV.get("PORT", str(default.port)),
        help="HTTP port for /metrics and /healthz (env EXPORTER_PORT)")
    add("--mode", choices=MODES, default=ENV.get("MODE", default.mode), help="(env EXPORTER_MODE)")
    add("--interval", type=positive_float, default=ENV.get("INTERVAL", f"{default.interval_s:g}"),
        help="seconds between collections (env EXPORTER_INTERVAL)")
    add("--collect-timeout", type=positive_float, default=ENV.get("COLLECT_TIMEOUT"),
        help="seconds a collection may take before it counts as hung; default 0.8 x interval, at least 0.5 "
        "(env EXPORTER_COLLECT_TIMEOUT)")
    add("--stale-after", type=positive_float, default=ENV.get("STALE_AFTER"),
        help="withhold device series when the last collection is older than this; default 3 x interval "
        "(env EXPORTER_STALE_AFTER)")
    add("--visible-devices", default=ENV.get("VISIBLE_DEVICES"),
        help="sidecar: GPUs to export, by index or UUID, comma-separated, or all; default "
        "NVIDIA_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, else all (env EXPORTER_VISIBLE_DEVICES)")
    add("--visible-devices-file", default=ENV.get("VISIBLE_DEVICES_FILE"),
        help="sidecar: read the GPUs to export from this file, written by the worker container from its own "
        "NVIDIA_VISIBLE_DEVICES (a sidecar without a GPU request cannot see that variable); re-read at every NVML "
        "init, waited for while absent (env EXPORTER_VISIBLE_DEVICES_FILE)")
    add("--kubelet-socket", default=ENV.get("KUBELET_SOCKET", default.kubelet_socket),
        help="daemonset: the PodResources socket (env EXPORTER_KUBELET_SOCKET)")
    add("--pod-resources-ttl", type=positive_float,
        default=ENV.get("POD_RESOURCES_TTL", f"{default.pod_resources_ttl_s:g}"),
        help="daemonset: seconds a GPU -> pod mapping is reused (env EXPORTER_POD_RESOURCES_TTL)")
    add("--per-process", action="store_true", default=ENV.flag("PER_PROCESS", default.per_process),
        help="also export GPU memory per process (pods sharing a GPU) (env EXPORTER_PER_PROCESS)")
    add("--xid-quiet-period", type=positive_float, default=ENV.get("XID_QUIET_PERIOD", f"{default.xid_quiet_s:g}"),
        help=f"seconds without a new XID after which {names.XID_ERRORS} returns to 0 (it also does when the GPU "
        f"re-attaches); {names.EXPORTER_XID_EVENTS}_total counts every event (env EXPORTER_XID_QUIET_PERIOD)")
    add("--hostname", default=ENV.get("HOSTNAME_LABEL") or os.environ.get("NODE_NAME"),
        help="the Hostname label; default NODE_NAME, else this host's name (env EXPORTER_HOSTNAME_LABEL)")
    add("--log-level", choices=LOG_LEVELS, default=ENV.get("LOG_LEVEL", default.log_level),
        help="(env EXPORTER_LOG_LEVEL)")
    return parser


def device_filter(config: ExporterConfig, environ: Mapping[str, str]) -> DeviceFilter | Callable[[], DeviceFilter]:
    """The GPUs to export: a daemonset's every GPU; a sidecar's from its file, its flag, or the environment."""
    if config.mode == "daemonset":
        return DeviceFilter("all")  # the node's every GPU; pods come from the kubelet
    if config.visible_devices_file:
        path = config.visible_devices_file
        return lambda: DeviceFilter.from_file(path)  # read at each NVML init
    if config.visible_devices:
        return DeviceFilter(config.visible_devices)
    return DeviceFilter.from_environment(environ)


class Exporter:
    """Reader, poller and HTTP server wired together for one mode."""

    def __init__(self, config: ExporterConfig, environ: Mapping[str, str] = os.environ, nvml=None) -> None:
        self.config = config
        pod = None
        self.podresources: PodResourcesCache | None = None
        if config.mode == "daemonset":
            self.podresources = PodResourcesCache(config.kubelet_socket, ttl_s=config.pod_resources_ttl_s)
        elif environ.get("POD_NAME"):
            pod = PodRef(environ["POD_NAME"], environ.get("POD_NAMESPACE", ""), environ.get("CONTAINER_NAME", ""))
        self.reader = NvmlReader(nvml, visible=device_filter(config, environ), per_process=config.per_process,
                                 hostname=config.hostname, xid_quiet_s=config.xid_quiet_s)
        self.exposition = GpuExposition(
            lambda: dict(self.reader.errors), stale_after_s=config.stale_after_s, pod=pod,
            extra=self._podresources_text if self.podresources else None, xid_events=self.reader.xids.counts,
        )
        # The poller renders the exposition after each period; a scrape only picks a rendering.
        self.poller = Poller(self.reader, interval_s=config.interval_s, timeout_s=config.collect_timeout_s,
                             attribution=self._owners_of if self.podresources else None,
                             on_state=self.exposition.update)
        # The server's own text writer reads a registry; `render` replaces it, so this one stays empty.
        self.server = MetricsServer(CollectorRegistry(), self._health, config.listen_address, config.port,
                                    render=lambda _registry: self.exposition.scrape(time.time()))

    def _owners_of(self, identity: DeviceIdentity) -> tuple[PodRef, ...]:
        owners = self.podresources.owners()
        refs: set[PodRef] = set()
        for key in (identity.uuid, str(identity.index), *identity.mig_uuids):
            refs.update(owners.get(key, ()))
        return tuple(sorted(refs))

    def _podresources_text(self) -> str:
        return podresources_text(self.podresources)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ExporterConfig.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    configure_logging(config.log_level)
    exporter = Exporter(config)
    exporter.start()
    logging.getLogger("exporter").info("serving /metrics on %s:%d (%s mode, every %g s)",
                                       config.listen_address, exporter.server.port, config.mode, config.interval_s)
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
