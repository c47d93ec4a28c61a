"""Reads GPUs through NVML (the `pynvml` module) into plain, immutable snapshots.

This is the exporter's only NVML code. Each metric is one read; a read NVML does not support
on a device is remembered and never tried again (the value is omitted, not zero); any other
NVML error is counted by GPU and call and the value omitted. A GPU that reports itself lost or
in need of reset is marked down, its values dropped, and NVML is re-initialised with backoff
until it answers again. A missing library or driver leaves `nvml_up` false and is retried with
backoff too: the exporter never crashes for NVML's sake.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("exporter.nvml")

NVML_SUCCESS = 0
ERROR_NOT_SUPPORTED = 3
ERROR_NOT_FOUND = 6
ERROR_TIMEOUT = 10
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_UNINITIALIZED = 1
LOST_ERRORS = frozenset({ERROR_GPU_IS_LOST, ERROR_RESET_REQUIRED})
UNSUPPORTED_ERRORS = frozenset({ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND})

GPU_UTILIZATION_SAMPLES = 1
MEMORY_UTILIZATION_SAMPLES = 2
CLOCK_SM, CLOCK_MEM = 1, 2
TEMPERATURE_GPU = 0
FI_DEV_MEMORY_TEMP = 82
ECC_CORRECTED, ECC_UNCORRECTED = 0, 1
ECC_VOLATILE, ECC_AGGREGATE = 0, 1
EVENT_TYPE_XID_CRITICAL_ERROR = 0x0000000000000008
GPM_SM_UTIL, GPM_ANY_TENSOR_UTIL, GPM_DRAM_BW_UTIL = 2, 5, 10
MIB = 1024 * 1024


class DeviceLost(Exception):
    """NVML says the GPU is lost or needs a reset."""


@dataclass(frozen=True)
class DeviceIdentity:
    """What labels a GPU: dcgm-exporter's gpu, UUID, pci_bus_id, device and modelName."""

    index: int
    uuid: str
    pci_bus_id: str
    device: str  # "nvidia<minor>"
    model: str
    mig_uuids: tuple[str, ...] = ()  # MIG devices carved from this GPU, for pod attribution


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    used_bytes: int


@dataclass(frozen=True)
class DeviceReading:
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _DeviceState:
    handle: Any
    identity: DeviceIdentity
    unsupported: set[str] = field(default_factory=set)
    last_sample_us: dict[int, int] = field(default_factory=dict)
    gpm_previous: Any = None
    xid_events: Any = None
    last_xid: int = 0


