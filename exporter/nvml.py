"""The NVML session: init with backoff, device discovery, and one `Snapshot` per `collect()`.

This module, `exporter/devices.py` and `exporter/fields.py` are the exporter's only NVML code,
all of it through the `pynvml` module passed in (a fake one in tests). Faults, by kind:
- a value NVML does not support is omitted (`fields.py`); another error on one call is counted
  and that value omitted;
- a GPU that reports itself lost or in need of reset, or whose every read fails, is marked
  down, its values dropped, and NVML is re-initialised with backoff until it answers again;
- an error that means the library or driver is gone (`fields.LIBRARY_ERRORS`), or no GPU
  answering at all, marks NVML down (`nvml_up` false, every GPU down), shuts NVML down and
  re-initialises it with backoff, so the exporter recovers by itself when the driver returns;
- a missing library or driver at start is the same: retried with backoff, never a crash.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from contract import names

from .devices import DeviceFilter, DeviceIdentity, identify, text
from .fields import DeviceLost, DeviceState, DeviceUnreachable, LibraryGone, read_device, start_device, stop_device
from .snapshot import DeviceReading, Snapshot
from .xid import DEFAULT_QUIET_S, XidHistory

log = logging.getLogger("exporter.nvml")


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
        xid_quiet_s: float = DEFAULT_QUIET_S,
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
        self._devices: list[DeviceState] = []
        self._known: dict[str, DeviceIdentity] = {}  # every GPU seen, by UUID, to report it down
        self._down: set[str] = set()
        self._retry_at = 0.0
        self._backoff_s = backoff_initial_s
        self._last_error: str | None = None
        self.xids = XidHistory(xid_quiet_s)
        self._reported_down: set[str] = set()  # UUIDs down in the last snapshot: up again is a re-attach

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
        readings: list[DeviceReading] = []
        problems: list[str] = []  # GPUs lost or unreachable: NVML is re-initialised after the backoff
        answered = False  # a GPU answered, or NVML said why it cannot (lost): the library works
        try:
            for state in self._devices:
                identity = state.identity
                try:
                    reading = read_device(self.nvml, state, self.errors, self.per_process)
                except (DeviceLost, DeviceUnreachable) as error:
                    answered = answered or isinstance(error, DeviceLost)
                    self._down.add(identity.uuid)
                    kind = "lost" if isinstance(error, DeviceLost) else "does not answer"
                    problems.append(f"GPU {identity.index} ({identity.uuid}) {kind}: {error}")
                    reading = DeviceReading(identity, up=False)
                else:
                    answered = True
                    self._down.discard(identity.uuid)
                    if identity.uuid in self._reported_down:
                        self.xids.reattached(identity.uuid)  # before this collection's events
                self._record_xids(state, started)
                readings.append(self._with_xid_gauge(state, reading, started))
        except LibraryGone as error:
            for state in self._devices:
                self._record_xids(state, started)  # the events drained so far still count
            self._shutdown()
            self._note_failure(f"NVML stopped answering: {error}")
            return self._unavailable(taken_at, started)
        if self._devices and not answered:
            # Every GPU failed without NVML naming a device fault (UNKNOWN on every call, say):
            # the library or driver is the common cause, and only a new session can tell. (No
            # device at all after a re-init is not that: NVML answered init and the count, and
            # a GPU skipped at enumeration is reported down below.)
            self._shutdown()
            self._note_failure("; ".join(["NVML answers for none of the GPUs", *problems]))
            return self._unavailable(taken_at, started)
        if problems:
            self._note_failure("; ".join(problems))
        present = {state.identity.uuid for state in self._devices}
        for uuid, identity in self._known.items():
            if uuid not in present:
                readings.append(DeviceReading(identity, up=False))
        if problems or any(uuid not in present for uuid in self._known):
            self._schedule_retry(started)
        elif not self._down:
            self._backoff_s = self.backoff_initial_s
            if self._last_error is not None:
                log.info("NVML and every GPU answer again")
                self._last_error = None
        readings.sort(key=lambda reading: reading.identity.index)
        return self._finish(Snapshot(
            taken_at=taken_at, duration_s=self.clock() - started, nvml_up=True,
            driver_version=self._driver_version, hostname=self.hostname, devices=tuple(readings),
        ))

    def _record_xids(self, state: DeviceState, now: float) -> None:
        # Events drained before a fault are still counted: the state does not survive a re-init.
        for code in state.new_xids:
            self.xids.record(state.identity, code, now)
        state.new_xids.clear()

    def _with_xid_gauge(self, state: DeviceState, reading: DeviceReading, now: float) -> DeviceReading:
        if not reading.up or "xid" in state.unsupported:
            return reading
        gauge = self.xids.gauge(state.identity.uuid, now)
        return DeviceReading(reading.identity, up=True, processes=reading.processes,
                             values={**reading.values, names.XID_ERRORS: gauge})

    def _finish(self, snapshot: Snapshot) -> Snapshot:
        self._reported_down = {reading.identity.uuid for reading in snapshot.devices if not reading.up}
        return snapshot

    def close(self) -> None:
        self._shutdown()

    def _unavailable(self, taken_at: float, started: float) -> Snapshot:
        """NVML down: every GPU known so far is reported down."""
        devices = tuple(DeviceReading(identity, up=False) for identity in self._known.values())
        self._reported_down = set(self._known)
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
            self._driver_version = text(nvml.nvmlSystemGetDriverVersion())
            devices = []
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = text(nvml.nvmlDeviceGetUUID(handle))
                    if not visible.admits(index, uuid):
                        continue
                    identity = identify(nvml, handle, index, uuid)
                except nvml.NVMLError as error:
                    # One broken GPU must not hide the others; a known one is reported down.
                    log.debug("GPU %d does not answer at init: %s", index, error)
                    continue
                devices.append(DeviceState(handle, identity))
                self._known[uuid] = identity
            self._devices = devices
            for state in devices:
                start_device(nvml, state)
        except nvml.NVMLError:
            self._shutdown()
            raise
        log.info("NVML %s: exporting %d GPUs", self._driver_version, len(self._devices))

    def _shutdown(self) -> None:
        if self._initialized:
            for state in self._devices:
                stop_device(self.nvml, state)
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
        self._initialized = False
        self._devices = []
