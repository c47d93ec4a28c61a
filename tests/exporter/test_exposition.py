"""The exposition rendered once per poll: the same bytes as the per-scrape render it replaced, whole or not at all, stale by age.

`reference_exposition` is the exporter's render before issue 15 (prometheus_client's metric
families and text writer, built on every scrape), kept here as the oracle for the bytes.
"""

from __future__ import annotations

import ctypes
import pathlib
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import pynvml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from contract import names
from exporter.collector import DCGM_COUNTERS, DEVICE_METRICS, GPU_LABELS, GpuExposition, podresources_text
from exporter.devices import DeviceIdentity
from exporter.nvml import NvmlReader
from exporter.podresources import PodRef
from exporter.poller import Poller, PollState
from exporter.snapshot import DeviceReading, ProcessMemory, Snapshot
from exporter.textformat import number

from .conftest import H100, SECOND
from .fakenvml import FakeGpu, FakeNvml
from .test_http import device_lines

ROOT = pathlib.Path(__file__).resolve().parents[2]
STALE_AFTER_S = 3.0
TAKEN_AT = 1_763_900_000.25


# -- the oracle: the per-scrape render as it was ------------------------------------------------


def reference_exposition(state: PollState, now: float, errors=None, pod=None, xid_events=None,
                         podresources=None) -> bytes:
    """What a scrape at `now` served before issue 15, for `state` and the same sources."""
    errors, xid_events = errors or {}, xid_events or {}

    class Collector:
        def collect(self):
            snapshot = state.snapshot
            fresh = snapshot is not None and not state.stale and now - snapshot.taken_at <= STALE_AFTER_S
            yield GaugeMetricFamily(names.EXPORTER_NVML_UP, "1 when NVML initialised and answers",
                                    value=float(bool(snapshot and snapshot.nvml_up)))
            current = fresh and snapshot is not None and snapshot.nvml_up
            yield GaugeMetricFamily(names.EXPORTER_SNAPSHOT_STALE,
                                    "1 when device series are withheld: the latest collection overran, is too old, "
                                    "or NVML did not answer", value=float(not current))
            up = GaugeMetricFamily(names.EXPORTER_GPU_UP, "1 when the GPU answers NVML; 0 when lost or unreachable",
                                   labels=GPU_LABELS)
            for reading in snapshot.devices if snapshot else ():
                up.add_metric((str(reading.identity.index), reading.identity.uuid), float(reading.up and fresh))
            yield up
            if snapshot is not None:
                yield GaugeMetricFamily(names.EXPORTER_COLLECTION_DURATION, "Seconds the last collection took",
                                        value=snapshot.duration_s)
                yield GaugeMetricFamily(names.EXPORTER_LAST_COLLECTION,
                                        "Unix time of the last completed collection", value=snapshot.taken_at)
            yield CounterMetricFamily(names.EXPORTER_COLLECTIONS, "Collections completed", value=state.collections)
            yield CounterMetricFamily(names.EXPORTER_COLLECTION_TIMEOUTS,
                                      "Collections that overran their timeout (a hung NVML call)", value=state.timeouts)
            yield CounterMetricFamily(names.EXPORTER_COLLECTIONS_SKIPPED,
                                      "Periods skipped because a hung collection had not returned", value=state.skipped)
            family = CounterMetricFamily(names.EXPORTER_NVML_ERRORS,
                                         "NVML errors by GPU and call (unsupported calls excluded)",
                                         labels=(GPU_LABELS[0], names.EXPORTER_CALL_LABEL))
            for (gpu, call), count in sorted(errors.items()):
                family.add_metric((gpu, call), count)
            yield family
            xids = CounterMetricFamily(names.EXPORTER_XID_EVENTS,
                                       "XID events reported by the driver, by GPU and XID code",
                                       labels=(*GPU_LABELS, names.EXPORTER_XID_LABEL))
            for (gpu, uuid, code), count in sorted(xid_events.items()):
                xids.add_metric((gpu, uuid, str(code)), count)
            yield xids
            if podresources is not None:
                family = CounterMetricFamily(names.EXPORTER_PODRESOURCES_ERRORS,
                                             "Failed PodResources List calls by gRPC code",
                                             labels=(names.EXPORTER_CODE_LABEL,))
                for code, count in sorted(podresources.errors.items()):
                    family.add_metric((code,), count)
                yield family
                yield CounterMetricFamily(names.EXPORTER_PODRESOURCES_REFRESHES, "Successful PodResources List calls",
                                          value=podresources.refreshes)
            if not fresh or not snapshot.nvml_up:
                return
            families = {}
            processes = GaugeMetricFamily(names.EXPORTER_PROCESS_MEMORY,
                                          "GPU memory used by each process (--per-process)",
                                          labels=(*GPU_LABELS, names.EXPORTER_PID_LABEL))
            holders = GaugeMetricFamily(names.EXPORTER_GPU_HOLDERS,
                                        "Containers the kubelet lists as holding the GPU (DaemonSet mode); "
                                        "each gets its own copy of the GPU's device series", labels=GPU_LABELS)
            for reading in snapshot.devices:
                if not reading.up:
                    continue
                identity = reading.identity
                if identity.uuid in state.owners:
                    holders.add_metric((str(identity.index), identity.uuid), len(state.owners[identity.uuid]))
                device = dict(zip(names.DEVICE_LABELS, (str(identity.index), identity.uuid, identity.pci_bus_id,
                                                        identity.device, identity.model, snapshot.hostname,
                                                        snapshot.driver_version), strict=True))
                held = state.owners.get(identity.uuid) or ((pod,) if pod is not None else ())
                series = [device | dict(zip(names.POD_LABELS, (p.container, p.namespace, p.pod), strict=True))
                          for p in held] or [device]
                for name, value in reading.values.items():
                    if name not in families:
                        kind, help_text = DEVICE_METRICS[name]
                        families[name] = Metric(name, help_text, kind)
                    for labels in series:
                        families[name].add_sample(name, labels, float(value))
                for process in reading.processes:
                    processes.add_metric((str(identity.index), identity.uuid, str(process.pid)), process.used_bytes)
            yield from families.values()
            if holders.samples:
                yield holders
            if processes.samples:
                yield processes

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    for name in DCGM_COUNTERS:
        text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ").replace(
            f"# TYPE {name}_total counter", f"# TYPE {name} counter")
    return text.encode()


