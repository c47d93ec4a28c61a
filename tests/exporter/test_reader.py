"""NvmlReader against the fake NVML: values and units, samples, unsupported calls, faults."""

from __future__ import annotations

import logging

import pytest

from contract import names
from exporter.nvml import DeviceFilter, NvmlReader

from .fakenvml import FakeGpu, FakeNvml

H100 = "GPU-6a0f7ad8-5b8a-4c1b-9b3c-1f0e2d3c4b5a"
SECOND = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reader_for(*gpus: FakeGpu, **kwargs) -> tuple[NvmlReader, FakeNvml, Clock]:
    nvml = FakeNvml(list(gpus), library_present=kwargs.pop("library_present", True))
    clock = Clock()
    return NvmlReader(nvml, hostname="node-a", clock=clock, **kwargs), nvml, clock


def test_values_come_in_dcgm_names_and_units():
    gpu = FakeGpu(H100, samples=[(10, 20), (20, 40)], xids=[79])
    reader, _, _ = reader_for(gpu)
    snapshot = reader.collect()
    assert snapshot.nvml_up and snapshot.driver_version == "580.159.04" and snapshot.hostname == "node-a"
    [reading] = snapshot.devices
    assert reading.up
    assert reading.identity.uuid == H100 and reading.identity.device == "nvidia0"
    assert reading.identity.pci_bus_id == "00000000:01:00.0" and reading.identity.model == "NVIDIA H100 80GB HBM3"
    assert reading.values == {
        names.SM_CLOCK: 1980, names.MEM_CLOCK: 2619,
        names.GPU_TEMP: 41, names.MEMORY_TEMP: 38.0,
        names.POWER_USAGE: 118.0, names.POWER_MGMT_LIMIT: 700.0,
        names.TOTAL_ENERGY_CONSUMPTION: 5_000_000, names.PCIE_REPLAY_COUNTER: 0,
        names.GPU_UTIL: 30.0, names.MEM_COPY_UTIL: 0,
        names.ENC_UTIL: 0, names.DEC_UTIL: 0,
        names.FB_FREE: 80 * 1024 - 2048 - 512, names.FB_USED: 2048.0, names.FB_RESERVED: 512.0,
        names.ECC_SBE_VOL_TOTAL: 0, names.ECC_DBE_VOL_TOTAL: 0,
        names.ECC_SBE_AGG_TOTAL: 3, names.ECC_DBE_AGG_TOTAL: 0,
        names.CORRECTABLE_REMAPPED_ROWS: 2, names.UNCORRECTABLE_REMAPPED_ROWS: 0,
        names.ROW_REMAP_FAILURE: 0,
        names.CLOCKS_EVENT_REASONS: 0, names.XID_ERRORS: 79,
        names.PROF_SM_ACTIVE: 0.40, names.PROF_PIPE_TENSOR_ACTIVE: 0.35, names.PROF_DRAM_ACTIVE: 0.125,
    }


def test_utilization_is_the_mean_of_the_samples_since_the_last_collection():
    gpu = FakeGpu(H100, samples=[(10, 100), (20, 100)], utilization=55)
    reader, _, _ = reader_for(gpu)
    assert reader.collect().devices[0].values[names.GPU_UTIL] == 100
    gpu.samples += [(30, 0), (40, 20), (50, 40)]
    assert reader.collect().devices[0].values[names.GPU_UTIL] == 20  # only the three new ones
    # no sample since: NVML's own current reading, not a repeat of the old mean
    assert reader.collect().devices[0].values[names.GPU_UTIL] == 55


def test_an_unsupported_value_is_omitted_not_zeroed_and_never_asked_again():
    gpu = FakeGpu(H100, unsupported={"nvmlDeviceGetFieldValues", "nvmlDeviceGetEncoderUtilization"}, gpm=None)
    reader, nvml, _ = reader_for(gpu)
    for _ in range(3):
        values = reader.collect().devices[0].values
    assert names.MEMORY_TEMP not in values and names.ENC_UTIL not in values
    assert not {names.PROF_SM_ACTIVE, names.PROF_PIPE_TENSOR_ACTIVE, names.PROF_DRAM_ACTIVE} & set(values)
    assert values[names.GPU_TEMP] == 41
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 1 and nvml.calls["nvmlDeviceGetEncoderUtilization"] == 1
    assert reader.errors == {}


def test_reserved_memory_is_omitted_where_only_the_v1_memory_call_exists():
    class OldDriver(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle, version=None):
            if version:
                raise self.NVMLError(13)  # function not found
            return super().nvmlDeviceGetMemoryInfo(handle)

    reader = NvmlReader(OldDriver([FakeGpu(H100)]), hostname="n")
    values = reader.collect().devices[0].values
    assert values[names.FB_USED] == 2048 and names.FB_RESERVED not in values


def test_other_errors_are_counted_by_gpu_and_call_and_the_rest_still_served():
    gpu = FakeGpu(H100, errors={"nvmlDeviceGetPowerUsage": 999})
    reader, _, _ = reader_for(gpu)
    reader.collect()
    values = reader.collect().devices[0].values
    assert names.POWER_USAGE not in values and values[names.GPU_TEMP] == 41
    assert reader.errors == {("0", "power"): 2}