class NvmlReader:
    """Owns the NVML session: init with backoff, device discovery, and one `collect()` per period."""

    def __init__(
        self,
        nvml: Any = None,
        visible: DeviceFilter | Callable[[], DeviceFilter] | None = None,
        per_process: bool = False,
        hostname: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        self.nvml = nvml
        # A callable is asked at every NVML init: a sidecar learns its worker's GPUs from a file
        # the worker writes, which may appear after the exporter starts.
        self._visible = visible or DeviceFilter("all")
        self.per_process = per_process
        self.hostname = hostname or socket.gethostname()
        self.clock = clock
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.errors: Counter[tuple[str, str]] = Counter()  # (gpu, call) -> NVML errors
        self._initialized = False
        self._driver_version = ""
        self._devices: list[_DeviceState] = []
        self._known: dict[str, DeviceIdentity] = {}  # every GPU seen, by UUID, to report it down
        self._down: set[str] = set()
        self._retry_at = 0.0
        self._backoff_s = backoff_initial_s
        self._last_error: str | None = None

    # -- session ----------------------------------------------------------------------------

    def collect(self) -> Snapshot:
        started = self.clock()
        taken_at = time.time()
        if self._down and started >= self._retry_at:
            self._shutdown()  # a lost GPU: start NVML afresh, as the driver may have recovered it
        if not self._initialized:
            if started < self._retry_at:
                return self._unavailable(taken_at, started)
            try:
                self._initialize()
            except self.nvml.NVMLError as error:
                self._note_failure(f"NVML unavailable: {error}")
                return self._unavailable(taken_at, started)
            except OSError as error:  # the visible-devices file is not there yet
                self._note_failure(f"GPUs to export not known yet: {error}")
                return self._unavailable(taken_at, started)
        readings = []
        lost = False
        for state in self._devices:
            try:
                readings.append(self._read(state))
                self._down.discard(state.identity.uuid)
            except DeviceLost as error:
                lost = True
                self._down.add(state.identity.uuid)
                self._note_failure(f"GPU {state.identity.index} ({state.identity.uuid}) lost: {error}")
                readings.append(DeviceReading(state.identity, up=False))
        present = {state.identity.uuid for state in self._devices}
        for uuid, identity in self._known.items():
            if uuid not in present:
                readings.append(DeviceReading(identity, up=False))
        if lost or any(uuid not in present for uuid in self._known):
            self._schedule_retry(started)
        elif not self._down:
            self._backoff_s = self.backoff_initial_s
            if self._last_error is not None:
                log.info("NVML and every GPU answer again")
                self._last_error = None
        readings.sort(key=lambda reading: reading.identity.index)
        return Snapshot(
            taken_at=taken_at, duration_s=self.clock() - started, nvml_up=True,
            driver_version=self._driver_version, hostname=self.hostname, devices=tuple(readings),
        )

    def _unavailable(self, taken_at: float, started: float) -> Snapshot:
        devices = tuple(DeviceReading(identity, up=False) for identity in self._known.values())
        return Snapshot(taken_at=taken_at, duration_s=self.clock() - started, nvml_up=False,
                        hostname=self.hostname, devices=devices, error=self._last_error)

    def _note_failure(self, message: str) -> None:
        # One log line per distinct problem, not one per collection.
        if message != self._last_error:
            log.error("%s; retrying with backoff", message)
            self._last_error = message
        self._schedule_retry(self.clock())

    def _schedule_retry(self, now: float) -> None:
        if now >= self._retry_at:
            self._retry_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)

    def _initialize(self) -> None:
        nvml = self.nvml
        visible = self._visible() if callable(self._visible) else self._visible
        nvml.nvmlInit()
        self._initialized = True
        try:
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
            devices = []
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                    if not visible.admits(index, uuid):
                        continue
                    identity = DeviceIdentity(
                        index=index,
                        uuid=uuid,
                        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                        device=f"nvidia{self._minor(handle, index)}",
                        model=_text(nvml.nvmlDeviceGetName(handle)),
                        mig_uuids=self._mig_uuids(handle),
                    )
                except nvml.NVMLError as error:
                    # One broken GPU must not hide the others; a known one is reported down.
                    log.debug("GPU %d does not answer at init: %s", index, error)
                    continue
                devices.append(_DeviceState(handle, identity))
                self._known[uuid] = identity
            self._devices = devices
            for state in devices:
                self._start_device(state)
        except nvml.NVMLError:
            self._shutdown()
            raise
        log.info("NVML %s: exporting %d GPUs", self._driver_version, len(self._devices))

    def _mig_uuids(self, handle: Any) -> tuple[str, ...]:
        nvml = self.nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            if current != 1:
                return ()
            uuids = []
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    uuids.append(_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))))
                except nvml.NVMLError:
                    continue  # an empty slot
            return tuple(uuids)
        except nvml.NVMLError:
            return ()

    def _minor(self, handle: Any, index: int) -> int:
        try:
            return int(self.nvml.nvmlDeviceGetMinorNumber(handle))
        except self.nvml.NVMLError:
            return index

    def _start_device(self, state: _DeviceState) -> None:
        nvml = self.nvml
        try:
            events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(state.handle, EVENT_TYPE_XID_CRITICAL_ERROR, events)
            state.xid_events = events
        except nvml.NVMLError:
            state.unsupported.add("xid")
        try:
            if nvml.nvmlGpmQueryDeviceSupport(state.handle).isSupportedDevice:
                state.gpm_previous = nvml.nvmlGpmSampleGet(state.handle, nvml.nvmlGpmSampleAlloc())
            else:
                state.unsupported.add("gpm")
        except nvml.NVMLError:
            state.unsupported.add("gpm")

    def _shutdown(self) -> None:
        if self._initialized:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
        self._initialized = False
        self._devices = []

    def close(self) -> None:
        self._shutdown()

    # -- one device -------------------------------------------------------------------------

    def _read(self, state: _DeviceState) -> DeviceReading:
        values: dict[str, float] = {}
        for call, read in _READS:
            if call in state.unsupported:
                continue
            try:
                values.update(read(self.nvml, state))
            except self.nvml.NVMLError as error:
                code = getattr(error, "value", None)
                if code in LOST_ERRORS:
                    raise DeviceLost(str(error)) from None
                if code in UNSUPPORTED_ERRORS:
                    state.unsupported.add(call)
                else:
                    self.errors[(str(state.identity.index), call)] += 1
        processes: tuple[ProcessMemory, ...] = ()
        if self.per_process and "processes" not in state.unsupported:
            try:
                processes = tuple(
                    ProcessMemory(int(p.pid), int(p.usedGpuMemory))
                    for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(state.handle)
                    if p.usedGpuMemory is not None
                )
            except self.nvml.NVMLError as error:
                if getattr(error, "value", None) in LOST_ERRORS:
                    raise DeviceLost(str(error)) from None
                if getattr(error, "value", None) in UNSUPPORTED_ERRORS:
                    state.unsupported.add("processes")
                else:
                    self.errors[(str(state.identity.index), "processes")] += 1
        return DeviceReading(state.identity, up=True, values=values, processes=processes)


