"""The exporter's exposition: rendered once per poll on the poller's thread, served as bytes by every scrape.

Device series carry dcgm-exporter's names and labels. They are served only from a fresh
snapshot of a GPU that is up: a stale snapshot, a lost GPU or NVML being down removes them,
so Prometheus marks them stale instead of repeating an old number.

A snapshot also goes stale by age alone, between two polls, and a scrape must see that
without rendering anything. So each poll renders two texts: `current`, with the device
series, served while the snapshot is at most `stale_after_s` old, and `withheld`, without
them, served after (or at once when the poll already found the snapshot stale). A scrape
compares one age and returns one of the two; a poll replaces the whole `Exposition` in one
assignment, so a scrape never sees half of one. No self-metric changes per scrape: each is a
count kept by the poller, the reader or the PodResources cache, which change only during a
poll, and a poll renders at its end (every period publishes, a skipped one too).

Counters keep dcgm-exporter's names, without `_total`, for dashboards' sake.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from contract import names

from .devices import DeviceIdentity
from .podresources import PodRef, PodResourcesCache
from .poller import PollState
from .snapshot import Snapshot
from .textformat import header, label_set, number

# The names themselves live in contract/names.py; these are the exporter's views of them.
DEVICE_LABELS = names.DEVICE_LABELS
POD_LABELS = names.POD_LABELS
DEVICE_METRICS = names.DCGM_METRICS
GPU_LABELS = DEVICE_LABELS[:2]  # gpu and UUID: which GPU a self-metric is about
# dcgm-exporter's counters whose names lack `_total`: kept as they are for dashboards' sake.
DCGM_COUNTERS = tuple(name for name, (kind, _) in DEVICE_METRICS.items() if kind == "counter")

# Every family's HELP and TYPE lines, written once. The exporter's own counters take `_total`.
DEVICE_HEADERS = {name: header(name, help_text, kind) for name, (kind, help_text) in DEVICE_METRICS.items()}
NVML_UP = header(names.EXPORTER_NVML_UP, "1 when NVML initialised and answers", "gauge")
# Stale means "no current device values": a collection that overran, is too old, or found
# NVML not answering all leave the same gap, and an alert needs only this one gauge.
SNAPSHOT_STALE = header(names.EXPORTER_SNAPSHOT_STALE, "1 when device series are withheld: the latest collection "
                        "overran, is too old, or NVML did not answer", "gauge")
GPU_UP = header(names.EXPORTER_GPU_UP, "1 when the GPU answers NVML; 0 when lost or unreachable", "gauge")
COLLECTION_DURATION = header(names.EXPORTER_COLLECTION_DURATION, "Seconds the last collection took", "gauge")
LAST_COLLECTION = header(names.EXPORTER_LAST_COLLECTION, "Unix time of the last completed collection", "gauge")
COLLECTIONS = header(f"{names.EXPORTER_COLLECTIONS}_total", "Collections completed", "counter")
COLLECTION_TIMEOUTS = header(f"{names.EXPORTER_COLLECTION_TIMEOUTS}_total",
                             "Collections that overran their timeout (a hung NVML call)", "counter")
COLLECTIONS_SKIPPED = header(f"{names.EXPORTER_COLLECTIONS_SKIPPED}_total",
                             "Periods skipped because a hung collection had not returned", "counter")
NVML_ERRORS = header(f"{names.EXPORTER_NVML_ERRORS}_total",
                     "NVML errors by GPU and call (unsupported calls excluded)", "counter")
XID_EVENTS = header(f"{names.EXPORTER_XID_EVENTS}_total", "XID events reported by the driver, by GPU and XID code",
                    "counter")
GPU_HOLDERS = header(names.EXPORTER_GPU_HOLDERS, "Containers the kubelet lists as holding the GPU (DaemonSet mode); "
                     "each gets its own copy of the GPU's device series", "gauge")
PROCESS_MEMORY = header(names.EXPORTER_PROCESS_MEMORY, "GPU memory used by each process (--per-process)", "gauge")
PODRESOURCES_ERRORS = header(f"{names.EXPORTER_PODRESOURCES_ERRORS}_total",
                             "Failed PodResources List calls by gRPC code", "counter")
PODRESOURCES_REFRESHES = header(f"{names.EXPORTER_PODRESOURCES_REFRESHES}_total",
                                "Successful PodResources List calls", "counter")

Owners = Mapping[str, tuple[PodRef, ...]]


@dataclass(frozen=True)
class Exposition:
    """One poll's text format: `current` (with the device series) while its snapshot is fresh, else `withheld`."""

    withheld: bytes
    current: bytes | None = None  # None when the poll already had no fresh snapshot
    taken_at: float = 0.0  # the snapshot's unix time, which `current` is served against

    def text(self, now: float, stale_after_s: float) -> bytes:
        """What a scrape at `now` (unix seconds) serves: `current` until the snapshot is older than `stale_after_s`."""
        if self.current is not None and now - self.taken_at <= stale_after_s:
            return self.current
        return self.withheld


