"""The generated gRPC code is exactly what tools/genprotos.py makes from protos/ today."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("genprotos", ROOT / "tools" / "genprotos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date_with_the_protos(tmp_path):
    fresh = _generator().generate(tmp_path)
    assert fresh, "the generator wrote nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is missing: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{relative} is out of date with protos/: run `make protos`"


def test_the_contract_matches_kedas_field_numbers():
    from adapter._proto import externalscaler_pb2 as pb

    def fields(message):
        return {f.name: f.number for f in pb.DESCRIPTOR.message_types_by_name[message].fields}

    assert pb.DESCRIPTOR.package == "externalscaler"
    assert fields("ScaledObjectRef") == {"name": 1, "namespace": 2, "scalerMetadata": 3}
    assert fields("IsActiveResponse") == {"result": 1}
    assert fields("GetMetricSpecResponse") == {"metricSpecs": 1}
    assert fields("MetricSpec") == {"metricName": 1, "targetSize": 2, "targetSizeFloat": 3}
    assert fields("GetMetricsRequest") == {"scaledObjectRef": 1, "metricName": 2}
    assert fields("GetMetricsResponse") == {"metricValues": 1}
    assert fields("MetricValue") == {"metricName": 1, "metricValue": 2, "metricValueFloat": 3}
    service = pb.DESCRIPTOR.services_by_name["ExternalScaler"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "IsActive": ("ScaledObjectRef", "IsActiveResponse", False),
        "StreamIsActive": ("ScaledObjectRef", "IsActiveResponse", True),
        "GetMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse", False),
        "GetMetrics": ("GetMetricsRequest", "GetMetricsResponse", False),
        "StreamMetricSpec": ("ScaledObjectRef", "GetMetricSpecResponse", True),
    }


def test_podresources_matches_the_kubelet_contract_field_for_field():
    """Every message and field number in ../shared/reference/kubelet/CONTRACT.md, parsed from its text."""
    import os
    import re

    from exporter._proto import podresources_pb2 as pb

    contract = ROOT.parent / "shared" / "reference" / "kubelet" / "CONTRACT.md"
    if not contract.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{contract} is missing")
        pytest.skip(f"{contract} is missing")
    expected: dict[str, dict[str, int]] = {}
    for message, body in re.findall(r"^- `(\w+)`: (.+)$", contract.read_text(), flags=re.M):
        fields = [part.strip() for part in body.split(";")]
        expected[message] = {re.match(r"(?:optional )?`(\w+)`", f).group(1): int(f.split()[-1]) for f in fields}
    assert len(expected) == 13
    assert pb.DESCRIPTOR.package == "v1"
    for message, fields in expected.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert {f.name: f.number for f in descriptor.fields} == fields, message
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["PodResourcesLister"].methods}
    assert methods == {"List", "GetAllocatableResources", "Get"}
