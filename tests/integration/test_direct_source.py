"""The scaler without Prometheus: scrapeTargetsFile, real gRPC, pods scraped directly."""

from __future__ import annotations

import json

import pytest

from adapter._proto import externalscaler_pb2 as pb
from lab.localprom import free_port
from lab.synthetic import PodLoad

from .conftest import eventually, metrics_request

pytestmark = pytest.mark.integration


def direct_ref(deployment: str, **metadata) -> pb.ScaledObjectRef:
    meta = {"scalerAddress": "scaler.keda:6000", "scrapeTargetsFile": "pods.json", "window": "5s",
            "selector": f'namespace="ml",deployment="{deployment}"', "refreshSeconds": "0.5",
            "scaleDownWindowSeconds": "0", "targetQueuePerReplica": "4", **metadata}
    return pb.ScaledObjectRef(name=deployment, namespace="ml", scalerMetadata=meta)


def test_the_scaler_reads_the_pods_directly_and_a_dead_pod_drops_out(fleet, start_scaler, tmp_path, deployment):
    fleet.set_pod("ml", deployment, "a", PodLoad(queue=10, request_duration_s=1.5, requests_per_s=5))
    fleet.set_pod("ml", deployment, "b", PodLoad(queue=6))
    pods = tmp_path / "pods.json"
    dead = f"127.0.0.1:{free_port()}"
    pods.write_text(json.dumps([{"targets": [fleet.address], "labels": {"job": "workers"}},
                                {"targets": [dead], "labels": {"job": "workers"}}]))
    scaler = start_scaler(scrape_targets_dir=str(tmp_path))
    ref = direct_ref(deployment)
    assert scaler.stub.GetMetricSpec(ref).metricSpecs[0].targetSizeFloat == 1.0

    def scaled_on_the_queue():
        value = scaler.stub.GetMetrics(metrics_request(ref)).metricValues[0].metricValueFloat
        assert value == 4.0  # 16 requests in flight / 4 per replica, the dead pod ignored

    eventually(scaled_on_the_queue, timeout_s=15)
    fleet.set_pod("ml", deployment, "b", PodLoad(queue=22))

    def follows_the_load():
        assert scaler.stub.GetMetrics(metrics_request(ref)).metricValues[0].metricValueFloat == 8.0

    eventually(follows_the_load, timeout_s=15)
    for pod in "ab":
        fleet.remove_pod("ml", deployment, pod)


def test_a_scaler_without_the_directory_refuses_the_key(start_scaler, deployment):
    import grpc

    scaler = start_scaler()
    with pytest.raises(grpc.RpcError) as refused:
        scaler.stub.GetMetricSpec(direct_ref(deployment))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--scrape-targets-dir" in refused.value.details()


def test_a_scaledobject_reads_only_its_own_namespaces_pods_from_a_shared_file(fleet, start_scaler, tmp_path, deployment):
    """One file_sd file lists pods of two namespaces (the file's labels win over a pod's own);
    tenant-b's ScaledObject, whose selector names no namespace, is confined to tenant-b's."""
    fleet.set_pod("tenant-a", deployment, "a", PodLoad(queue=40))
    fleet.set_pod("tenant-b", deployment, "b", PodLoad(queue=8))
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps([{"targets": [fleet.address], "labels": {"job": "workers"}}]))
    scaler = start_scaler(scrape_targets_dir=str(tmp_path))
    ref = pb.ScaledObjectRef(name=deployment, namespace="tenant-b", scalerMetadata={
        **direct_ref(deployment).scalerMetadata, "selector": f'deployment="{deployment}"'})

    def confined():  # 8 in flight / 4 per replica; with tenant-a's 40 it would be 12
        assert scaler.stub.GetMetrics(metrics_request(ref)).metricValues[0].metricValueFloat == 2.0

    eventually(confined, timeout_s=15)
    for namespace, pod in (("tenant-a", "a"), ("tenant-b", "b")):
        fleet.remove_pod(namespace, deployment, pod)
