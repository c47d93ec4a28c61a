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

from contract import names

from .podresources import PodRef, PodResourcesCache
from .poller import PollState
from .snapshot import DeviceReading

# The names themselves live in contract/names.py; these are the exporter's views of them.
DEVICE_LABELS = names.DEVICE_LABELS
POD_LABELS = names.POD_LABELS
DEVICE_METRICS = names.DCGM_METRICS
GPU_LABELS = DEVICE_LABELS[:2]  # gpu and UUID: which GPU a self-metric is about
# dcgm-exporter's counters whose names lack `_total`: kept as they are for dashboards' sake.
DCGM_COUNTERS = tuple(name for name, (kind, _) in DEVICE_METRICS.items() if kind == "counter")

Owners = Mapping[str, tuple[PodRef, ...]]


class GpuCollector:
    """Reads `state()` once per scrape; `pod` is the sidecar's own pod, when known."""

    def __init__(
        self,
        state: Callable[[], PollState],
        errors: Callable[[], Mapping[tuple[str, str], int]],
        stale_after_s: float,
        pod: PodRef | None = None,
        extra: Callable[[], Iterable[Metric]] | None = None,
        xid_events: Callable[[], Mapping[tuple[str, str, int], int]] | None = None,
    ) -> None:
        self._state = state
        self._errors = errors
        self.stale_after_s = stale_after_s
        self._pod = pod
        self._extra = extra
        self._xid_events = xid_events

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
            names.EXPORTER_PROCESS_MEMORY, "GPU memory used by each process (--per-process)",
            labels=(*GPU_LABELS, names.EXPORTER_PID_LABEL),
        )
        holders = GaugeMetricFamily(
            names.EXPORTER_GPU_HOLDERS, "Containers the kubelet lists as holding the GPU (DaemonSet mode); "
            "each gets its own copy of the GPU's device series", labels=GPU_LABELS,
        )
        for reading in snapshot.devices:
            if not reading.up:
                continue
            if reading.identity.uuid in state.owners:
                holders.add_metric((str(reading.identity.index), reading.identity.uuid),
                                   len(state.owners[reading.identity.uuid]))
            series = self._labels(reading, snapshot.hostname, snapshot.driver_version, state.owners)
            for name, value in reading.values.items():
                family = families.get(name)
                if family is None:
                    kind, help_text = DEVICE_METRICS[name]
                    family = families[name] = Metric(name, help_text, kind)
                for labels in series:
                    family.add_sample(name, labels, float(value))
            for process in reading.processes:
                processes.add_metric((str(reading.identity.index), reading.identity.uuid, str(process.pid)),
                                     process.used_bytes)
        yield from families.values()
        if holders.samples:
            yield holders
        if processes.samples:
            yield processes

    def _labels(self, reading: DeviceReading, hostname: str, driver: str, owners: Owners) -> list[dict[str, str]]:
        """The label sets a GPU's device series are served under: one per holder.

        A GPU shared by time-slicing (or by several containers) is held by each of them, and
        each must find it under its own `namespace` and `pod`, or a selector on one of them
        silently matches nothing. So, as dcgm-exporter does, every holder gets a copy of the
        whole-GPU values. A GPU nobody holds keeps one series without pod labels.
        """
        identity = reading.identity
        device = dict(zip(DEVICE_LABELS, (str(identity.index), identity.uuid, identity.pci_bus_id, identity.device,
                                          identity.model, hostname, driver), strict=True))
        held = owners.get(identity.uuid) or ((self._pod,) if self._pod is not None else ())
        if not held:
            return [device]
        return [device | dict(zip(POD_LABELS, (pod.container, pod.namespace, pod.pod), strict=True)) for pod in held]

    def _self_metrics(self, state: PollState, fresh: bool) -> Iterable[Metric]:
        snapshot = state.snapshot
        yield GaugeMetricFamily(names.EXPORTER_NVML_UP, "1 when NVML initialised and answers",
                                value=float(bool(snapshot and snapshot.nvml_up)))
        # Stale means "no current device values": a collection that overran, is too old, or
        # found NVML not answering all leave the same gap, and an alert needs only this one gauge.
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
        errors = CounterMetricFamily(names.EXPORTER_NVML_ERRORS,
                                     "NVML errors by GPU and call (unsupported calls excluded)",
                                     labels=(GPU_LABELS[0], names.EXPORTER_CALL_LABEL))
        for (gpu, call), count in sorted(self._errors().items()):
            errors.add_metric((gpu, call), count)
        yield errors
        # Served whatever NVML's state: a count of past events stays true while the GPU is down.
        xids = CounterMetricFamily(names.EXPORTER_XID_EVENTS, "XID events reported by the driver, by GPU and XID code",
                                   labels=(*GPU_LABELS, names.EXPORTER_XID_LABEL))
        for (gpu, uuid, code), count in sorted((self._xid_events or dict)().items()):
            xids.add_metric((gpu, uuid, str(code)), count)
        yield xids


def podresources_metrics(cache: PodResourcesCache) -> Iterable[Metric]:
    """The DaemonSet's PodResources counts: failed List calls by gRPC code, and successful ones."""
    errors = CounterMetricFamily(names.EXPORTER_PODRESOURCES_ERRORS, "Failed PodResources List calls by gRPC code",
                                 labels=(names.EXPORTER_CODE_LABEL,))
    for code, count in sorted(cache.errors.items()):
        errors.add_metric((code,), count)
    yield errors
    yield CounterMetricFamily(names.EXPORTER_PODRESOURCES_REFRESHES, "Successful PodResources List calls",
                              value=cache.refreshes)


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
