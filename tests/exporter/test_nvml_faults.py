"""NVML faults by kind, injected at the fake's boundary: a field, a GPU, the whole library.

Each kind has its own right answer: an unsupported field is omitted and the GPU stays up; a
lost or unreachable GPU is down while the others stay up; a library or driver that is gone
takes NVML down (every GPU down, `nvml_up` 0), and the session is shut down and started again
with backoff until the driver answers.
"""

from __future__ import annotations

import pytest

from contract import names
from exporter.nvml import NvmlReader

from .fakenvml import DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH, UNINITIALIZED, UNKNOWN, FakeGpu, FakeNvml
from .test_reader import H100, SECOND, reader_for


def two_gpus() -> tuple[NvmlReader, FakeNvml, FakeGpu, FakeGpu, object]:
    first, second = FakeGpu(H100), FakeGpu(SECOND, minor=1, bus_id="00000000:02:00.0")
    reader, nvml, clock = reader_for(first, second)
    assert reader.collect().nvml_up
    return reader, nvml, first, second, clock


def ups(snapshot) -> list[bool]:
    return [reading.up for reading in snapshot.devices]


def test_a_field_not_supported_is_omitted_while_the_gpu_and_nvml_stay_up():
    reader, nvml, first, _, clock = two_gpus()
    first.unsupported.add("nvmlDeviceGetPowerUsage")
    clock.now += 1
    snapshot = reader.collect()
    assert snapshot.nvml_up and ups(snapshot) == [True, True]
    assert names.POWER_USAGE not in snapshot.devices[0].values and names.POWER_USAGE in snapshot.devices[1].values
    assert nvml.init_calls == 1 and reader.errors == {}


@pytest.mark.parametrize("how", ["lost", "every call unknown"])
def test_one_gpu_failing_is_down_while_the_others_and_nvml_stay_up(how):
    reader, nvml, _, second, clock = two_gpus()
    if how == "lost":
        second.lost = True
    else:
        second.errors = {name: UNKNOWN for name in nvml.calls}
    snapshot = reader.collect()
    assert snapshot.nvml_up and ups(snapshot) == [True, False]
    assert snapshot.devices[0].values[names.GPU_TEMP] == 41 and snapshot.devices[1].values == {}
    clock.now += 1
    reader.collect()  # after the backoff, NVML is started afresh for the failing GPU
    assert nvml.init_calls == 2
    second.lost, second.errors = False, {}
    clock.now += 2
    assert ups(reader.collect()) == [True, True]


def test_unknown_on_a_single_call_is_that_values_error_not_the_gpus():
    reader, nvml, first, _, clock = two_gpus()
    first.errors = {"nvmlDeviceGetPowerUsage": UNKNOWN}
    snapshot = reader.collect()
    assert snapshot.nvml_up and ups(snapshot) == [True, True]
    assert names.POWER_USAGE not in snapshot.devices[0].values
    assert reader.errors == {("0", "power"): 1} and nvml.init_calls == 1


@pytest.mark.parametrize("code", [UNINITIALIZED, DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH])
def test_an_error_that_means_the_library_is_gone_takes_nvml_down_even_on_one_call(code):
    reader, nvml, first, _, clock = two_gpus()
    first.errors = {"nvmlDeviceGetTemperature": code}
    snapshot = reader.collect()
    assert not snapshot.nvml_up and ups(snapshot) == [False, False]
    assert not nvml.initialized  # shut down, to be started afresh
    first.errors = {}
    clock.now += 1
    assert reader.collect().nvml_up and nvml.init_calls == 2


def test_the_issue_case_unknown_on_every_call_then_driver_not_loaded_then_recovery(caplog):
    """Healthy; every device call answers UNKNOWN (999); then the driver is not loaded (9); then it returns."""
    gpu = FakeGpu(H100)
    reader, nvml, clock = reader_for(gpu)
    assert reader.collect().nvml_up

    nvml.device_error = UNKNOWN
    broken = reader.collect()
    assert not broken.nvml_up and ups(broken) == [False]
    assert "none of the GPUs" in broken.error and "Unknown Error 999" in broken.error
    assert not nvml.initialized and nvml.init_calls == 1

    clock.now += 1  # backoff 1 s: a new session, which fails the same way
    assert not reader.collect().nvml_up and nvml.init_calls == 2

    nvml.device_error = nvml.init_error = DRIVER_NOT_LOADED
    for _ in range(6):  # 3 s in half-second periods: only the tries the backoff allows (after 2 s)
        clock.now += 0.5
        snapshot = reader.collect()
    assert not snapshot.nvml_up and ups(snapshot) == [False] and "Driver Not Loaded" in snapshot.error
    assert nvml.init_calls == 3

    nvml.device_error = nvml.init_error = None  # the driver is back
    clock.now += 4
    back = reader.collect()
    assert back.nvml_up and ups(back) == [True] and back.error is None
    assert back.devices[0].values[names.GPU_TEMP] == 41
    assert reader._backoff_s == reader.backoff_initial_s  # a later fault starts from 1 s again


def test_every_gpu_lost_is_gpus_down_but_nvml_up():
    gpu = FakeGpu(H100)
    reader, nvml, clock = reader_for(gpu)
    reader.collect()
    gpu.lost = True  # NVML names the device's fault: the library itself answers
    snapshot = reader.collect()
    assert snapshot.nvml_up and ups(snapshot) == [False]
    # After the re-init (the sidecar's one GPU is skipped at enumeration), NVML still answers:
    # a lost GPU is the GPU's fault, not the library's.
    for _ in range(3):
        clock.now += 61
        snapshot = reader.collect()
        assert snapshot.nvml_up and ups(snapshot) == [False]


def test_served_gauges_follow_a_broken_then_returning_driver(start_exporter):
    running = start_exporter()
    assert running.value(names.EXPORTER_NVML_UP) == 1 and running.value(names.EXPORTER_GPU_UP, UUID=H100) == 1
    assert running.value(names.EXPORTER_SNAPSHOT_STALE) == 0

    running.nvml.device_error = UNKNOWN
    running.wait_for(lambda: running.value(names.EXPORTER_NVML_UP) == 0)
    assert running.value(names.EXPORTER_GPU_UP, UUID=H100) == 0
    assert running.value(names.EXPORTER_SNAPSHOT_STALE) == 1
    assert running.value(names.GPU_TEMP) is None

    running.nvml.device_error = running.nvml.init_error = DRIVER_NOT_LOADED
    inits = running.nvml.init_calls
    running.wait_for(lambda: running.nvml.init_calls > inits)  # re-initialisation is tried
    assert running.value(names.EXPORTER_NVML_UP) == 0

    running.nvml.device_error = running.nvml.init_error = None
    running.wait_for(lambda: running.value(names.EXPORTER_NVML_UP) == 1, timeout_s=15)
    running.wait_for(lambda: running.value(names.EXPORTER_GPU_UP, UUID=H100) == 1)
    assert running.value(names.EXPORTER_SNAPSHOT_STALE) == 0 and running.value(names.GPU_TEMP) == 41


def test_not_supported_stays_a_field_fault_at_init_too():
    gpu = FakeGpu(H100, unsupported={"nvmlDeviceGetMinorNumber", "nvmlDeviceGetMigMode"})
    reader, _, _ = reader_for(gpu)
    snapshot = reader.collect()
    assert snapshot.nvml_up and ups(snapshot) == [True] and snapshot.devices[0].identity.device == "nvidia0"