# -- states ---------------------------------------------------------------------------------------

FIRST = DeviceIdentity(0, H100, "00000000:01:00.0", "nvidia0", 'NVIDIA "H100" 80GB\\HBM3')
SECOND_GPU = DeviceIdentity(1, SECOND, "00000000:02:00.0", "nvidia1", "NVIDIA H100 80GB HBM3")
THIRD = DeviceIdentity(2, "GPU-ffff0000-0000-0000-0000-000000000000", "00000000:03:00.0", "nvidia2", "NVIDIA H100")
# Numbers of every shape the text format writes differently: exponents, repr's digits, ints.
VALUES = {
    names.SM_CLOCK: 1980, names.GPU_TEMP: 41, names.MEMORY_TEMP: 38.0, names.POWER_USAGE: 118.123,
    names.TOTAL_ENERGY_CONSUMPTION: 5_000_000, names.PCIE_REPLAY_COUNTER: 0,
    names.GPU_UTIL: 0.1 + 0.2, names.FB_FREE: 1234567.0, names.FB_USED: 143155.9375, names.FB_RESERVED: 2.5e20,
    names.ECC_SBE_AGG_TOTAL: 1e22, names.PROF_DRAM_ACTIVE: 4.2440470246693465e-06, names.XID_ERRORS: 79,
}
WORKER = PodRef("sd-worker-7f9", "ml", "worker")


def snapshot(*readings: DeviceReading, nvml_up: bool = True, hostname: str = "node-a") -> Snapshot:
    return Snapshot(taken_at=TAKEN_AT, duration_s=0.0123, nvml_up=nvml_up, driver_version="580.159.04",
                    hostname=hostname, devices=readings)


def up(identity: DeviceIdentity, values=None, processes=()) -> DeviceReading:
    return DeviceReading(identity, up=True, values=dict(VALUES if values is None else values), processes=processes)


