"""XID events: counted by code for alerts, and dcgm-exporter's last-XID gauge with a way back to 0."""

from __future__ import annotations

import pytest

from contract import names
from exporter.devices import DeviceIdentity
from exporter.xid import XidHistory

from .test_config import config_of
from .test_reader import H100, SECOND, reader_for
from .fakenvml import FakeGpu

GPU0 = DeviceIdentity(0, H100, "00000000:01:00.0", "nvidia0", "H100")
MINUTE = 60.0


@pytest.mark.parametrize(("events", "reattached_at", "at", "gauge"), [
    ([], None, 0, 0),
    ([(31, 0)], None, 0, 31),
    ([(31, 0)], None, 299, 31),
    ([(31, 0)], None, 300, 0),  # a quiet period without an event: back to 0
    ([(31, 0), (79, 200)], None, 400, 79),  # the quiet period counts from the last event
    ([(31, 0), (79, 200)], None, 500, 0),
    ([(31, 0)], 10, 11, 0),  # re-attached: the old event no longer describes the GPU
    ([(31, 0), (43, 20)], 10, 21, 43),  # an event after the re-attach does
])
def test_the_gauge_reads_the_last_xid_until_quiet_or_reattached(events, reattached_at, at, gauge):
    history = XidHistory(quiet_s=300)
    for code, when in events:
        if reattached_at is not None and when > reattached_at >= 0:
            history.reattached(H100)
            reattached_at = -1
        history.record(GPU0, code, when)
    if reattached_at is not None and reattached_at >= 0:
        history.reattached(H100)
    assert history.gauge(H100, at) == gauge


def test_the_count_by_code_only_grows():
    history = XidHistory(quiet_s=1)
    for code, when in [(31, 0), (31, 5), (79, 6)]:
        history.record(GPU0, code, when)
    history.reattached(H100)
    assert history.counts() == {("0", H100, 31): 2, ("0", H100, 79): 1}


def test_a_quiet_period_must_be_positive():
    with pytest.raises(ValueError, match="quiet_s"):
        XidHistory(quiet_s=0)


def test_the_issue_case_one_xid_then_minutes_healthy_then_a_brief_loss():
    """XID 31 once; healthy for minutes; the GPU briefly lost, then back."""
    gpu = FakeGpu(H100, xids=[31])
    reader, _, clock = reader_for(gpu)
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 31
    clock.now += 2 * MINUTE
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 31  # within the default quiet time
    clock.now += 4 * MINUTE
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 0  # quiet for longer than 5 minutes
    assert reader.xids.counts() == {("0", H100, 31): 1}

    gpu.xids.append(31)
    clock.now += 1
    assert reader.collect().devices[0].values[names.XID_ERRORS] == 31
    gpu.lost = True
    clock.now += 1
    assert not reader.collect().devices[0].up
    gpu.lost = False
    clock.now += 2
    back = reader.collect()
    assert back.devices[0].up and back.devices[0].values[names.XID_ERRORS] == 0  # re-attached
    assert reader.xids.counts() == {("0", H100, 31): 2}  # the events stay counted


def test_events_survive_nvml_reinitialisation_and_are_kept_per_gpu():
    first, second = FakeGpu(H100, xids=[13]), FakeGpu(SECOND, minor=1, xids=[79, 79])
    reader, nvml, clock = reader_for(first, second)
    reader.collect()
    second.lost = True
    reader.collect()
    second.lost = False
    clock.now += 2
    reader.collect()
    assert nvml.init_calls == 2
    assert reader.xids.counts() == {("0", H100, 13): 1, ("1", SECOND, 79): 2}


def test_the_quiet_period_has_a_flag_and_an_environment_variable(monkeypatch):
    monkeypatch.delenv("EXPORTER_XID_QUIET_PERIOD", raising=False)
    assert config_of().xid_quiet_s == 300
    assert config_of("--xid-quiet-period", "60").xid_quiet_s == 60
    monkeypatch.setenv("EXPORTER_XID_QUIET_PERIOD", "120")
    assert config_of().xid_quiet_s == 120


def test_the_counter_is_served_with_total_and_the_gauge_clears(start_exporter):
    running = start_exporter([FakeGpu(H100, xids=[31, 31, 79])], flags=["--xid-quiet-period", "0.5"])
    running.wait_for(lambda: running.value(names.EXPORTER_XID_EVENTS + "_total", xid="31") == 2)
    assert running.value(names.EXPORTER_XID_EVENTS + "_total", gpu="0", UUID=H100, xid="79") == 1
    running.wait_for(lambda: running.value(names.XID_ERRORS, UUID=H100) == 0)
    assert running.value(names.EXPORTER_XID_EVENTS + "_total", xid="31") == 2
