"""The direct-scrape source agrees with Prometheus: on the same pods, scraped side by side, and on
the same samples, loaded into both."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest
import requests

from adapter.directscrape import ScrapeStore
from adapter.promql import builtin_queries
from contract import names
from lab.localprom import LocalPrometheus
from lab.synthetic import PodLoad

from .conftest import eventually, require_prometheus, wait_until_scraped

pytestmark = pytest.mark.integration


def test_direct_signals_match_prometheus_on_the_same_data(fleet, prometheus, deployment):
    fleet.set_pod("ml", deployment, "a", PodLoad(queue=3, gpu_util_percent=40, request_duration_s=1.5, requests_per_s=10))
    fleet.set_pod("ml", deployment, "b", PodLoad(queue=5, gpu_util_percent=80, request_duration_s=4.0, requests_per_s=5))
    fleet.set_pod("ml", deployment, "c", PodLoad(queue=0, ready=False))
    selector = f'namespace="ml",deployment="{deployment}"'
    store = ScrapeStore()
    stop = threading.Event()

    def scrape_like_prometheus():
        while not stop.is_set():
            text = requests.get(f"http://{fleet.address}/metrics", timeout=2).text
            store.record(time.time(), text)
            stop.wait(1.0)

    scraper = threading.Thread(target=scrape_like_prometheus, daemon=True)
    scraper.start()
    try:
        wait_until_scraped(prometheus, deployment)
        time.sleep(12)  # both sources hold ten seconds of history
        queries = builtin_queries(selector, "10s")

        def prometheus_value(promql: str, at: float) -> float | None:
            answer = requests.get(f"{prometheus.url}/api/v1/query", params={"query": promql, "time": at}, timeout=5).json()
            result = answer["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        def agree():
            now = time.time()
            direct = store.answers(selector, window_s=10, now=now)
            assert direct[names.QUEUE] == prometheus_value(queries.queue, now) == 8
            assert direct[names.READY_REPLICAS] == prometheus_value(queries.ready, now) == 2
            assert direct[names.GPU] == pytest.approx(prometheus_value(queries.gpu, now)) == 60
            # p95 of 10 rps at 1.5 s and 5 rps at 4 s lies in the (3, 5] bucket
            expected = prometheus_value(queries.latency, now)
            assert 3 < expected <= 5
            assert direct[names.LATENCY] == pytest.approx(expected, rel=0.05)

        eventually(agree, timeout_s=15, interval_s=1.0)
    finally:
        stop.set()
        scraper.join(5)
        for pod in "abc":
            fleet.remove_pod("ml", deployment, pod)


# --- the capacity signal's measurements, on the very same samples (issue 14) ---------------------
#
# Prometheus reads them from a block written by `promtool tsdb create-blocks-from openmetrics`, the
# direct store from the same samples as exposition text, and both answer the built-in queries at
# the same instant, so they must agree to float precision wherever direct scraping follows PromQL.

WINDOW_S, STEP_S = 30, 5
COUNTERS = (names.REQUESTED_IMAGE_STEPS, names.REQUESTS)  # demand, arrivals: 20 image-steps a request
GAUGES = (names.CAPACITY_IMAGE_STEPS, names.STARTUP_SECONDS)


def scrapes(since: int, until: int, rate: float, capacity: float = 130.0, startup: float = 30.0,
            start: float = 1000.0) -> list[tuple[int, dict[str, float]]]:
    """One replica scraped every 5 s from `since` to `until` (seconds before the query's instant),
    its demand counter growing `rate` image-steps per second from `start`."""
    counted = [(t, start + rate * (t - since)) for t in range(since, until + 1, STEP_S)]
    return [(t, {names.REQUESTED_IMAGE_STEPS: steps, names.REQUESTS: steps / 20,
                 names.CAPACITY_IMAGE_STEPS: capacity, names.STARTUP_SECONDS: startup}) for t, steps in counted]


# case -> pod -> scrapes; the window (30 s) holds the scrapes at -27 ... -2
CASES = {
    "steady": {"a": scrapes(-62, -2, rate=12.0, capacity=130.0, startup=31.0),
               "b": scrapes(-62, -2, rate=3.0, capacity=140.0, startup=45.0),
               "gone": scrapes(-420, -400, rate=9.0, capacity=50.0, startup=300.0)},  # beyond the 5 m lookback
    "reset": {"a": scrapes(-62, -22, rate=12.0) + scrapes(-17, -2, rate=12.0, start=20.0)},  # restarted at -20
    "lone": {"a": scrapes(-62, -2, rate=12.0), "new": scrapes(-2, -2, rate=12.0, capacity=110.0)},  # one scrape
    "joined": {"a": scrapes(-62, -2, rate=12.0), "new": scrapes(-12, -2, rate=10.0, start=0.0)},  # 12 s ago
    "left": {"a": scrapes(-62, -2, rate=12.0), "old": scrapes(-62, -22, rate=10.0)},  # last scraped 22 s ago
}


def exposition(case_scrapes: dict[str, dict[str, list]], at: int | None) -> str:
    """The samples as exposition text: OpenMetrics with timestamps for promtool (`at` None), or one
    scrape's text at offset `at` for the direct store."""
    lines = []
    for family in COUNTERS + GAUGES:
        kind, suffix = ("counter", "_total") if family in COUNTERS else ("gauge", "")
        lines.append(f"# TYPE {family} {kind}")
        for case, pods in case_scrapes.items():
            for pod, samples in pods.items():
                for t, values in samples:
                    if at is None:
                        lines.append(f'{family}{suffix}{{case="{case}",pod="{pod}"}} {values[family]} {t}')
                    elif t == at:
                        lines.append(f'{family}{suffix}{{case="{case}",pod="{pod}"}} {values[family]}')
    return "\n".join(lines) + ("\n# EOF\n" if at is None else "\n")


@pytest.fixture(scope="module")
def same_samples(tmp_path_factory):
    """(Prometheus, direct store, the instant both answer at) over CASES' samples."""
    require_prometheus()
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install promtool (Debian's prometheus package ships it)")
        pytest.skip("promtool is not on PATH")
    at = int(time.time()) - 900  # inside the retention, before anything the head could hold
    timed = {case: {pod: [(at + t, values) for t, values in samples] for pod, samples in pods.items()}
             for case, pods in CASES.items()}
    source = tmp_path_factory.mktemp("openmetrics") / "samples.om"
    source.write_text(exposition(timed, None))
    store = ScrapeStore(retain_s=900, stale_after_s=300)  # Prometheus' default 5 m lookback
    for stamp in sorted({t for pods in timed.values() for samples in pods.values() for t, _ in samples}):
        store.record(stamp, exposition(timed, stamp))
    prometheus = LocalPrometheus([])
    try:
        # LocalPrometheus starts on its private data directory: the block must be there first
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(source),
                        str(prometheus._dir / "data")], check=True, capture_output=True, timeout=60)
        yield prometheus.start(), store, at
    finally:
        prometheus.close()




@pytest.mark.parametrize(("case", "query"), [
    (case, query) for case in CASES for query in names.CAPACITY_QUERIES  # the query names are the fields of Queries
])
def test_capacity_measurements_match_prometheus_on_the_same_samples(same_samples, case, query):
    prometheus, store, at = same_samples
    promql = getattr(builtin_queries(f'case="{case}"', f"{WINDOW_S}s"), query)
    answer = requests.get(f"{prometheus.url}/api/v1/query", params={"query": promql, "time": at}, timeout=5).json()
    assert answer["status"] == "success", answer
    [result] = answer["data"]["result"]
    expected = float(result["value"][1])
    assert store.answers(f'case="{case}"', window_s=WINDOW_S, now=at)[query] == pytest.approx(expected, rel=1e-9)
