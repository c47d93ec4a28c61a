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



# --- the capacity signal's measurements (issue 14) -----------------------------------------------


def capacity_scrape(pod: str, requested: float | None = None, requests: float | None = None,
                    capacity: float | None = None, startup: float | None = None, instance: str = "") -> str:
    """One pod's exposition of the worker's capacity families; a family left None is not exported."""
    labels = f'deployment="sd",pod="{pod}"' + (f',instance="{instance}"' if instance else "")
    families = [(names.REQUESTED_IMAGE_STEPS, "counter", "_total", requested),
                (names.REQUESTS, "counter", "_total", requests),
                (names.CAPACITY_IMAGE_STEPS, "gauge", "", capacity),
                (names.STARTUP_SECONDS, "gauge", "", startup)]
    return "".join(f"# TYPE {name} {kind}\n{name}{suffix}{{{labels}}} {value}\n"
                   for name, kind, suffix, value in families if value is not None)


def test_demand_and_arrivals_are_each_series_rate_summed():
    """`sum(rate(x[30s]))` at 60 over scrapes every 10 s: each series grows over the samples at
    40, 50 and 60 (the one at 30 is outside the window), per second of those 20 s. Prometheus
    extrapolates that to the window's edges (the first sample is within 1.1 intervals of the start),
    which gives the same rate; dividing by the 30 s window instead would read 13.3 and 3.3."""
    store = ScrapeStore(stale_after_s=30)
    for t in range(0, 61, 10):
        store.record(t, capacity_scrape("a", requested=20 * t, requests=t))
        store.record(t, capacity_scrape("b", requested=100 + 5 * t, requests=0.25 * t))
    answers = store.answers('deployment="sd"', window_s=30, now=60)
    assert answers[names.DEMAND] == pytest.approx(20 + 5)
    assert answers[names.ARRIVALS] == pytest.approx(1 + 0.25)
    assert store.answers('pod="b"', window_s=30, now=60)[names.DEMAND] == pytest.approx(5)


def test_a_counter_reset_counts_what_came_after_it():
    """A worker restarted between 40 and 50: 400 -> 50 is 50 image-steps, not -350."""
    store = ScrapeStore(stale_after_s=30)
    for t, value in ((30, 300), (40, 400), (50, 50), (60, 150)):
        store.record(t, capacity_scrape("a", requested=value))
    assert store.answers('deployment="sd"', window_s=30, now=60)[names.DEMAND] == pytest.approx((50 + 100) / 20)


def test_a_series_with_one_sample_in_the_window_gives_no_rate():
    store = ScrapeStore(stale_after_s=30)
    for t in (40, 50, 60):
        store.record(t, capacity_scrape("a", requested=10 * t))
    store.record(60, capacity_scrape("new", requested=500))  # first scraped at 60: no rate yet, as in Prometheus
    assert store.answers('deployment="sd"', window_s=30, now=60)[names.DEMAND] == pytest.approx(10)
    assert store.answers('pod="new"', window_s=30, now=60)[names.DEMAND] is None  # not 0


def test_capacity_measurements_matching_no_series_are_none_not_zero():
    store = ScrapeStore(stale_after_s=30)
    for t in (40, 50, 60):
        store.record(t, capacity_scrape("a", requested=10 * t, requests=t, capacity=130, startup=30))
    answers = store.answers('deployment="other"', window_s=30, now=60)
    assert [answers[q] for q in names.CAPACITY_QUERIES] == [None] * 4
    # a fleet whose workers export no capacity families yet: the queries answer nothing
    store.record(60, scrape(1, 1, 50, (0, 0, 0), pod="old"))
    answers = store.answers('pod="old"', window_s=30, now=60)
    assert answers[names.QUEUE] == 1 and [answers[q] for q in names.CAPACITY_QUERIES] == [None] * 4


def test_capacity_and_startup_are_the_mean_of_each_replicas_latest_sample():
    store = ScrapeStore(stale_after_s=30)
    for t, capacity_a in ((40, 110), (50, 120), (60, 130)):  # a's estimate moves: only the latest counts
        store.record(t, capacity_scrape("a", capacity=capacity_a, startup=30))
        store.record(t, capacity_scrape("b", capacity=150, startup=50))
    answers = store.answers('deployment="sd"', window_s=30, now=60)
    assert answers[names.CAPACITY] == pytest.approx((130 + 150) / 2)
    assert answers[names.STARTUP] == pytest.approx((30 + 50) / 2)