STATES = {
    "before the first collection": PollState(),
    "two GPUs, one lost, processes": PollState(
        snapshot(up(FIRST, processes=(ProcessMemory(4242, 3 * 1024**3),)), DeviceReading(SECOND_GPU, up=False)),
        collections=7, timeouts=1, skipped=2),
    "label values to escape": PollState(snapshot(up(FIRST), hostname='node "a"\\b\nc'), collections=1),
    "time-sliced GPU, held GPU, free GPU": PollState(
        snapshot(up(FIRST), up(SECOND_GPU, {names.GPU_UTIL: 20, names.SM_CLOCK: 1500}), up(THIRD, {names.GPU_TEMP: 30})),
        owners={H100: (PodRef("batch-eval", "research", "eval"), WORKER), SECOND: (WORKER,), THIRD.uuid: ()},
        collections=3),
    "the collection overran": PollState(snapshot(up(FIRST)), stale=True, collections=4, timeouts=1),
    "NVML down": PollState(snapshot(DeviceReading(FIRST, up=False), nvml_up=False), collections=2),
}
ERRORS = {("0", "temperature"): 3, ("1", "power"): 1}
XIDS = {("0", H100, 79): 2, ("0", H100, 13): 1}
PODRESOURCES = SimpleNamespace(errors=Counter({"RESOURCE_EXHAUSTED": 4, "UNAVAILABLE": 1}), refreshes=12)


@pytest.mark.parametrize("state", STATES.values(), ids=STATES.keys())
@pytest.mark.parametrize("pod", [None, WORKER], ids=["no pod", "sidecar pod"])
@pytest.mark.parametrize("age_s", [0.5, STALE_AFTER_S, STALE_AFTER_S + 0.01])
def test_the_bytes_served_are_those_the_per_scrape_render_gave(state, pod, age_s):
    exposition = GpuExposition(lambda: ERRORS, STALE_AFTER_S, pod=pod, xid_events=lambda: XIDS,
                               extra=lambda: podresources_text(PODRESOURCES))
    exposition.update(state)
    now = TAKEN_AT + age_s
    expected = reference_exposition(state, now, ERRORS, pod, XIDS, PODRESOURCES)
    assert exposition.scrape(now).decode() == expected.decode()


def test_the_bytes_match_without_errors_xids_or_podresources_too():
    state = STATES["two GPUs, one lost, processes"]
    exposition = GpuExposition(dict, STALE_AFTER_S)
    exposition.update(state)
    assert exposition.scrape(TAKEN_AT + 1) == reference_exposition(state, TAKEN_AT + 1)


def test_one_exposition_rendering_poll_after_poll_matches_each_time_as_holders_and_gpus_change():
    """The label sets are kept from poll to poll: a change of holder, driver or GPU must still show."""
    exposition = GpuExposition(lambda: ERRORS, STALE_AFTER_S, xid_events=lambda: XIDS)
    polls = [
        PollState(snapshot(up(FIRST), up(SECOND_GPU)), owners={H100: (WORKER,)}, collections=1),
        PollState(snapshot(up(FIRST), up(SECOND_GPU)), owners={H100: (WORKER, PodRef("b", "n", "c"))}, collections=2),
        PollState(snapshot(up(FIRST), up(SECOND_GPU)), owners={SECOND: (WORKER,)}, collections=3),
        PollState(snapshot(up(FIRST), hostname="node-b"), collections=4),
        PollState(snapshot(up(THIRD), up(FIRST)), collections=5),
        PollState(snapshot(up(FIRST), up(SECOND_GPU)), owners={H100: (WORKER,)}, collections=6),
    ]
    for state in polls:
        exposition.update(state)
        assert exposition.scrape(TAKEN_AT + 1) == reference_exposition(state, TAKEN_AT + 1, ERRORS, xid_events=XIDS)


def test_label_sets_are_written_once_per_gpu_and_holders_not_once_per_poll():
    written = []

    class Counting(GpuExposition):
        @staticmethod
        def _label_sets(*key):
            written.append(key[0].uuid)
            return GpuExposition._label_sets(*key)

    exposition = Counting(dict, STALE_AFTER_S, pod=WORKER)
    state = PollState(snapshot(up(FIRST), up(SECOND_GPU)), collections=1)
    for _ in range(5):
        exposition.update(state)
    assert written == [H100, SECOND]


@pytest.mark.parametrize("value", [0, -0.0, 1, -3.5, 0.1, 123456.7, 1234567.0, 1e6, 1e16, 2.5e-7, 1763900000.25,
                                   float("inf"), float("-inf"), float("nan"), True])
def test_numbers_are_written_as_prometheus_client_writes_them(value):
    from prometheus_client.utils import floatToGoString

    assert number(value) == floatToGoString(value)


# -- a snapshot goes stale between polls ----------------------------------------------------------


