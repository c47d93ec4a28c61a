"""Synthetic pods' /metrics: the worker's and the exporter's series for pods whose load the
caller sets. Not a fleet (nothing here serves or scales; `lab.sim.fleet` is the simulated
fleet): it stands in for real workers where only their exposition matters (integration tests
of the scaler, its benchmarks). Names, labels and buckets come from `contract.names`.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from contract import names
from contract.httpserver import MetricsServer
from contract.names import LATENCY_BUCKETS_S  # the real worker's buckets, so quantiles match


@dataclass
class PodLoad:
    """What one synthetic pod reports."""

    queue: float = 0.0  # requests waiting + running
    ready: bool = True
    gpu_util_percent: float | None = None  # None: no GPU series
    request_duration_s: float = 1.0  # every finished request took this long
    requests_per_s: float = 0.0  # finished requests per second


class _Pod:
    def __init__(self, load: PodLoad, now: float):
        self.load = load
        self.updated_at = now
        self.finished = 0.0
        self.latency_sum = 0.0
        self.bucket_counts = [0.0] * (len(LATENCY_BUCKETS_S) + 1)

    def advance(self, now: float) -> None:
        finished = self.load.requests_per_s * max(0.0, now - self.updated_at)
        self.updated_at = now
        if finished <= 0:
            return
        self.finished += finished
        self.latency_sum += finished * self.load.request_duration_s
        index = next((i for i, b in enumerate(LATENCY_BUCKETS_S) if self.load.request_duration_s <= b), len(LATENCY_BUCKETS_S))
        self.bucket_counts[index] += finished


class SyntheticPods:
    """Pods of one or more deployments; histograms accumulate from each pod's request rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str, str], _Pod] = {}  # (namespace, deployment, pod)
        self._server: MetricsServer | None = None

    def set_pod(self, namespace: str, deployment: str, pod: str, load: PodLoad) -> None:
        now = self._clock()
        with self._lock:
            existing = self._pods.get((namespace, deployment, pod))
            if existing is None:
                self._pods[(namespace, deployment, pod)] = _Pod(load, now)
            else:
                existing.advance(now)
                existing.load = load

    def remove_pod(self, namespace: str, deployment: str, pod: str) -> None:
        with self._lock:
            self._pods.pop((namespace, deployment, pod), None)

    def collect(self) -> Iterable[Metric]:
        labels = ["namespace", "deployment", "pod"]
        queue = GaugeMetricFamily(names.REQUESTS_IN_FLIGHT, "Requests waiting + running", labels=labels)
        ready = GaugeMetricFamily(names.READY, "1 when the model is loaded and not draining", labels=labels)
        gpu_labels = ["gpu", "UUID", "device", "modelName", "Hostname"] + labels  # a subset of names.DEVICE_LABELS
        gpu = GaugeMetricFamily(names.GPU_UTIL, "GPU utilization (in %).", labels=gpu_labels)
        latency = HistogramMetricFamily(
            names.REQUEST_DURATION, "Request latency, arrival to response", labels=labels, unit=""
        )
        now = self._clock()
        with self._lock:
            for (namespace, deployment, name), pod in self._pods.items():
                pod.advance(now)
                key = [namespace, deployment, name]
                queue.add_metric(key, pod.load.queue)
                ready.add_metric(key, 1.0 if pod.load.ready else 0.0)
                if pod.load.gpu_util_percent is not None:
                    uuid = f"GPU-{zlib.crc32(name.encode()):08x}-synthetic"
                    gpu.add_metric(["0", uuid, "nvidia0", "Synthetic H100", "node-0"] + key, pod.load.gpu_util_percent)
                cumulative, buckets = 0.0, []
                for bound, count in zip(LATENCY_BUCKETS_S + (float("inf"),), pod.bucket_counts):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
                latency.add_metric(key, buckets, pod.latency_sum)
        return [queue, ready, gpu, latency]

    def start(self, port: int = 0, address: str = "127.0.0.1") -> int:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server = MetricsServer(registry, lambda: (True, "ok"), address, port)
        self._server.start()
        return self._server.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
