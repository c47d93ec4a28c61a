"""The scaler's per-target gauges for the capacity signal's measurements (issue 14)."""

from __future__ import annotations

import pytest

from adapter.config import parse_metadata
from adapter.metrics import TargetCollector
from adapter.reading import QueryOutcome, to_reading
from adapter.targets import Target
from contract import names

LABELS = {"namespace": "ml", "scaledobject": "sd", "metric": "composite"}
CAPACITY_GAUGES = (names.SCALER_DEMAND, names.SCALER_CAPACITY, names.SCALER_STARTUP)


def target(**metadata: str) -> Target:
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "metricName": "composite", **metadata})
    return Target(("ml", "sd", ()), "ml", "sd", spec, now=0)


def reading(demand: float | None, arrivals: float | None = 5.0, capacity: float | None = 130.0,
            startup: float | None = 30.0):
    answers = {names.QUEUE: 3.0, names.READY_REPLICAS: 2.0, names.DEMAND: demand, names.ARRIVALS: arrivals,
               names.CAPACITY: capacity, names.STARTUP: startup}
    return to_reading(tuple(QueryOutcome(name, 0.01, value) for name, value in answers.items()), ())


def scrape(*targets: Target, now: float) -> dict[str, dict[tuple, float]]:
    """Each family's samples at `now`, by sorted labels."""
    collected = TargetCollector(lambda: list(targets), clock=lambda: now).collect()
    return {family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples} for family in collected}


def value(families: dict[str, dict[tuple, float]], name: str) -> float | None:
    """The one target's sample of a family, None when the family has none."""
    samples = families[name]
    assert len(samples) <= 1
    return samples.get(tuple(sorted(LABELS.items())))


def test_the_capacity_gauges_carry_the_snapshots_measurements():
    so = target(signals="queue,capacity")
    so.apply(reading(demand=208.0, capacity=130.0, startup=31.5), now=0)
    families = scrape(so, now=1)
    assert [value(families, name) for name in CAPACITY_GAUGES] == [208.0, 130.0, 31.5]
    assert value(families, names.SCALER_DEMAND_TREND) == 0.0  # one point: no slope yet


@pytest.mark.parametrize(("missing", "gauge"), [
    ("demand", names.SCALER_DEMAND), ("capacity", names.SCALER_CAPACITY), ("startup", names.SCALER_STARTUP),
])
def test_a_measurement_that_is_none_has_no_sample_not_zero(missing, gauge):
    so = target(signals="queue,capacity")
    so.apply(reading(**{"demand": 208.0, missing: None}), now=0)
    families = scrape(so, now=1)
    assert value(families, gauge) is None
    assert all(value(families, other) is not None for other in CAPACITY_GAUGES if other != gauge)
    if missing == "demand":
        assert value(families, names.SCALER_DEMAND_TREND) is None  # no demand, no trend of it


def test_the_trend_gauge_is_the_demand_slope_over_the_trend_window():
    so = target(signals="queue,capacity", trendWindowSeconds="60")
    for t, demand in ((0, 100.0), (10, 150.0), (20, 200.0)):
        so.apply(reading(demand=demand), now=t)
    assert value(scrape(so, now=21), names.SCALER_DEMAND_TREND) == pytest.approx(5.0)  # image-steps/s per second


def test_the_trend_gauge_only_with_the_capacity_signal():
    """spareAboveLoad reads the measurements (their gauges show) but fits no trend."""
    so = target(signals="queue", spareAboveLoad="0.2")
    for t, demand in ((0, 100.0), (10, 150.0)):
        so.apply(reading(demand=demand), now=t)
    families = scrape(so, now=11)
    assert value(families, names.SCALER_DEMAND) == 150.0
    assert value(families, names.SCALER_DEMAND_TREND) is None


def test_without_the_capacity_queries_there_are_no_capacity_gauges():
    so = target(signals="queue")
    counts = (QueryOutcome(names.QUEUE, 0.01, 3.0), QueryOutcome(names.READY_REPLICAS, 0.01, 2.0))
    so.apply(to_reading(counts, ()), now=0)
    families = scrape(so, now=1)
    assert value(families, names.SCALER_QUEUE) == 3.0  # the target is exported, but none of these
    assert all(value(families, name) is None for name in CAPACITY_GAUGES + (names.SCALER_DEMAND_TREND,))


def test_every_family_the_collector_builds_is_a_scaler_metric_of_the_contract():
    """The docs, the dashboard check and the rules read `names.SCALER_METRICS`: a family missing
    there is one they cannot know of (the four capacity gauges were, at first)."""
    so = target(signals="queue,capacity")
    so.apply(reading(demand=208.0), now=0)
    built = set(scrape(so, now=1))
    assert {names.SCALER_DEMAND, names.SCALER_DEMAND_TREND} <= built
    assert built - set(names.SCALER_METRICS) == set()