def test_a_lost_gpu_is_down_without_values_then_comes_back_after_reinit_with_backoff(caplog):
    healthy, flaky = FakeGpu(H100), FakeGpu(SECOND, minor=1, bus_id="00000000:02:00.0")
    reader, nvml, clock = reader_for(healthy, flaky)
    reader.collect()
    flaky.lost = True
    with caplog.at_level(logging.ERROR):
        first = reader.collect()
        clock.now += 0.5
        reader.collect()  # still within the backoff: no re-init yet
    assert [(r.identity.uuid, r.up, bool(r.values)) for r in first.devices] == [(H100, True, True), (SECOND, False, False)]
    assert nvml.init_calls == 1
    assert sum("lost" in message for message in caplog.messages) == 1  # one log line, not one per collection
    clock.now += 1.0
    still = reader.collect()  # backoff passed: NVML restarted, the GPU still lost
    assert nvml.init_calls == 2 and [r.up for r in still.devices] == [True, False]
    flaky.lost = False
    clock.now += 2.5
    back = reader.collect()
    assert nvml.init_calls == 3 and [r.up for r in back.devices] == [True, True]
    assert back.devices[1].values[names.GPU_TEMP] == 41


def test_a_gpu_that_vanishes_from_the_bus_stays_reported_down():
    first, second = FakeGpu(H100), FakeGpu(SECOND, minor=1)
    reader, nvml, clock = reader_for(first, second)
    reader.collect()
    second.lost = True
    reader.collect()
    nvml.gpus.remove(second)  # after the reset the driver no longer lists it
    clock.now += 1.5
    snapshot = reader.collect()
    assert [(r.identity.uuid, r.up) for r in snapshot.devices] == [(H100, True), (SECOND, False)]


def test_missing_nvml_leaves_the_exporter_up_and_retries_with_backoff(caplog):
    reader, nvml, clock = reader_for(FakeGpu(H100), library_present=False)
    with caplog.at_level(logging.ERROR):
        for _ in range(12):
            snapshot = reader.collect()
            clock.now += 0.5
    assert not snapshot.nvml_up and snapshot.devices == ()
    assert "NVML Shared Library Not Found" in snapshot.error
    assert nvml.init_calls == 3  # at 0 s, after 1 s, after 2 more: backoff, not every collection
    assert len([m for m in caplog.messages if "NVML unavailable" in m]) == 1
    nvml.library_present = True
    clock.now += 4
    assert reader.collect().nvml_up


def test_real_pynvml_without_a_driver_reports_nvml_down_without_raising():
    import pynvml

    reader = NvmlReader(pynvml, hostname="n")
    snapshot = reader.collect()
    if snapshot.nvml_up:
        pytest.skip("this machine has an NVIDIA driver")
    assert snapshot.devices == () and snapshot.error


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", [0, 1, 2]), (None, [0, 1, 2]), ("1", [1]), ("0,2", [0, 2]), (SECOND, [1]),
    ("GPU-0b1c2d3e", [1]), ("none", []), ("void", []),
])
def test_visible_devices_pick_gpus_by_index_or_uuid(spec, expected):
    gpus = [FakeGpu(H100), FakeGpu(SECOND, minor=1), FakeGpu("GPU-ffff0000-0000-0000-0000-000000000000", minor=2)]
    reader, _, _ = reader_for(*gpus, visible=DeviceFilter(spec))
    assert [r.identity.index for r in reader.collect().devices] == expected


def test_visibility_comes_from_nvidia_then_cuda_visible_devices():
    assert DeviceFilter.from_environment({"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}).tokens == ("1",)
    assert DeviceFilter.from_environment({"CUDA_VISIBLE_DEVICES": "0"}).tokens == ("0",)
    assert DeviceFilter.from_environment({}).everything


def test_mig_devices_are_known_for_attribution_and_processes_are_read_on_request():
    gpu = FakeGpu(H100, mig=["MIG-aaaa", "MIG-bbbb"], processes=[(4242, 3 * 1024**3)])
    reader, _, _ = reader_for(gpu, per_process=True)
    [reading] = reader.collect().devices
    assert reading.identity.mig_uuids == ("MIG-aaaa", "MIG-bbbb")
    assert [(p.pid, p.used_bytes) for p in reading.processes] == [(4242, 3 * 1024**3)]


def test_xid_keeps_the_last_error_seen():
    gpu = FakeGpu(H100, xids=[13, 31])
    reader, _, _ = reader_for(gpu)
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 31
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 31


def test_a_sidecar_waits_for_the_workers_visible_devices_file_then_exports_only_those(tmp_path):
    path = tmp_path / "visible"
    gpus = [FakeGpu(H100), FakeGpu(SECOND, minor=1)]
    reader, nvml, clock = reader_for(*gpus, visible=lambda: DeviceFilter.from_file(str(path)))
    waiting = reader.collect()
    assert not waiting.nvml_up and "not known yet" in waiting.error
    path.write_text(SECOND + "\n")
    clock.now += 2
    assert [r.identity.uuid for r in reader.collect().devices] == [SECOND]
