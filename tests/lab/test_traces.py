"""Arrivals from published traces and seeded scenarios."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.sim.traces import SCENARIOS, TraceError, load_trace, parse_timestamp, synthetic

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces"


def test_timestamps_with_seven_fractional_digits_and_epoch_seconds():
    assert parse_timestamp("2023-11-16 18:17:03.9799600") - parse_timestamp("2023-11-16 18:17:03") == pytest.approx(0.97996)
    assert parse_timestamp("1700158623.5") == 1700158623.5
    assert parse_timestamp("2023-11-16T18:17:03Z") == parse_timestamp("2023-11-16 18:17:03")


@pytest.mark.parametrize("name", ["AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv"])
def test_the_shared_azure_traces_load_as_they_are(name):
    path = SHARED / name
    if not path.exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{path} is missing")
    arrivals = load_trace(path)
    assert arrivals[0].t_s == 0 and all(a.t_s <= b.t_s for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert len(arrivals) > 8000 and 3000 < arrivals[-1].t_s < 4000  # about an hour
    faster = load_trace(path, time_scale=2.0)
    assert faster[-1].t_s == pytest.approx(arrivals[-1].t_s / 2)


def test_per_request_columns_and_errors_that_name_the_row(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("when,n,steps\n100.5,2,30\n100.0,1,20\n")
    arrivals = load_trace(trace, time_column="when", images_column="n", steps_column="steps")
    assert [(a.t_s, a.images, a.steps) for a in arrivals] == [(0.0, 1, 20), (0.5, 2, 30)]
    with pytest.raises(TraceError, match="no column 'TIMESTAMP'; the columns are when, n, steps"):
        load_trace(trace)
    trace.write_text("when,n\n100,2\nyesterday,1\n")
    with pytest.raises(TraceError, match="row 3"):
        load_trace(trace, time_column="when")
    trace.write_text("when,n\n100,0\n")
    with pytest.raises(TraceError, match="at least 1"):
        load_trace(trace, time_column="when", images_column="n")


@pytest.mark.parametrize("kind", SCENARIOS)
def test_scenarios_are_reproducible_by_seed_and_keep_their_rate(kind):
    first = synthetic(kind, 3600, base_rps=2, peak_rps=10, seed=5)
    assert first == synthetic(kind, 3600, base_rps=2, peak_rps=10, seed=5)
    assert first != synthetic(kind, 3600, base_rps=2, peak_rps=10, seed=6)
    expected = {"step": 0.3 * 2 + 0.7 * 10, "spike": 0.9 * 2 + 0.1 * 10, "diurnal": 6, "onoff": (2 * 2 + 10) / 3}[kind]
    assert len(first) / 3600 == pytest.approx(expected, rel=0.05)


def test_a_step_actually_steps():
    arrivals = synthetic("step", 1000, base_rps=1, peak_rps=20, seed=1)
    before = sum(1 for a in arrivals if a.t_s < 300) / 300
    after = sum(1 for a in arrivals if a.t_s >= 300) / 700
    assert before == pytest.approx(1, rel=0.2) and after == pytest.approx(20, rel=0.05)
