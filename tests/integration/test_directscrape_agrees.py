"""The direct-scrape source agrees with Prometheus on the same pods, scraped side by side."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from adapter.directscrape import ScrapeStore
from adapter.promql import builtin_queries
from contract import names
from lab.synthetic import PodLoad

from .conftest import eventually, wait_until_scraped

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
