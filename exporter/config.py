"""The exporter's settings (flags and environment), parsed once into a frozen `ExporterConfig`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from contract.cli import LOG_LEVELS

from .podresources import DEFAULT_SOCKET
from .xid import DEFAULT_QUIET_S

MODES = ("sidecar", "daemonset")

# A collection may take most of its period before it counts as hung, so that it ends before the
# next period starts; short intervals still give it this much.
COLLECT_TIMEOUT_SHARE = 0.8  # of the interval
MIN_COLLECT_TIMEOUT_S = 0.5
STALE_AFTER_PERIODS = 3  # a snapshot this many intervals old is withheld

# Each field's flag, for errors that name what the user typed.
FLAGS = {
    "port": "--port",
    "mode": "--mode",
    "interval_s": "--interval",
    "collect_timeout_s": "--collect-timeout",
    "stale_after_s": "--stale-after",
    "pod_resources_ttl_s": "--pod-resources-ttl",
    "xid_quiet_s": "--xid-quiet-period",
    "log_level": "--log-level",
}


@dataclass(frozen=True)
class ExporterConfig:
    """Every setting of one exporter process; `collect_timeout_s` and `stale_after_s` left None
    are resolved from `interval_s` on construction, so they are always numbers afterwards."""

    listen_address: str = "0.0.0.0"
    port: int = 9400  # /metrics and /healthz; 0 picks a free one
    mode: str = "sidecar"  # one of MODES
    interval_s: float = 1.0  # between collections
    collect_timeout_s: float | None = None  # a longer collection is hung; None: 0.8 x interval_s, at least 0.5
    stale_after_s: float | None = None  # an older snapshot is withheld; None: 3 x interval_s
    visible_devices: str | None = None  # sidecar: indexes or UUIDs; None: NVIDIA_/CUDA_VISIBLE_DEVICES
    visible_devices_file: str | None = None  # sidecar: the file the worker writes its GPUs to
    kubelet_socket: str = DEFAULT_SOCKET  # daemonset: the PodResources socket
    pod_resources_ttl_s: float = 10.0  # daemonset: how long a GPU -> pod mapping is reused
    per_process: bool = False  # also export GPU memory per process
    xid_quiet_s: float = DEFAULT_QUIET_S  # DCGM_FI_DEV_XID_ERRORS returns to 0 after this long without an XID
    hostname: str | None = None  # the Hostname label; None: this host's name
    log_level: str = "info"  # one of contract.cli.LOG_LEVELS

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{FLAGS['port']} must be a port number, 0 to 65535, got {self.port}")
        for name, value, accepted in (("mode", self.mode, MODES), ("log_level", self.log_level, LOG_LEVELS)):
            if value not in accepted:
                raise ValueError(f"{FLAGS[name]} must be one of {', '.join(accepted)}, got {value!r}")
        for name in ("interval_s", "collect_timeout_s", "stale_after_s", "pod_resources_ttl_s", "xid_quiet_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{FLAGS[name]} must be above 0 seconds, got {value:g}")
        # The defaults that depend on the interval, resolved here and nowhere else.
        if self.collect_timeout_s is None:
            object.__setattr__(self, "collect_timeout_s",
                               max(MIN_COLLECT_TIMEOUT_S, COLLECT_TIMEOUT_SHARE * self.interval_s))
        if self.stale_after_s is None:
            object.__setattr__(self, "stale_after_s", STALE_AFTER_PERIODS * self.interval_s)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExporterConfig:
        """The config of `python -m exporter`'s parsed flags; raises ValueError naming a bad flag."""
        return cls(
            listen_address=args.listen_address,
            port=args.port,
            mode=args.mode,
            interval_s=args.interval,
            collect_timeout_s=args.collect_timeout,
            stale_after_s=args.stale_after,
            visible_devices=args.visible_devices,
            visible_devices_file=args.visible_devices_file,
            kubelet_socket=args.kubelet_socket,
            pod_resources_ttl_s=args.pod_resources_ttl,
            per_process=args.per_process,
            xid_quiet_s=args.xid_quiet_period,
            hostname=args.hostname,
            log_level=args.log_level,
        )