def test_a_stale_replica_drops_out_of_capacity_and_startup():
    """Not scraped for the lookback (`stale_after_s`), or marked stale (a failed scrape, a pod
    removed from the file): its last capacity and start-up no longer count in the mean."""
    store = ScrapeStore(stale_after_s=30)
    store.record(0, capacity_scrape("gone", capacity=50, startup=300, instance="10.0.0.1:8000"))
    store.record(50, capacity_scrape("failed", capacity=60, startup=200, instance="10.0.0.2:8000"))
    store.mark_stale("10.0.0.2:8000", 55)
    store.record(55, capacity_scrape("here", capacity=130, startup=30, instance="10.0.0.3:8000"))
    answers = store.answers('deployment="sd"', window_s=30, now=60)
    assert (answers[names.CAPACITY], answers[names.STARTUP]) == (130, 30)
    store.mark_stale("10.0.0.3:8000", 60)
    answers = store.answers('deployment="sd"', window_s=30, now=60)
    assert (answers[names.CAPACITY], answers[names.STARTUP]) == (None, None)


@pytest.mark.parametrize(("pod", "samples", "prometheus_rate"), [
    # joined at 50, counter from 0, 10/s: increase 100 over the 10 s sampled, the zero point at the
    # first sample, so nothing extrapolated before it and 0 s after it: 100 x 10 / 10 / 30
    ("joined", ((50, 0), (55, 50), (60, 100)), 100 / 30),
    # left after 40 (marked stale at 45), 10/s: increase 50 over 5 s, extrapolated 5 s to the start
    # (within 1.1 intervals) and half an interval after the end (20 s away): 50 x 12.5 / 5 / 30
    ("left", ((35, 350), (40, 400)), 50 * 12.5 / 5 / 30),
], ids=["joined", "left"])
def test_a_replica_inside_the_window_counts_as_prometheus_extrapolates_it(pod, samples, prometheus_rate):
    """Prometheus' `extrapolatedRate` (promql/functions.go): the increase over the sampled
    interval, extended to the window's edges only where the first or last sample lies within
    1.1 average intervals of them (else by half an interval), then divided by the window."""
    store = ScrapeStore(stale_after_s=30)
    for t in range(30, 61, 5):
        store.record(t, capacity_scrape("steady", requested=1000 + 20 * t, instance="steady:8000"))
    for t, value in samples:
        store.record(t, capacity_scrape(pod, requested=value, instance=f"{pod}:8000"))
    store.mark_stale("left:8000", 45)
    demand = store.answers('deployment="sd"', window_s=30, now=60)[names.DEMAND]
    assert demand == pytest.approx(20 + prometheus_rate)  # the steady replica's 20, extrapolated to the edges


def test_a_scrape_whose_connection_the_pod_closes_before_answering_is_tried_once_more():
    """A pod (uvicorn) closes an idle keep-alive connection as the scaler reuses it: the GET is
    lost with "Server disconnected". The scrape is tried once more on a new connection (aiohttp
    does that for an idempotent GET) instead of marking the pod's series stale; a pod that keeps
    closing is a failed scrape (None), in bounded tries. The scaler's connections also idle out
    at 2 s, under uvicorn's 5 s, so the race is rare to begin with."""
    import asyncio

    from adapter.directscrape import DirectSignalReader

    body = b"diffusion_ready 1\n"

    async def go(closes: int) -> tuple[str | None, int]:
        seen = 0

        async def handle(reader, writer):
            nonlocal seen
            await reader.readuntil(b"\r\n\r\n")
            seen += 1
            if seen <= closes:
                writer.close()  # gone before an answer
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader = DirectSignalReader()
        try:
            return await reader._fetch(f"127.0.0.1:{port}", 2.0), seen
        finally:
            await reader.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(go(closes=1)) == (body.decode(), 2)
    text, tries = asyncio.run(go(closes=100))
    assert text is None and tries == 2
