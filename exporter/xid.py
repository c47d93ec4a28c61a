"""Each GPU's XID events: a count by code that only grows, and dcgm-exporter's last-XID gauge with a way back to 0.

dcgm-exporter's `DCGM_FI_DEV_XID_ERRORS` holds the last XID for as long as the process lives,
so an alert on it never resolves. Here the gauge reads the last XID until `quiet_s` pass
without a new event, or until the GPU re-attaches (it was reported down and answers again),
then 0. The counter by code is what alerts should use, with `increase()`. Time is an
argument; kept by UUID so that it outlives NVML re-initialisation. The collection thread
records and the scrape thread reads, hence the lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from .devices import DeviceIdentity

DEFAULT_QUIET_S = 300.0  # --xid-quiet-period: a few minutes, enough for an alert to be seen on the gauge


@dataclass(frozen=True)
class LastXid:
    code: int
    at_s: float  # the reader's clock when it was seen


class XidHistory:
    """XID events by GPU: `record` them as they are read, then read `gauge` and `counts`."""

    def __init__(self, quiet_s: float) -> None:
        if not quiet_s > 0:
            raise ValueError(f"quiet_s must be above 0 seconds, got {quiet_s:g}")
        self.quiet_s = quiet_s
        self._counts: Counter[tuple[str, str, int]] = Counter()  # (gpu, UUID, xid) -> events
        self._last: dict[str, LastXid] = {}  # by UUID
        self._lock = threading.Lock()

    def record(self, identity: DeviceIdentity, code: int, now_s: float) -> None:
        with self._lock:
            self._counts[(str(identity.index), identity.uuid, code)] += 1
        self._last[identity.uuid] = LastXid(code, now_s)

    def reattached(self, uuid: str) -> None:
        """The GPU answers again after being down: what it reported before is history."""
        self._last.pop(uuid, None)

    def gauge(self, uuid: str, now_s: float) -> int:
        """dcgm-exporter's value: the last XID, or 0 when there was none within `quiet_s`."""
        last = self._last.get(uuid)
        if last is None or now_s - last.at_s >= self.quiet_s:
            return 0
        return last.code

    def counts(self) -> dict[tuple[str, str, int], int]:
        """Events so far by (gpu, UUID, xid); a copy, safe to read from another thread."""
        with self._lock:
            return dict(self._counts)
