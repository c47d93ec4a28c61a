"""Reads one GPU's dcgm-exporter fields through NVML: one function per NVML call, values in dcgm's names and units.

Each read returns {metric name: value}. A read NVML does not support on a device is
remembered in the device's state and never tried again (the value is omitted, not zero); any
other NVML error is counted by GPU and call and the value omitted. Three faults end the read
for the session (`exporter/nvml.py`) to handle: a lost GPU raises `DeviceLost`, a GPU whose
every read failed raises `DeviceUnreachable`, and an error that means the library or driver is
gone raises `LibraryGone`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract import names

from .devices import DeviceIdentity
from .snapshot import DeviceReading, ProcessMemory

# pynvml's return codes and constants, by value (tests/exporter/test_fake_boundary.py checks them).
NVML_SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_NOT_SUPPORTED = 3
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_UNKNOWN = 999
LOST_ERRORS = frozenset({ERROR_GPU_IS_LOST, ERROR_RESET_REQUIRED})
UNSUPPORTED_ERRORS = frozenset({ERROR_NOT_SUPPORTED, ERROR_FUNCTION_NOT_FOUND})
# Codes no single device explains: the session is gone (a driver unloaded or upgraded under us,
# the library shut down). Only a new nvmlInit can help. UNKNOWN is not among them: on one call
# it is that call's error; when it is every call of every GPU, `NvmlReader` reaches the same end.
LIBRARY_ERRORS = frozenset({ERROR_UNINITIALIZED, ERROR_DRIVER_NOT_LOADED, ERROR_LIBRARY_NOT_FOUND,
                            ERROR_LIB_RM_VERSION_MISMATCH})

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


class DeviceUnreachable(Exception):
    """Every read of the GPU failed in this collection (none was merely unsupported or answered)."""


class LibraryGone(Exception):
    """NVML answered with an error that means the library or the driver is gone (`LIBRARY_ERRORS`)."""


@dataclass
class DeviceState:
    """One GPU within an NVML session: its handle, the calls it does not support, and what reads carry over."""

    handle: Any
    identity: DeviceIdentity
    unsupported: set[str] = field(default_factory=set)
    last_sample_us: dict[int, int] = field(default_factory=dict)
    # GPM: two samples allocated once, the last one taken and the one the next collection fills,
    # and the metrics request, whose metric ids are set once.
    gpm_previous: Any = None
    gpm_spare: Any = None
    gpm_request: Any = None
    xid_events: Any = None
    new_xids: list[int] = field(default_factory=list)  # drained from the event set, not yet recorded
    # NVML's current utilization, read at most once per collection: both utilization reads fall
    # back to it when no sample arrived.
    rates: Any = None


def start_device(nvml: Any, state: DeviceState) -> None:
    """Registers for XID events and takes the first GPM sample, or marks either unsupported."""
    try:
        events = nvml.nvmlEventSetCreate()
        nvml.nvmlDeviceRegisterEvents(state.handle, EVENT_TYPE_XID_CRITICAL_ERROR, events)
        state.xid_events = events
    except nvml.NVMLError:
        state.unsupported.add("xid")
    try:
        if nvml.nvmlGpmQueryDeviceSupport(state.handle).isSupportedDevice:
            state.gpm_previous = nvml.nvmlGpmSampleAlloc()
            state.gpm_spare = nvml.nvmlGpmSampleAlloc()
            nvml.nvmlGpmSampleGet(state.handle, state.gpm_previous)
            request = nvml.c_nvmlGpmMetricsGet_t()
            request.version = nvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(_GPM_FIELDS)
            for slot, (metric, _name) in enumerate(_GPM_FIELDS):
                request.metrics[slot].metricId = metric
            state.gpm_request = request
        else:
            state.unsupported.add("gpm")
    except nvml.NVMLError:
        state.unsupported.add("gpm")


def stop_device(nvml: Any, state: DeviceState) -> None:
    """Frees what `start_device` allocated in NVML (the GPM samples); called before the session shuts down."""
    for sample in (state.gpm_previous, state.gpm_spare):
        if sample is not None:
            try:
                nvml.nvmlGpmSampleFree(sample)
            except nvml.NVMLError:
                pass  # the session is going away: nothing more to do for it
    state.gpm_previous = state.gpm_spare = None


def read_device(nvml: Any, state: DeviceState, errors: Counter[tuple[str, str]], per_process: bool) -> DeviceReading:
    """Every supported field of one GPU; NVML errors other than unsupported are counted in `errors` by (gpu, call)."""
    gpu = str(state.identity.index)
    values: dict[str, float] = {}
    answered, failure = False, None
    state.rates = None
    for call, read in READS:
        if call in state.unsupported:
            continue
        try:
            read_values = read(nvml, state)
            values.update(read_values)
            answered = answered or bool(read_values)  # an empty XID drain says nothing of the GPU
        except nvml.NVMLError as error:
            if _note_error(error, state, errors, gpu, call):
                failure = error
    if failure is not None and not answered:
        raise DeviceUnreachable(str(failure))
    processes: tuple[ProcessMemory, ...] = ()
    if per_process and "processes" not in state.unsupported:
        try:
            processes = tuple(
                ProcessMemory(int(p.pid), int(p.usedGpuMemory))
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(state.handle)
                if p.usedGpuMemory is not None
            )
        except nvml.NVMLError as error:
            _note_error(error, state, errors, gpu, "processes")
    return DeviceReading(state.identity, up=True, values=values, processes=processes)


def _note_error(error: Exception, state: DeviceState, errors: Counter[tuple[str, str]], gpu: str, call: str) -> bool:
    """Records one failed read; True when it counts as a failure (not merely unsupported)."""
    code = getattr(error, "value", None)
    if code in LOST_ERRORS:
        raise DeviceLost(str(error)) from None
    if code in UNSUPPORTED_ERRORS:
        state.unsupported.add(call)
        return False
    errors[(gpu, call)] += 1
    if code in LIBRARY_ERRORS:
        raise LibraryGone(str(error)) from None
    return True


def _clocks(nvml, state):
    return {
        names.SM_CLOCK: nvml.nvmlDeviceGetClockInfo(state.handle, CLOCK_SM),
        names.MEM_CLOCK: nvml.nvmlDeviceGetClockInfo(state.handle, CLOCK_MEM),
    }


def _gpu_temperature(nvml, state):
    return {names.GPU_TEMP: nvml.nvmlDeviceGetTemperature(state.handle, TEMPERATURE_GPU)}


def _memory_temperature(nvml, state):
    [field_value] = nvml.nvmlDeviceGetFieldValues(state.handle, [FI_DEV_MEMORY_TEMP])
    if field_value.nvmlReturn != NVML_SUCCESS:
        raise nvml.NVMLError(field_value.nvmlReturn)
    return {names.MEMORY_TEMP: _field_number(field_value)}


# nvmlValue_t is a union; valueType says which member holds the number.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field_number(field_value) -> float:
    return float(getattr(field_value.value, _VALUE_MEMBERS.get(field_value.valueType, "uiVal")))


def _power(nvml, state):
    return {names.POWER_USAGE: nvml.nvmlDeviceGetPowerUsage(state.handle) / 1000}


def _power_limit(nvml, state):
    return {names.POWER_MGMT_LIMIT: nvml.nvmlDeviceGetEnforcedPowerLimit(state.handle) / 1000}


def _energy(nvml, state):
    return {names.TOTAL_ENERGY_CONSUMPTION: nvml.nvmlDeviceGetTotalEnergyConsumption(state.handle)}


def _pcie_replay(nvml, state):
    return {names.PCIE_REPLAY_COUNTER: nvml.nvmlDeviceGetPcieReplayCounter(state.handle)}


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


def _current_rates(nvml, state):
    """NVML's current utilization (GPU and memory), asked once per collection."""
    if state.rates is None:
        state.rates = nvml.nvmlDeviceGetUtilizationRates(state.handle)
    return state.rates