def test_a_snapshot_that_ages_past_stale_after_loses_its_device_series_at_the_next_scrape():
    exposition = GpuExposition(dict, STALE_AFTER_S)
    exposition.update(PollState(snapshot(up(FIRST)), collections=1))
    fresh = exposition.scrape(TAKEN_AT + STALE_AFTER_S).decode()
    stale = exposition.scrape(TAKEN_AT + STALE_AFTER_S + 0.001).decode()  # no poll in between
    assert device_lines(fresh) and f"{names.EXPORTER_SNAPSHOT_STALE} 0.0" in fresh
    assert device_lines(stale) == []
    assert f"{names.EXPORTER_SNAPSHOT_STALE} 1.0" in stale
    assert f'{names.EXPORTER_GPU_UP}{{UUID="{H100}",gpu="0"}} 0.0' in stale


def test_a_stopped_poller_leaves_nothing_fresh_once_stale_after_passes(start_exporter):
    running = start_exporter()  # every 0.1 s, stale after 0.3 s
    assert device_lines(running.text())
    running.exporter.poller.stop()  # no poll will render again
    time.sleep(running.exporter.config.stale_after_s + 0.05)
    text = running.text()
    assert device_lines(text) == []
    assert running.value(names.EXPORTER_SNAPSHOT_STALE) == 1
    assert running.value(names.EXPORTER_GPU_UP, gpu="0") == 0


# -- a scrape gets a whole rendering, the previous one while the next is under way ---------------


def test_a_scrape_while_a_rendering_is_under_way_gets_the_previous_one_whole():
    entered, release = threading.Event(), threading.Event()
    errors: dict = {}

    def slow_errors():
        if errors and not release.is_set():
            entered.set()
            release.wait(5)  # the render stops half-way, in the shared self-metrics
        return errors

    exposition = GpuExposition(slow_errors, STALE_AFTER_S)
    before = PollState(snapshot(up(FIRST)), collections=1)
    exposition.update(before)
    previous = exposition.scrape(TAKEN_AT + 1)
    errors[("0", "power")] = 1
    after = PollState(snapshot(up(FIRST, {names.GPU_TEMP: 99})), collections=2)
    renderer = threading.Thread(target=exposition.update, args=(after,))
    renderer.start()
    assert entered.wait(5)
    started = time.monotonic()
    during = exposition.scrape(TAKEN_AT + 1)
    assert time.monotonic() - started < 1  # the scrape did not wait for the rendering
    assert during == previous
    release.set()
    renderer.join(5)
    assert exposition.scrape(TAKEN_AT + 1) == reference_exposition(after, TAKEN_AT + 1, errors)


def test_a_scrape_during_a_hung_collection_gets_the_last_complete_rendering(start_exporter):
    gpu = FakeGpu(H100, samples=[(1, 50)])
    nvml = FakeNvml([gpu])
    running = start_exporter(nvml=nvml, flags=["--interval", "1", "--collect-timeout", "5"])
    exporter = running.exporter
    release = threading.Event()
    nvml.hangs["nvmlDeviceGetPowerUsage"] = release
    assert nvml.hung.wait(5)  # the next collection is stuck inside NVML
    served = [requests_get(running) for _ in range(3)]
    published = exporter.poller.state
    assert published.collections >= 1 and not published.stale
    expected = exporter.exposition.render(published).text(time.time(), exporter.config.stale_after_s)
    assert served == [expected] * 3
    assert device_lines(served[0].decode())
    del nvml.hangs["nvmlDeviceGetPowerUsage"]
    release.set()


def requests_get(running) -> bytes:
    import requests

    return requests.get(f"{running.url}/metrics", timeout=5).content


# -- the poller publishes to the renderer first ---------------------------------------------------


class Reader:
    def __init__(self) -> None:
        self.taken = 0

    def collect(self) -> Snapshot:
        self.taken += 1
        return snapshot(up(FIRST, {names.GPU_TEMP: self.taken}))


def test_the_poller_hands_each_state_to_on_state_before_it_shows_it():
    seen = []
    poller = Poller(Reader(), interval_s=1, timeout_s=1, on_state=lambda state: seen.append((state, poller.state)))
    first = poller.poll_once()
    second = poller.poll_once()
    assert [handed for handed, _ in seen] == [first, second]
    # while on_state runs, `state` still holds the previous state: whoever reads `state` finds it rendered
    assert seen[0][1] == PollState() and seen[1][1] is first
    assert poller.state is second
    poller.stop()


