"""Builds the exporter's metric families afresh on every scrape from the poller's latest state.

Device series carry dcgm-exporter's names and labels. They are served only from a fresh
snapshot of a GPU that is up: a stale snapshot, a lost GPU or NVML being down removes them,
so Prometheus marks them stale instead of repeating an old number. `render` writes the text
format with dcgm-exporter's counter names (no `_total`), which prometheus_client would rename.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .nvml import DeviceReading
from .podresources import PodRef
from .poller import PollState

DEVICE_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
POD_LABELS = ("container", "namespace", "pod")

# name -> (type, help), in dcgm-exporter's words where it has the field.
DEVICE_METRICS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_SM_CLOCK": ("gauge", "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEM_CLOCK": ("gauge", "Memory clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEMORY_TEMP": ("gauge", "Memory temperature (in C)."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": ("gauge", "Enforced power limit (in W)."),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", "Total energy consumption since boot (in mJ)."),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("counter", "Total number of PCIe retries."),
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %), mean of NVML's samples since the last collection."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", "Memory utilization (in %), mean of NVML's samples since the last collection."),
    "DCGM_FI_DEV_ENC_UTIL": ("gauge", "Encoder utilization (in %)."),
    "DCGM_FI_DEV_DEC_UTIL": ("gauge", "Decoder utilization (in %)."),
    "DCGM_FI_DEV_XID_ERRORS": ("gauge", "Value of the last XID error encountered."),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_RESERVED": ("gauge", "Framebuffer memory reserved (in MiB)."),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("counter", "Total number of single-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("counter", "Total number of double-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("counter", "Total number of single-bit persistent ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("counter", "Total number of double-bit persistent ECC errors."),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for uncorrectable errors"),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for correctable errors"),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("gauge", "Whether remapping of rows has failed"),
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": ("gauge", "Current clock event (throttle) reasons, NVML's bitmask."),
    "DCGM_FI_PROF_SM_ACTIVE": ("gauge", "Ratio of SMs busy over the collection period (NVML GPM)."),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("gauge", "Ratio of time the tensor pipes were active (NVML GPM)."),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("gauge", "Ratio of DRAM bandwidth used to its peak (NVML GPM)."),
}
# dcgm-exporter's counters whose names lack `_total`: kept as they are for dashboards' sake.
DCGM_COUNTERS = tuple(name for name, (kind, _) in DEVICE_METRICS.items() if kind == "counter")

Owners = Mapping[str, tuple[PodRef, ...]]


class GpuCollector:
    """Reads `state()` once per scrape; `pod` is the sidecar's own pod, when known."""

    def __init__(
        self,
        state: Callable[[], PollState],
        errors: Callable[[], Mapping[tuple[str, str], int]],
        pod: PodRef | None = None,
        stale_after_s: float = 5.0,
        extra: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self._state = state
        self._errors = errors
        self._pod = pod
        self.stale_after_s = stale_after_s
        self._extra = extra

    def collect(self) -> Iterable[Metric]:
        state = self._state()
        snapshot = state.snapshot
        fresh = snapshot is not None and not state.stale and time.time() - snapshot.taken_at <= self.stale_after_s
        yield from self._self_metrics(state, fresh)
        if self._extra is not None:
            yield from self._extra()
        if not fresh or not snapshot.nvml_up:
            return
        families: dict[str, Metric] = {}
        processes = GaugeMetricFamily(
            "gpu_exporter_process_memory_used_bytes", "GPU memory used by each process (--per-process)",
            labels=("gpu", "UUID", "pid"),
        )
        for reading in snapshot.devices:
            if not reading.up:
                continue
            labels = self._labels(reading, snapshot.hostname, snapshot.driver_version, state.owners)
            for name, value in reading.values.items():
                family = families.get(name)
                if family is None:
                    kind, help_text = DEVICE_METRICS[name]
                    family = families[name] = Metric(name, help_text, kind)
                family.add_sample(name, labels, float(value))
            for process in reading.processes:
                processes.add_metric((str(reading.identity.index), reading.identity.uuid, str(process.pid)),
                                     process.used_bytes)
        yield from families.values()
        if processes.samples:
            yield processes

    def _labels(self, reading: DeviceReading, hostname: str, driver: str, owners: Owners) -> dict[str, str]:
        identity = reading.identity
        labels = dict(zip(DEVICE_LABELS, (str(identity.index), identity.uuid, identity.pci_bus_id, identity.device,
                                          identity.model, hostname, driver), strict=True))
        pod = self._pod
        held = owners.get(identity.uuid)
        if held:
            pod = held[0]  # a GPU shared by time-slicing is labelled with the first holder, sorted
        if pod is not None:
            labels.update(container=pod.container, namespace=pod.namespace, pod=pod.pod)
        return labels

    def _self_metrics(self, state: PollState, fresh: bool) -> Iterable[Metric]:
        snapshot = state.snapshot
        yield GaugeMetricFamily("gpu_exporter_nvml_up", "1 when NVML initialised and answers",
                                value=float(bool(snapshot and snapshot.nvml_up)))
        yield GaugeMetricFamily("gpu_exporter_snapshot_stale",
                                "1 when the latest collection overran or is too old: device series are withheld",
                                value=float(not fresh))
        up = GaugeMetricFamily("gpu_exporter_gpu_up", "1 when the GPU answers NVML; 0 when lost or unreachable",
                               labels=("gpu", "UUID"))
        for reading in snapshot.devices if snapshot else ():
            up.add_metric((str(reading.identity.index), reading.identity.uuid), float(reading.up and fresh))
        yield up
        if snapshot is not None:
            yield GaugeMetricFamily("gpu_exporter_collection_duration_seconds", "Seconds the last collection took",
                                    value=snapshot.duration_s)
            yield GaugeMetricFamily("gpu_exporter_last_collection_timestamp_seconds",
                                    "Unix time of the last completed collection", value=snapshot.taken_at)
        yield CounterMetricFamily("gpu_exporter_collections", "Collections completed", value=state.collections)
        yield CounterMetricFamily("gpu_exporter_collection_timeouts",
                                  "Collections that overran their timeout (a hung NVML call)", value=state.timeouts)
        yield CounterMetricFamily("gpu_exporter_collections_skipped",
                                  "Periods skipped because a hung collection had not returned", value=state.skipped)
        errors = CounterMetricFamily("gpu_exporter_nvml_errors", "NVML errors by GPU and call (unsupported calls excluded)",
                                     labels=("gpu", "call"))
        for (gpu, call), count in sorted(self._errors().items()):
            errors.add_metric((gpu, call), count)
        yield errors


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format, with dcgm-exporter's counter names kept as they are.

    prometheus_client names a counter family `<name>_total` in its HELP and TYPE lines; for
    the dcgm counters (whose samples have no `_total`) that would split TYPE from samples.
    """
    text = generate_latest(registry).decode()
    for name in DCGM_COUNTERS:
        text = text.replace(f"# HELP {name}_total ", f"# HELP {name} ").replace(
            f"# TYPE {name}_total counter", f"# TYPE {name} counter")
    return text.encode()
