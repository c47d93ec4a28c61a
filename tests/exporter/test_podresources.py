"""DaemonSet mode against a fake kubelet: a real gRPC PodResources server on a real unix socket."""

from __future__ import annotations

import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from contract import names
from exporter._proto import podresources_pb2 as pb
from exporter._proto import podresources_pb2_grpc as pb_grpc
from exporter.podresources import PodRef, PodResourcesCache, device_key, gpu_owners

from .conftest import H100, SECOND
from .fakenvml import FakeGpu


def pod(name: str, namespace: str, container: str, resource: str, *device_ids: str) -> pb.PodResources:
    return pb.PodResources(name=name, namespace=namespace, containers=[
        pb.ContainerResources(name=container, devices=[pb.ContainerDevices(resource_name=resource, device_ids=device_ids)]),
    ])


class FakeKubelet(pb_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.pods: list[pb.PodResources] = []
        self.calls = 0
        self.refuse: grpc.StatusCode | None = None
        self.lock = threading.Lock()

    def List(self, request, context):  # noqa: N802 - the gRPC method name
        with self.lock:
            self.calls += 1
            if self.refuse is not None:
                context.abort(self.refuse, "rate limited" if self.refuse == grpc.StatusCode.RESOURCE_EXHAUSTED else "no")
            return pb.ListPodResourcesResponse(pod_resources=self.pods)


@pytest.fixture
def kubelet():
    # unix socket paths must stay short (108 bytes): a fresh short directory
    with tempfile.TemporaryDirectory(prefix="kl") as scratch:
        socket = str(Path(scratch) / "kubelet.sock")
        fake = FakeKubelet()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_PodResourcesListerServicer_to_server(fake, server)
        server.add_insecure_port(f"unix://{socket}")
        server.start()
        yield fake, socket
        server.stop(0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_gpus_map_to_their_containers_for_whole_gpus_mig_and_time_slicing():
    response = pb.ListPodResourcesResponse(pod_resources=[
        pod("worker-a", "diffusion", "worker", "nvidia.com/gpu", H100),
        pod("worker-b", "diffusion", "worker", "nvidia.com/mig-1g.10gb", "MIG-aaaa"),
        pod("shared-1", "lab", "nb", "nvidia.com/gpu", "3::0"),
        pod("shared-2", "lab", "nb", "nvidia.com/gpu", "3::1"),
        pod("cpu-only", "lab", "app", "example.com/fpga", "fpga0"),
    ])
    owners = gpu_owners(response)
    assert owners[H100] == (PodRef("worker-a", "diffusion", "worker"),)
    assert owners["MIG-aaaa"] == (PodRef("worker-b", "diffusion", "worker"),)
    assert owners["3"] == (PodRef("shared-1", "lab", "nb"), PodRef("shared-2", "lab", "nb"))
    assert "fpga0" not in owners
    assert device_key("GPU-x::4") == "GPU-x"


def test_the_cache_lists_at_most_once_per_ttl(kubelet):
    fake, socket = kubelet
    fake.pods = [pod("worker-a", "diffusion", "worker", "nvidia.com/gpu", H100)]
    clock = Clock()
    cache = PodResourcesCache(socket, ttl_s=10, clock=clock)
    for _ in range(5):
        assert cache.owners()[H100][0].pod == "worker-a"
    assert fake.calls == 1
    fake.pods = [pod("worker-z", "diffusion", "worker", "nvidia.com/gpu", H100)]
    clock.now += 10
    assert cache.owners()[H100][0].pod == "worker-z" and fake.calls == 2
    cache.close()


def test_a_rate_limited_kubelet_keeps_the_last_mapping_and_backs_off(kubelet):
    fake, socket = kubelet
    fake.pods = [pod("worker-a", "diffusion", "worker", "nvidia.com/gpu", H100)]
    clock = Clock()
    cache = PodResourcesCache(socket, ttl_s=1, clock=clock, backoff_max_s=8)
    cache.owners()
    fake.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    attempts = []
    for _ in range(40):
        clock.now += 0.5
        before = fake.calls
        assert cache.owners()[H100][0].pod == "worker-a"  # never an empty answer
        attempts.append(fake.calls - before)
    assert cache.errors["RESOURCE_EXHAUSTED"] == sum(attempts)
    assert sum(attempts) <= 7  # 1, 2, 4, 8, 8 ... second gaps, not one call per scrape
    fake.refuse = None
    clock.now += 9
    cache.owners()
    assert cache.refreshes == 2
    cache.close()


def test_an_absent_kubelet_is_an_error_count_not_a_crash():
    with tempfile.TemporaryDirectory(prefix="kl") as scratch:
        cache = PodResourcesCache(str(Path(scratch) / "missing.sock"), timeout_s=0.5)
        assert cache.owners() == {}
        assert cache.errors["UNAVAILABLE"] == 1
        cache.close()


def test_daemonset_mode_labels_each_gpu_with_the_pod_holding_it(kubelet, start_exporter):
    fake, socket = kubelet
    fake.pods = [
        pod("worker-a", "diffusion", "worker", "nvidia.com/gpu", H100),
        pod("worker-b", "diffusion", "worker", "nvidia.com/mig-3g.40gb", "MIG-bbbb"),
    ]
    gpus = [FakeGpu(H100), FakeGpu(SECOND, minor=1, mig=["MIG-bbbb"])]
    running = start_exporter(gpus, flags=["--mode", "daemonset", "--kubelet-socket", socket],
                             environ={"NVIDIA_VISIBLE_DEVICES": H100, "POD_NAME": "exporter-xyz"})
    temps = {s.labels["UUID"]: s.labels["pod"] for s in running.samples() if s.name == names.GPU_TEMP}
    assert temps == {H100: "worker-a", SECOND: "worker-b"}  # every GPU of the node, not the exporter's own pod
    assert running.value(names.EXPORTER_PODRESOURCES_REFRESHES + "_total") >= 1


def series_of(running, name: str) -> list[dict[str, str]]:
    return [s.labels for s in running.samples() if s.name == name]


def test_a_time_sliced_gpu_is_served_under_every_pod_holding_a_replica(kubelet, start_exporter):
    # the case: two time-slicing replicas of one GPU, held by pods of two namespaces
    fake, socket = kubelet
    fake.pods = [
        pod("batch-eval", "research", "eval", "nvidia.com/gpu", "GPU-X::0"),
        pod("sd-worker", "ml", "worker", "nvidia.com/gpu", "GPU-X::1"),
    ]
    running = start_exporter([FakeGpu("GPU-X", samples=[(1, 73)])],
                             flags=["--mode", "daemonset", "--kubelet-socket", socket])
    for namespace, name in (("research", "batch-eval"), ("ml", "sd-worker")):
        # the whole GPU's value, repeated for each holder: a share is not measured here
        assert running.value(names.GPU_UTIL, namespace=namespace, pod=name) == 73
    assert len(series_of(running, names.GPU_UTIL)) == 2
    assert running.value(names.EXPORTER_GPU_HOLDERS, UUID="GPU-X") == 2


def test_an_unshared_gpu_has_one_series_and_a_gpu_nobody_holds_keeps_one_without_pod_labels(
        kubelet, start_exporter):
    fake, socket = kubelet
    fake.pods = [pod("worker-a", "diffusion", "worker", "nvidia.com/gpu", H100)]
    running = start_exporter([FakeGpu(H100, samples=[(1, 50)]), FakeGpu(SECOND, minor=1, samples=[(1, 20)])],
                             flags=["--mode", "daemonset", "--kubelet-socket", socket])
    held = [s for s in series_of(running, names.GPU_UTIL) if s["UUID"] == H100]
    free = [s for s in series_of(running, names.GPU_UTIL) if s["UUID"] == SECOND]
    assert [(s["namespace"], s["pod"], s["container"]) for s in held] == [("diffusion", "worker-a", "worker")]
    assert len(free) == 1 and not set(names.POD_LABELS) & set(free[0])
    assert running.value(names.EXPORTER_GPU_HOLDERS, UUID=H100) == 1
    assert running.value(names.EXPORTER_GPU_HOLDERS, UUID=SECOND) == 0


def test_two_containers_of_one_pod_sharing_a_gpu_get_a_series_each(kubelet, start_exporter):
    fake, socket = kubelet
    fake.pods = [pb.PodResources(name="pair", namespace="ml", containers=[
        pb.ContainerResources(name=container, devices=[
            pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[f"{H100}::{replica}"])])
        for replica, container in enumerate(("infer", "warmup"))])]
    running = start_exporter([FakeGpu(H100, samples=[(1, 50)])], flags=["--mode", "daemonset", "--kubelet-socket", socket])
    assert sorted(s["container"] for s in series_of(running, names.GPU_TEMP)) == ["infer", "warmup"]


def test_the_sidecar_labels_its_gpus_with_its_own_pod_and_serves_no_holder_count(start_exporter):
    running = start_exporter([FakeGpu(H100, samples=[(1, 50)])],
                             environ={"POD_NAME": "worker-0", "POD_NAMESPACE": "ml", "CONTAINER_NAME": "exporter"})
    assert [(s["namespace"], s["pod"]) for s in series_of(running, names.GPU_UTIL)] == [("ml", "worker-0")]
    assert series_of(running, names.EXPORTER_GPU_HOLDERS) == []