def test_a_failing_on_state_leaves_the_poller_running_and_logs_once(caplog):
    def broken(state):
        raise RuntimeError("render bug")

    poller = Poller(Reader(), interval_s=1, timeout_s=1, on_state=broken)
    for _ in range(3):
        state = poller.poll_once()
    assert state.collections == 3 and poller.state is state
    assert sum("on_state failed" in record.getMessage() for record in caplog.records) == 1
    poller.stop()


# -- a collection does no NVML work twice -------------------------------------------------------------


class CountingNvml(FakeNvml):
    """The fake NVML, counting GPM sample allocations and frees, and which samples each GPM request compares."""

    def __init__(self, gpus) -> None:
        super().__init__(gpus)
        self.allocated: list = []
        self.freed: list[int] = []
        self.compared: list[tuple[int, int]] = []  # (sample1, sample2) addresses
        self.filled: list[int] = []

    def nvmlGpmSampleAlloc(self):
        self._require_init()
        sample = ctypes.pointer(pynvml.struct_c_nvmlGpmSample_t())  # a distinct address per sample
        self.allocated.append(sample)
        return sample

    def nvmlGpmSampleFree(self, gpmSample):  # noqa: N803
        self.freed.append(address(gpmSample))

    def nvmlGpmSampleGet(self, device, gpmSample):  # noqa: N803
        self.filled.append(address(gpmSample))
        return super().nvmlGpmSampleGet(device, gpmSample)

    def nvmlGpmMetricsGet(self, metricsGet):  # noqa: N803
        self.compared.append((address(metricsGet.sample1), address(metricsGet.sample2)))
        return super().nvmlGpmMetricsGet(metricsGet)


def address(sample) -> int:
    return ctypes.cast(sample, ctypes.c_void_p).value


def test_gpm_samples_are_allocated_once_and_each_collection_compares_with_the_last_one_taken():
    nvml = CountingNvml([FakeGpu(H100)])
    reader = NvmlReader(nvml, hostname="n")
    for _ in range(4):
        values = reader.collect().devices[0].values
    assert values[names.PROF_SM_ACTIVE] == 0.40
    assert len(nvml.allocated) == 2 and nvml.freed == []
    # sample1 of each comparison is the sample2 of the one before: consecutive periods, no gap
    assert all(later[0] == earlier[1] for earlier, later in zip(nvml.compared, nvml.compared[1:]))
    assert all(first != second for first, second in nvml.compared)
    assert nvml.filled[0] == nvml.compared[0][0]  # the first comparison starts at the sample taken at init
    reader.close()
    assert sorted(nvml.freed) == sorted(address(sample) for sample in nvml.allocated)


def test_nvmls_current_utilization_is_asked_once_per_collection_when_no_sample_arrived():
    nvml = FakeNvml([FakeGpu(H100, utilization=55, memory_utilization=12)])  # no samples at all
    reader = NvmlReader(nvml, hostname="n")
    for collections in range(1, 4):
        values = reader.collect().devices[0].values
        assert nvml.calls["nvmlDeviceGetUtilizationRates"] == collections
    assert values[names.GPU_UTIL] == 55 and values[names.MEM_COPY_UTIL] == 12


def test_a_driver_without_memory_info_v2_is_asked_for_it_once():
    class OldDriver(FakeNvml):
        asked_v2 = 0

        def nvmlDeviceGetMemoryInfo(self, handle, version=None):
            if version:
                self.asked_v2 += 1
                raise self.NVMLError(13)  # function not found
            return super().nvmlDeviceGetMemoryInfo(handle)

    nvml = OldDriver([FakeGpu(H100)])
    reader = NvmlReader(nvml, hostname="n")
    for _ in range(3):
        values = reader.collect().devices[0].values
    assert nvml.asked_v2 == 1
    assert values[names.FB_USED] == 2048 and names.FB_RESERVED not in values


# -- memory: a sidecar does not load gRPC ---------------------------------------------------------------


def test_a_sidecar_exporter_never_imports_grpc():
    program = (
        "import sys\n"
        "from exporter.__main__ import Exporter\n"
        "from exporter.config import ExporterConfig\n"
        "from tests.exporter.fakenvml import FakeGpu, FakeNvml\n"
        "exporter = Exporter(ExporterConfig(port=0), environ={}, nvml=FakeNvml([FakeGpu('GPU-1')]))\n"
        "exporter.poller.poll_once()\n"
        "assert exporter.exposition.scrape(0.0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
