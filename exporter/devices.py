"""Which GPUs to export (`DeviceFilter`) and what identifies each one (its dcgm-exporter labels, read from NVML)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceIdentity:
    """What labels a GPU: dcgm-exporter's gpu, UUID, pci_bus_id, device and modelName."""

    index: int
    uuid: str
    pci_bus_id: str
    device: str  # "nvidia<minor>"
    model: str
    mig_uuids: tuple[str, ...] = ()  # MIG devices carved from this GPU, for pod attribution


class DeviceFilter:
    """Which GPUs to export: NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES syntax (indexes or UUIDs)."""

    def __init__(self, spec: str | None) -> None:
        text = (spec or "all").strip()
        self.everything = text.lower() == "all"
        self.nothing = text.lower() in ("none", "void", "")
        self.tokens = () if self.everything or self.nothing else tuple(t.strip() for t in text.split(",") if t.strip())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> DeviceFilter:
        return cls(environ.get("NVIDIA_VISIBLE_DEVICES") or environ.get("CUDA_VISIBLE_DEVICES"))

    @classmethod
    def from_file(cls, path: str) -> DeviceFilter:
        """The filter a worker container wrote for its sidecar (its NVIDIA_VISIBLE_DEVICES); raises while absent."""
        with open(path) as handle:
            return cls(handle.read().strip() or "none")

    def admits(self, index: int, uuid: str) -> bool:
        if self.everything:
            return True
        if self.nothing:
            return False
        # CUDA accepts a unique UUID prefix; an index is a plain number.
        return any(token == str(index) or (not token.isdigit() and uuid.startswith(token)) for token in self.tokens)


def text(value: Any) -> str:
    """An NVML string: older bindings return bytes, newer ones str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def identify(nvml: Any, handle: Any, index: int, uuid: str) -> DeviceIdentity:
    """The labels of the GPU at `index`; raises `nvml.NVMLError` when it does not answer."""
    return DeviceIdentity(
        index=index,
        uuid=uuid,
        pci_bus_id=text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        device=f"nvidia{_minor(nvml, handle, index)}",
        model=text(nvml.nvmlDeviceGetName(handle)),
        mig_uuids=_mig_uuids(nvml, handle),
    )


def _mig_uuids(nvml: Any, handle: Any) -> tuple[str, ...]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        if current != 1:
            return ()
        uuids = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                uuids.append(text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))))
            except nvml.NVMLError:
                continue  # an empty slot
        return tuple(uuids)
    except nvml.NVMLError:
        return ()


def _minor(nvml: Any, handle: Any, index: int) -> int:
    try:
        return int(nvml.nvmlDeviceGetMinorNumber(handle))
    except nvml.NVMLError:
        return index