@dataclass(frozen=True)
class DeviceLabels:
    """A GPU's label sets as written: `gpu` for its self-metrics, `series` one per holder of its device series."""

    gpu: str
    series: tuple[str, ...]


LabelKey = tuple[DeviceIdentity, str, str, tuple[PodRef, ...]]  # identity, hostname, driver, holders


class GpuExposition:
    """Renders an `Exposition` from each `PollState` (`update`), and serves the latest one (`scrape`).

    `update` runs on the poller's thread, `scrape` on the HTTP server's; they share one
    reference, which `update` replaces. `errors`, `xid_events` and `extra` are read during
    `update`; `pod` is the sidecar's own pod, when known.
    """

    def __init__(
        self,
        errors: Callable[[], Mapping[tuple[str, str], int]],
        stale_after_s: float,
        pod: PodRef | None = None,
        extra: Callable[[], str] | None = None,
        xid_events: Callable[[], Mapping[tuple[str, str, int], int]] | None = None,
    ) -> None:
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be above 0 seconds, got {stale_after_s:g}")
        self._errors = errors
        self.stale_after_s = stale_after_s
        self._pod = pod
        self._extra = extra
        self._xid_events = xid_events
        # Label sets are the same from one poll to the next; written once, kept while in use.
        self._labels: dict[LabelKey, DeviceLabels] = {}
        self._exposition = self.render(PollState())

    def update(self, state: PollState) -> None:
        """Renders `state` and makes it the one scrapes serve."""
        self._exposition = self.render(state)

    def scrape(self, now: float) -> bytes:
        """The text a scrape at `now` (unix seconds) serves; builds nothing."""
        return self._exposition.text(now, self.stale_after_s)

    def render(self, state: PollState) -> Exposition:
        """Both texts of `state`: with the device series (unless `state` is stale already), and without."""
        snapshot = state.snapshot
        labels = self._device_labels(snapshot, state.owners)
        shared = self._shared(state)
        withheld = self._head(snapshot, labels, fresh=False) + shared
        if snapshot is None or state.stale:
            return Exposition(withheld.encode())
        current = self._head(snapshot, labels, fresh=True) + shared
        if snapshot.nvml_up:
            current += self._device_series(snapshot, labels, state.owners)
        return Exposition(withheld.encode(), current.encode(), snapshot.taken_at)

    def _device_labels(self, snapshot: Snapshot | None, owners: Owners) -> list[DeviceLabels]:
        """Each reading's label sets, in the snapshot's order, from the cache; the cache keeps only these."""
        if snapshot is None:
            return []
        cache, self._labels = self._labels, {}
        found = []
        for reading in snapshot.devices:
            identity = reading.identity
            held = owners.get(identity.uuid) or ((self._pod,) if self._pod is not None else ())
            key = (identity, snapshot.hostname, snapshot.driver_version, held)
            labels = cache.get(key) or self._label_sets(*key)
            self._labels[key] = labels
            found.append(labels)
        return found

    @staticmethod
    def _label_sets(identity: DeviceIdentity, hostname: str, driver: str, held: tuple[PodRef, ...]) -> DeviceLabels:
        """A GPU's label sets: one per holder.

        A GPU shared by time-slicing (or by several containers) is held by each of them, and
        each must find it under its own `namespace` and `pod`, or a selector on one of them
        silently matches nothing. So, as dcgm-exporter does, every holder gets a copy of the
        whole-GPU values. A GPU nobody holds keeps one series without pod labels.
        """
        device = tuple(zip(DEVICE_LABELS, (str(identity.index), identity.uuid, identity.pci_bus_id, identity.device,
                                           identity.model, hostname, driver), strict=True))
        if held:
            series = tuple(label_set((*device, *zip(POD_LABELS, (pod.container, pod.namespace, pod.pod), strict=True)))
                           for pod in held)
        else:
            series = (label_set(device),)
        return DeviceLabels(label_set(device[:2]), series)

    @staticmethod
    def _head(snapshot: Snapshot | None, labels: list[DeviceLabels], fresh: bool) -> str:
        """NVML's state, the snapshot's staleness and each GPU's: the self-metrics that depend on freshness."""
        nvml_up = bool(snapshot and snapshot.nvml_up)
        parts = [NVML_UP, f"{names.EXPORTER_NVML_UP} {number(nvml_up)}\n",
                 SNAPSHOT_STALE, f"{names.EXPORTER_SNAPSHOT_STALE} {number(not (fresh and nvml_up))}\n", GPU_UP]
        for reading, device in zip(snapshot.devices if snapshot else (), labels, strict=True):
            parts.append(f"{names.EXPORTER_GPU_UP}{device.gpu} {number(reading.up and fresh)}\n")
        return "".join(parts)

    def _shared(self, state: PollState) -> str:
        """The self-metrics both texts carry: the last collection, the poller's counts, errors, XIDs, `extra`."""
        snapshot = state.snapshot
        parts = []
        if snapshot is not None:
            parts += [COLLECTION_DURATION, f"{names.EXPORTER_COLLECTION_DURATION} {number(snapshot.duration_s)}\n",
                      LAST_COLLECTION, f"{names.EXPORTER_LAST_COLLECTION} {number(snapshot.taken_at)}\n"]
        parts += [COLLECTIONS, f"{names.EXPORTER_COLLECTIONS}_total {number(state.collections)}\n",
                  COLLECTION_TIMEOUTS, f"{names.EXPORTER_COLLECTION_TIMEOUTS}_total {number(state.timeouts)}\n",
                  COLLECTIONS_SKIPPED, f"{names.EXPORTER_COLLECTIONS_SKIPPED}_total {number(state.skipped)}\n",
                  NVML_ERRORS]
        for (gpu, call), count in sorted(self._errors().items()):
            labels = label_set(((GPU_LABELS[0], gpu), (names.EXPORTER_CALL_LABEL, call)))
            parts.append(f"{names.EXPORTER_NVML_ERRORS}_total{labels} {number(count)}\n")
        # Served whatever NVML's state: a count of past events stays true while the GPU is down.
        parts.append(XID_EVENTS)
        for (gpu, uuid, code), count in sorted((self._xid_events or dict)().items()):
            labels = label_set(((GPU_LABELS[0], gpu), (GPU_LABELS[1], uuid), (names.EXPORTER_XID_LABEL, str(code))))
            parts.append(f"{names.EXPORTER_XID_EVENTS}_total{labels} {number(count)}\n")
        if self._extra is not None:
            parts.append(self._extra())
        return "".join(parts)

    @staticmethod
    def _device_series(snapshot: Snapshot, labels: list[DeviceLabels], owners: Owners) -> str:
        """The GPUs' dcgm series, a family at a time in the order the readings first name them, then holders and processes."""
        families: dict[str, list[str]] = {}
        holders: list[str] = []
        processes: list[str] = []
        for reading, device in zip(snapshot.devices, labels, strict=True):
            if not reading.up:
                continue
            identity = reading.identity
            if identity.uuid in owners:
                holders.append(f"{names.EXPORTER_GPU_HOLDERS}{device.gpu} {number(len(owners[identity.uuid]))}\n")
            for name, value in reading.values.items():
                lines = families.get(name)
                if lines is None:
                    lines = families[name] = [DEVICE_HEADERS[name]]
                text = f" {number(value)}\n"  # one number, written once for all its holders
                for series in device.series:
                    lines.append(name + series + text)
            for process in reading.processes:
                process_labels = label_set(((GPU_LABELS[0], str(identity.index)), (GPU_LABELS[1], identity.uuid),
                                            (names.EXPORTER_PID_LABEL, str(process.pid))))
                processes.append(f"{names.EXPORTER_PROCESS_MEMORY}{process_labels} {number(process.used_bytes)}\n")
        parts = ["".join(lines) for lines in families.values()]
        if holders:
            parts += [GPU_HOLDERS, *holders]
        if processes:
            parts += [PROCESS_MEMORY, *processes]
        return "".join(parts)


def podresources_text(cache: PodResourcesCache) -> str:
    """The DaemonSet's PodResources counts: failed List calls by gRPC code, and successful ones."""
    parts = [PODRESOURCES_ERRORS]
    for code, count in sorted(cache.errors.items()):
        parts.append(f"{names.EXPORTER_PODRESOURCES_ERRORS}_total{label_set(((names.EXPORTER_CODE_LABEL, code),))} "
                     f"{number(count)}\n")
    parts += [PODRESOURCES_REFRESHES, f"{names.EXPORTER_PODRESOURCES_REFRESHES}_total {number(cache.refreshes)}\n"]
    return "".join(parts)
