"""The plain, immutable values one collection produces: each GPU's reading and the snapshot of them all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .devices import DeviceIdentity


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    used_bytes: int


@dataclass(frozen=True)
class DeviceReading:
    """One GPU in one collection: its values by dcgm-exporter name; none when it is down."""

    identity: DeviceIdentity
    up: bool
    values: Mapping[str, float] = field(default_factory=dict)
    processes: tuple[ProcessMemory, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """One collection: every visible GPU's values at `taken_at` (unix seconds)."""

    taken_at: float
    duration_s: float
    nvml_up: bool
    driver_version: str = ""
    hostname: str = ""
    devices: tuple[DeviceReading, ...] = ()
    error: str | None = None
