"""The direct-scrape source's PromQL arithmetic, as tables."""

from __future__ import annotations

import math

import pytest

from adapter.directscrape import ScrapeStore, histogram_quantile, increase, matches
from adapter.promql import parse_selector
from contract import names

INF = math.inf


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.95, [(1, 0), (2, 100), (INF, 100)], 1.95),  # inside the (1, 2] bucket
    (0.5, [(1, 50), (2, 100), (INF, 100)], 1.0),  # exactly the first bucket's count
    (0.25, [(1, 100), (INF, 100)], 0.25),  # the first bucket starts at 0
    (0.95, [(1, 10), (2, 20), (INF, 100)], 2.0),  # beyond the last finite bucket: its bound
    (0.95, [(1, 0), (INF, 0)], math.nan),  # nothing observed
    (0.5, [(1, 0)], math.nan),  # no +Inf bucket
    (0.5, [(2, 40), (1, 50), (INF, 100)], 1.0),  # unsorted; the dip at le=2 is repaired to 50
])
def test_histogram_quantile_follows_prometheus(q, buckets, expected):
    result = histogram_quantile(q, buckets)
    assert (math.isnan(result) and math.isnan(expected)) or result == pytest.approx(expected)


def test_increase_counts_across_a_counter_reset():
    assert increase([(0, 10), (1, 15), (2, 3), (3, 5)]) == 5 + 3 + 2
    assert increase([(0, 10)]) is None


def test_selectors_match_like_promql_label_matchers():
    matchers = parse_selector('namespace="ml", deployment=~"sd-.*",pod!="b",zone!~"eu-.*"')
    assert matches({"namespace": "ml", "deployment": "sd-worker", "pod": "a", "zone": "us-1"}, matchers)
    assert not matches({"namespace": "ml", "deployment": "other", "pod": "a"}, matchers)
    assert not matches({"namespace": "ml", "deployment": "sd-x", "pod": "b"}, matchers)
    assert not matches({"namespace": "ml", "deployment": "sd-x", "pod": "a", "zone": "eu-2"}, matchers)
    assert parse_selector("") == ()
    with pytest.raises(ValueError, match="cannot read label matchers"):
        parse_selector("namespace=ml")


def scrape(in_flight: float, ready: float, gpu: float, counts: tuple[float, float, float], pod: str = "a") -> str:
    fast, slow, total = counts
    return f"""# TYPE {names.REQUESTS_IN_FLIGHT} gauge
{names.REQUESTS_IN_FLIGHT}{{deployment="sd",pod="{pod}"}} {in_flight}
# TYPE {names.READY} gauge
{names.READY}{{deployment="sd",pod="{pod}"}} {ready}
# TYPE {names.GPU_UTIL} gauge
{names.GPU_UTIL}{{deployment="sd",pod="{pod}",gpu="0"}} {gpu}
# TYPE {names.REQUEST_DURATION} histogram
{names.REQUEST_DURATION}_bucket{{deployment="sd",pod="{pod}",le="1.0"}} {fast}
{names.REQUEST_DURATION}_bucket{{deployment="sd",pod="{pod}",le="2.0"}} {slow}
{names.REQUEST_DURATION}_bucket{{deployment="sd",pod="{pod}",le="+Inf"}} {total}
{names.REQUEST_DURATION}_count{{deployment="sd",pod="{pod}"}} {total}
{names.REQUEST_DURATION}_sum{{deployment="sd",pod="{pod}"}} 0
"""


def test_signals_from_scrapes_over_the_window():
    store = ScrapeStore(stale_after_s=30)
    for t in range(0, 61, 10):
        store.record(t, scrape(3, 1, 40 + t, (t, 2 * t, 2 * t), pod="a"))
        store.record(t, scrape(5, 1, 80, (0, 0, 0), pod="b"))
    answers = store.answers('deployment="sd"', window_s=30, now=60)
    assert answers[names.QUEUE] == 8 and answers[names.READY_REPLICAS] == 2
    assert answers[names.GPU] == pytest.approx(((90 + 100 + 80) / 3 + 80) / 2)  # samples at 40, 50, 60 for pod a
    # increases in (30, 60]: le=1 +20, le=2 +40, +Inf +40; rank 38 lies in (1, 2]: 1 + (38 - 20) / 20
    assert answers[names.LATENCY] == pytest.approx(1.9)
    assert store.answers('deployment="other"', window_s=30, now=60)[names.QUEUE] is None


def test_a_target_not_scraped_for_the_lookback_drops_out():
    store = ScrapeStore(stale_after_s=30)
    store.record(0, scrape(7, 1, 50, (1, 1, 1), pod="gone"))
    store.record(50, scrape(2, 1, 50, (1, 1, 1), pod="here"))
    assert store.answers('deployment="sd"', window_s=30, now=50)[names.QUEUE] == 2


def test_single_quoted_matchers_read_as_promql_reads_them():
    assert parse_selector("namespace='ml', deployment=~'sd-.*'") == (("namespace", "=", "ml"), ("deployment", "=~", "sd-.*"))
    with pytest.raises(ValueError, match="not a regular expression"):
        parse_selector('deployment=~"sd-("')


@pytest.mark.parametrize(
    ("selector", "parsed"),
    [
        ('pod="café"', (("pod", "=", "café"),)),  # UTF-8 stays UTF-8
        (r'a=~"x\\.y"', (("a", "=~", r"x\.y"),)),  # PromQL's escaped backslash
        (r'b="q\"z"', (("b", "=", 'q"z'),)),  # an escaped quote
    ],
)
def test_label_values_unescape_as_promql_strings_do(selector, parsed):
    assert parse_selector(selector) == parsed


@pytest.mark.parametrize("regex", ["x(?=y)", "(?<!x)y", r"(x)\\1", r"\\pL+"])
def test_a_regex_one_source_cannot_read_is_refused(regex):
    """RE2 (Prometheus) has no lookaround or backreferences; Python's re (the direct scrape) has
    no \\p classes: either source failing it for ever is refused up front instead."""
    with pytest.raises(ValueError, match="RE2|both sources"):
        parse_selector(f'a=~"{regex}"')