# Each read returns {metric name: value}; names and units are dcgm-exporter's.

def _clocks(nvml, state):
    return {
        "DCGM_FI_DEV_SM_CLOCK": nvml.nvmlDeviceGetClockInfo(state.handle, CLOCK_SM),
        "DCGM_FI_DEV_MEM_CLOCK": nvml.nvmlDeviceGetClockInfo(state.handle, CLOCK_MEM),
    }


def _gpu_temperature(nvml, state):
    return {"DCGM_FI_DEV_GPU_TEMP": nvml.nvmlDeviceGetTemperature(state.handle, TEMPERATURE_GPU)}


def _memory_temperature(nvml, state):
    [field_value] = nvml.nvmlDeviceGetFieldValues(state.handle, [FI_DEV_MEMORY_TEMP])
    if field_value.nvmlReturn != NVML_SUCCESS:
        raise nvml.NVMLError(field_value.nvmlReturn)
    return {"DCGM_FI_DEV_MEMORY_TEMP": _field_number(field_value)}


def _field_number(field_value) -> float:
    # nvmlValue_t is a union; valueType says which member holds the number.
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(field_value.value, member.get(field_value.valueType, "uiVal")))


def _power(nvml, state):
    return {"DCGM_FI_DEV_POWER_USAGE": nvml.nvmlDeviceGetPowerUsage(state.handle) / 1000}


def _power_limit(nvml, state):
    return {"DCGM_FI_DEV_POWER_MGMT_LIMIT": nvml.nvmlDeviceGetEnforcedPowerLimit(state.handle) / 1000}


