"""A fake `pynvml` module: scripted GPUs behind the same functions, constants and errors.

Only the boundary is faked. Each device function goes through `FakeNvml._call`, which
enforces the library's state (initialised, lost GPUs, unsupported calls, injected errors,
hangs) the way NVML reports them: an `NVMLError` carrying NVML's return code.
`tests/exporter/test_fake_boundary.py` checks these functions against the real pynvml's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml as real

NOT_SUPPORTED, NOT_FOUND, TIMEOUT, LIBRARY_NOT_FOUND, GPU_IS_LOST, UNINITIALIZED, UNKNOWN = 3, 6, 10, 12, 15, 1, 999
DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH = 9, 18


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value

    def __str__(self) -> str:
        return {NOT_SUPPORTED: "Not Supported", GPU_IS_LOST: "GPU is lost", LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
                TIMEOUT: "Timeout", NOT_FOUND: "Not Found", UNINITIALIZED: "Uninitialized",
                DRIVER_NOT_LOADED: "Driver Not Loaded", LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch"}.get(self.value, f"Unknown Error {self.value}")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    bus_id: str = "00000000:01:00.0"
    minor: int = 0
    sm_clock: int = 1980
    mem_clock: int = 2619
    temperature: int = 41
    memory_temperature: int = 38
    power_mw: int = 118_000
    power_limit_mw: int = 700_000
    energy_mj: int = 5_000_000
    pcie_replay: int = 0
    utilization: int = 0  # the instant reading
    memory_utilization: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (timestamp µs, percent), GPU samples
    encoder: int = 0
    decoder: int = 0
    total_bytes: int = 80 * 1024**3
    used_bytes: int = 2 * 1024**3
    reserved_bytes: int = 512 * 1024**2
    ecc: dict[tuple[int, int], int] = field(default_factory=lambda: {(0, 0): 0, (1, 0): 0, (0, 1): 3, (1, 1): 0})
    clock_events: int = 0
    remapped_rows: tuple[int, int, int, int] = (2, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    xids: list[int] = field(default_factory=list)  # events waiting to be read
    gpm: dict[int, float] | None = field(default_factory=lambda: {2: 40.0, 5: 35.0, 10: 12.5})  # None: no GPM
    processes: list[tuple[int, int]] = field(default_factory=list)
    mig: list[str] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)  # function names answering NOT_SUPPORTED
    errors: dict[str, int] = field(default_factory=dict)  # function name -> NVML code to raise
    lost: bool = False


class FakeNvml:
    """Stands in for the pynvml module; pass it where the exporter takes `nvml`."""

    NVMLError = NVMLError
    nvmlMemory_v2 = real.nvmlMemory_v2
    c_nvmlGpmMetricsGet_t = real.c_nvmlGpmMetricsGet_t
    NVML_GPM_METRICS_GET_VERSION = real.NVML_GPM_METRICS_GET_VERSION

    def __init__(self, gpus: list[FakeGpu], driver: str = "580.159.04", library_present: bool = True) -> None:
        self.gpus = gpus
        self.driver = driver
        self.library_present = library_present
        # Library-wide faults: every device call (events included) answers `device_error`, and
        # nvmlInit answers `init_error`; None is healthy. A driver that goes away sets both.
        self.device_error: int | None = None
        self.init_error: int | None = None
        self.initialized = False
        self.init_calls = 0
        self.calls: dict[str, int] = {}
        self.hangs: dict[str, threading.Event] = {}  # function name -> released when set
        self.hung = threading.Event()  # set while a call is blocked in a hang

    # -- library ----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if not self.library_present:
            raise NVMLError(LIBRARY_NOT_FOUND)
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        if self.device_error is not None:
            raise NVMLError(self.device_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._require_init()
        return self.gpus[index]

    def _require_init(self) -> None:
        if not self.initialized:
            raise NVMLError(UNINITIALIZED)

    def _call(self, name: str, gpu: FakeGpu) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self._require_init()
        if name in self.hangs:
            self.hung.set()
            self.hangs[name].wait(30)
        if self.device_error is not None:
            raise NVMLError(self.device_error)
        if gpu.lost:
            raise NVMLError(GPU_IS_LOST)
        if name in gpu.unsupported:
            raise NVMLError(NOT_SUPPORTED)
        if name in gpu.errors:
            raise NVMLError(gpu.errors[name])

    # -- identity ---------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle) -> str:
        if isinstance(handle, str):  # a MIG handle is its UUID here
            return handle
        self._call("nvmlDeviceGetUUID", handle)
        return handle.uuid

    def nvmlDeviceGetPciInfo(self, handle):
        self._call("nvmlDeviceGetPciInfo", handle)
        return SimpleNamespace(busId=handle.bus_id.encode())

    def nvmlDeviceGetName(self, handle) -> str:
        self._call("nvmlDeviceGetName", handle)
        return handle.name

    def nvmlDeviceGetMinorNumber(self, handle) -> int:
        self._call("nvmlDeviceGetMinorNumber", handle)
        return handle.minor

    def nvmlDeviceGetMigMode(self, device):
        self._call("nvmlDeviceGetMigMode", device)
        return (1 if device.mig else 0, 1 if device.mig else 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, device) -> int:
        self._call("nvmlDeviceGetMaxMigDeviceCount", device)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        self._call("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if index >= len(device.mig):
            raise NVMLError(NOT_FOUND)
        return device.mig[index]

    # -- readings ---------------------------------------------------------------------------

    def nvmlDeviceGetClockInfo(self, handle, type):  # noqa: A002 - pynvml's parameter name
        self._call("nvmlDeviceGetClockInfo", handle)
        return handle.sm_clock if type == 1 else handle.mem_clock

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self._call("nvmlDeviceGetTemperature", handle)
        return handle.temperature

    def nvmlDeviceGetFieldValues(self, handle, fieldIds):  # noqa: N803 - pynvml's parameter name
        self._call("nvmlDeviceGetFieldValues", handle)
        return [SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=handle.memory_temperature))
                for _ in fieldIds]

    def nvmlDeviceGetPowerUsage(self, handle):
        self._call("nvmlDeviceGetPowerUsage", handle)
        return handle.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        self._call("nvmlDeviceGetEnforcedPowerLimit", handle)
        return handle.power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._call("nvmlDeviceGetTotalEnergyConsumption", handle)
        return handle.energy_mj

    def nvmlDeviceGetPcieReplayCounter(self, handle):
        self._call("nvmlDeviceGetPcieReplayCounter", handle)
        return handle.pcie_replay

    def nvmlDeviceGetSamples(self, device, sampling_type, timeStamp):  # noqa: N803
        self._call("nvmlDeviceGetSamples", device)
        series = device.samples if sampling_type == 1 else []
        newer = [SimpleNamespace(timeStamp=ts, sampleValue=SimpleNamespace(uiVal=value))
                 for ts, value in series if ts > timeStamp]
        if not newer:
            raise NVMLError(NOT_FOUND)
        return (1, newer)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._call("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=handle.utilization, memory=handle.memory_utilization)

    def nvmlDeviceGetEncoderUtilization(self, handle):
        self._call("nvmlDeviceGetEncoderUtilization", handle)
        return [handle.encoder, 167000]

    def nvmlDeviceGetDecoderUtilization(self, handle):
        self._call("nvmlDeviceGetDecoderUtilization", handle)
        return [handle.decoder, 167000]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self._call("nvmlDeviceGetMemoryInfo", handle)
        free = handle.total_bytes - handle.used_bytes - (handle.reserved_bytes if version else 0)
        memory = SimpleNamespace(total=handle.total_bytes, free=free, used=handle.used_bytes)
        if version:
            memory.reserved = handle.reserved_bytes
        return memory

    def nvmlDeviceGetTotalEccErrors(self, handle, errorType, counterType):  # noqa: N803
        self._call("nvmlDeviceGetTotalEccErrors", handle)
        return handle.ecc[(errorType, counterType)]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self._call("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return handle.clock_events

    def nvmlDeviceGetRemappedRows(self, device):
        self._call("nvmlDeviceGetRemappedRows", device)
        return device.remapped_rows

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._call("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]

    # -- events -----------------------------------------------------------------------------

    def nvmlEventSetCreate(self):
        self._require_init()
        return SimpleNamespace(devices=[])

    def nvmlDeviceRegisterEvents(self, handle, eventTypes, eventSet):  # noqa: N803
        self._call("nvmlDeviceRegisterEvents", handle)
        eventSet.devices.append(handle)

    def nvmlEventSetWait_v2(self, eventSet, timeoutms):
        self._require_init()
        if self.device_error is not None:
            raise NVMLError(self.device_error)
        for gpu in eventSet.devices:
            if gpu.xids:
                return SimpleNamespace(device=gpu, eventType=8, eventData=gpu.xids.pop(0))
        raise NVMLError(TIMEOUT)

    # -- GPM --------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, device):
        self._call("nvmlGpmQueryDeviceSupport", device)
        return SimpleNamespace(version=1, isSupportedDevice=int(device.gpm is not None))

    def nvmlGpmSampleAlloc(self):
        self._require_init()
        return real.c_nvmlGpmSample_t()

    def nvmlGpmSampleGet(self, device, gpmSample):  # noqa: N803
        self._call("nvmlGpmSampleGet", device)
        self._gpm_device = device
        return gpmSample

    def nvmlGpmSampleFree(self, gpmSample):  # noqa: N803
        return None

    def nvmlGpmMetricsGet(self, metricsGet):  # noqa: N803
        self._require_init()
        device: Any = self._gpm_device
        for slot in range(metricsGet.numMetrics):
            metric = metricsGet.metrics[slot]
            metric.nvmlReturn = 0
            metric.value = device.gpm[metric.metricId]
        return metricsGet
