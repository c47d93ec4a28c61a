"""The capacity signal's built-in PromQL (issue 14): texts with and without a selector, and their overrides."""

from __future__ import annotations

import pytest

from adapter.config import MetadataError, parse_metadata
from adapter.promql import builtin_queries


def test_the_capacity_queries_read_the_workers_series_through_the_selector():
    queries = builtin_queries('namespace="ml",deployment="sd-worker"', "30s")
    sel = '{namespace="ml",deployment="sd-worker"}'
    assert queries.demand == f"sum(rate(diffusion_requested_image_steps_total{sel}[30s]))"
    assert queries.arrivals == f"sum(rate(diffusion_requests_total{sel}[30s]))"
    assert queries.capacity == f"avg(diffusion_capacity_image_steps_per_second{sel})"
    assert queries.startup == f"avg(diffusion_startup_seconds{sel})"


@pytest.mark.parametrize("selector", ["", "  ", 'namespace="ml",'])
def test_without_a_selector_the_capacity_queries_read_every_series(selector):
    """No selector is no braces at all; a trailing comma is dropped (`{namespace="ml"}`)."""
    queries = builtin_queries(selector, "1m")
    sel = '{namespace="ml"}' if selector.strip() else ""
    assert (queries.demand, queries.arrivals, queries.capacity, queries.startup) == (
        f"sum(rate(diffusion_requested_image_steps_total{sel}[1m]))",
        f"sum(rate(diffusion_requests_total{sel}[1m]))",
        f"avg(diffusion_capacity_image_steps_per_second{sel})",
        f"avg(diffusion_startup_seconds{sel})",
    )


def test_metadata_builds_the_capacity_queries_from_selector_and_window():
    spec = parse_metadata({"prometheusAddress": "http://p:9090", "selector": 'deployment="sd"', "window": "2m",
                           "signals": "capacity"})
    assert spec.queries.demand == 'sum(rate(diffusion_requested_image_steps_total{deployment="sd"}[2m]))'
    assert spec.queries.startup == 'avg(diffusion_startup_seconds{deployment="sd"})'


def test_capacity_query_overrides_replace_only_their_own_builtin():
    overrides = {"demandQuery": "sum(rate(gateway_requested_image_steps_total[1m]))",
                 "arrivalsQuery": "sum(rate(gateway_jobs_accepted_total[1m]))",
                 "capacityQuery": "min(diffusion_capacity_image_steps_per_second)",
                 "startupQuery": "max(diffusion_startup_seconds)"}
    for key, query in overrides.items():
        spec = parse_metadata({"prometheusAddress": "http://p:9090", "signals": "capacity", key: query})
        builtin = builtin_queries("", "1m")
        field = key.removesuffix("Query")
        assert getattr(spec.queries, field) == query
        others = [f for f in ("demand", "arrivals", "capacity", "startup", "queue", "ready") if f != field]
        assert all(getattr(spec.queries, f) == getattr(builtin, f) for f in others)


def test_capacity_query_overrides_are_refused_without_prometheus(tmp_path):
    (tmp_path / "pods.json").write_text("[]")
    with pytest.raises(MetadataError, match="capacityQuery.*query overrides need prometheusAddress"):
        parse_metadata({"scrapeTargetsFile": "pods.json", "capacityQuery": "avg(x)"}, scrape_targets_dir=str(tmp_path))