def _gpu_utilization(nvml, state):
    mean = _sampled_mean(nvml, state, GPU_UTILIZATION_SAMPLES)
    if mean is None:  # no new sample in the period: NVML's own current reading
        mean = _current_rates(nvml, state).gpu
    return {names.GPU_UTIL: mean}


def _memory_copy_utilization(nvml, state):
    mean = _sampled_mean(nvml, state, MEMORY_UTILIZATION_SAMPLES)
    if mean is None:
        mean = _current_rates(nvml, state).memory
    return {names.MEM_COPY_UTIL: mean}


def _encoder(nvml, state):
    return {names.ENC_UTIL: nvml.nvmlDeviceGetEncoderUtilization(state.handle)[0]}


def _decoder(nvml, state):
    return {names.DEC_UTIL: nvml.nvmlDeviceGetDecoderUtilization(state.handle)[0]}


def _framebuffer(nvml, state):
    if "framebuffer_v2" not in state.unsupported:
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(state.handle, version=nvml.nvmlMemory_v2)
            return {names.FB_FREE: memory.free / MIB, names.FB_USED: memory.used / MIB,
                    names.FB_RESERVED: memory.reserved / MIB}
        except nvml.NVMLError as error:
            if getattr(error, "value", None) not in UNSUPPORTED_ERRORS:
                raise
            state.unsupported.add("framebuffer_v2")  # an older driver: v1 from now on, as for any unsupported call
    memory = nvml.nvmlDeviceGetMemoryInfo(state.handle)  # v1: no reserved figure
    return {names.FB_FREE: memory.free / MIB, names.FB_USED: memory.used / MIB}