def _energy(nvml, state):
    return {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": nvml.nvmlDeviceGetTotalEnergyConsumption(state.handle)}


def _pcie_replay(nvml, state):
    return {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER": nvml.nvmlDeviceGetPcieReplayCounter(state.handle)}


def _sampled_mean(nvml, state, sampling_type: int) -> float | None:
    """Mean of NVML's utilization samples newer than the last collection; None when there are none."""
    try:
        _, samples = nvml.nvmlDeviceGetSamples(state.handle, sampling_type, state.last_sample_us.get(sampling_type, 0))
    except nvml.NVMLError as error:
        if getattr(error, "value", None) == ERROR_NOT_FOUND:  # no sample since the last collection
            return None
        raise
    if not samples:
        return None
    state.last_sample_us[sampling_type] = max(sample.timeStamp for sample in samples)
    return sum(sample.sampleValue.uiVal for sample in samples) / len(samples)


def _gpu_utilization(nvml, state):
    mean = _sampled_mean(nvml, state, GPU_UTILIZATION_SAMPLES)
    if mean is None:  # no new sample in the period: NVML's own current reading
        mean = nvml.nvmlDeviceGetUtilizationRates(state.handle).gpu
    return {"DCGM_FI_DEV_GPU_UTIL": mean}


def _memory_copy_utilization(nvml, state):
    mean = _sampled_mean(nvml, state, MEMORY_UTILIZATION_SAMPLES)
    if mean is None:
        mean = nvml.nvmlDeviceGetUtilizationRates(state.handle).memory
    return {"DCGM_FI_DEV_MEM_COPY_UTIL": mean}


def _encoder(nvml, state):
    return {"DCGM_FI_DEV_ENC_UTIL": nvml.nvmlDeviceGetEncoderUtilization(state.handle)[0]}


def _decoder(nvml, state):
    return {"DCGM_FI_DEV_DEC_UTIL": nvml.nvmlDeviceGetDecoderUtilization(state.handle)[0]}


def _framebuffer(nvml, state):
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(state.handle, version=nvml.nvmlMemory_v2)
        reserved = {"DCGM_FI_DEV_FB_RESERVED": memory.reserved / MIB}
    except nvml.NVMLError as error:
        if getattr(error, "value", None) not in UNSUPPORTED_ERRORS:
            raise
        memory = nvml.nvmlDeviceGetMemoryInfo(state.handle)  # v1: no reserved figure
        reserved = {}
    return {"DCGM_FI_DEV_FB_FREE": memory.free / MIB, "DCGM_FI_DEV_FB_USED": memory.used / MIB, **reserved}


def _ecc(nvml, state):
    read = nvml.nvmlDeviceGetTotalEccErrors
    return {
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": read(state.handle, ECC_CORRECTED, ECC_VOLATILE),
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": read(state.handle, ECC_UNCORRECTED, ECC_VOLATILE),
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": read(state.handle, ECC_CORRECTED, ECC_AGGREGATE),
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": read(state.handle, ECC_UNCORRECTED, ECC_AGGREGATE),
    }


def _remapped_rows(nvml, state):
    correctable, uncorrectable, _pending, failure = nvml.nvmlDeviceGetRemappedRows(state.handle)
    return {
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": correctable,
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": uncorrectable,
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": failure,
    }


def _clock_events(nvml, state):
    return {"DCGM_FI_DEV_CLOCKS_EVENT_REASONS": nvml.nvmlDeviceGetCurrentClocksEventReasons(state.handle)}


def _xid(nvml, state):
    # Drain the device's event set without waiting; the value is the last XID seen, 0 for none
    # (dcgm-exporter's semantics).
    while True:
        try:
            event = nvml.nvmlEventSetWait_v2(state.xid_events, 0)
        except nvml.NVMLError as error:
            if getattr(error, "value", None) == ERROR_TIMEOUT:
                break
            raise
        state.last_xid = int(event.eventData)
    return {"DCGM_FI_DEV_XID_ERRORS": state.last_xid}


def _gpm(nvml, state):
    current = nvml.nvmlGpmSampleGet(state.handle, nvml.nvmlGpmSampleAlloc())
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = nvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 3
    request.sample1 = state.gpm_previous
    request.sample2 = current
    for slot, metric in enumerate((GPM_SM_UTIL, GPM_ANY_TENSOR_UTIL, GPM_DRAM_BW_UTIL)):
        request.metrics[slot].metricId = metric
    nvml.nvmlGpmMetricsGet(request)
    previous, state.gpm_previous = state.gpm_previous, current
    try:
        nvml.nvmlGpmSampleFree(previous)
    except nvml.NVMLError:
        pass
    values = {}
    for slot, name in enumerate(("DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE")):
        metric = request.metrics[slot]
        if metric.nvmlReturn == NVML_SUCCESS:
            values[name] = metric.value / 100  # NVML gives percent; DCGM's profiling fields are ratios
    return values


_READS: tuple[tuple[str, Callable[[Any, _DeviceState], dict[str, float]]], ...] = (
    ("clocks", _clocks),
    ("temperature", _gpu_temperature),
    ("memory_temperature", _memory_temperature),
    ("power", _power),
    ("power_limit", _power_limit),
    ("energy", _energy),
    ("pcie_replay", _pcie_replay),
    ("utilization", _gpu_utilization),
    ("memory_copy_utilization", _memory_copy_utilization),
    ("encoder", _encoder),
    ("decoder", _decoder),
    ("framebuffer", _framebuffer),
    ("ecc", _ecc),
    ("remapped_rows", _remapped_rows),
    ("clock_events", _clock_events),
    ("xid", _xid),
    ("gpm", _gpm),
)