def _ecc(nvml, state):
    read = nvml.nvmlDeviceGetTotalEccErrors
    return {
        names.ECC_SBE_VOL_TOTAL: read(state.handle, ECC_CORRECTED, ECC_VOLATILE),
        names.ECC_DBE_VOL_TOTAL: read(state.handle, ECC_UNCORRECTED, ECC_VOLATILE),
        names.ECC_SBE_AGG_TOTAL: read(state.handle, ECC_CORRECTED, ECC_AGGREGATE),
        names.ECC_DBE_AGG_TOTAL: read(state.handle, ECC_UNCORRECTED, ECC_AGGREGATE),
    }


def _remapped_rows(nvml, state):
    correctable, uncorrectable, _pending, failure = nvml.nvmlDeviceGetRemappedRows(state.handle)
    return {
        names.CORRECTABLE_REMAPPED_ROWS: correctable,
        names.UNCORRECTABLE_REMAPPED_ROWS: uncorrectable,
        names.ROW_REMAP_FAILURE: failure,
    }


def _clock_events(nvml, state):
    return {names.CLOCKS_EVENT_REASONS: nvml.nvmlDeviceGetCurrentClocksEventReasons(state.handle)}


def _xid(nvml, state):
    # Drain the device's event set without waiting. The events are left in the state for the
    # session, which keeps them across NVML re-inits and owns the gauge's way back to 0.
    while True:
        try:
            event = nvml.nvmlEventSetWait_v2(state.xid_events, 0)
        except nvml.NVMLError as error:
            if getattr(error, "value", None) == ERROR_TIMEOUT:
                break
            raise
        state.new_xids.append(int(event.eventData))
    return {}


# GPM metric -> the DCGM profiling field it stands for, in the order they are requested.
_GPM_FIELDS = (
    (GPM_SM_UTIL, names.PROF_SM_ACTIVE),
    (GPM_ANY_TENSOR_UTIL, names.PROF_PIPE_TENSOR_ACTIVE),
    (GPM_DRAM_BW_UTIL, names.PROF_DRAM_ACTIVE),
)


def _gpm(nvml, state):
    # The spare sample takes this collection's reading; once compared with the previous one,
    # the two swap roles. No allocation per collection, and none leaked when a call fails.
    current = nvml.nvmlGpmSampleGet(state.handle, state.gpm_spare)
    request = state.gpm_request
    request.sample1 = state.gpm_previous
    request.sample2 = current
    nvml.nvmlGpmMetricsGet(request)
    state.gpm_previous, state.gpm_spare = current, state.gpm_previous
    values = {}
    for slot, (_metric, name) in enumerate(_GPM_FIELDS):
        metric = request.metrics[slot]
        if metric.nvmlReturn == NVML_SUCCESS:
            values[name] = metric.value / 100  # NVML gives percent; DCGM's profiling fields are ratios
    return values


# (call, read): `call` names the read in gpu_exporter_nvml_errors_total and in a device's unsupported set.
READS: tuple[tuple[str, Callable[[Any, DeviceState], dict[str, float]]], ...] = (
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
