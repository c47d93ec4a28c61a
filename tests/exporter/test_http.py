"""The exporter over HTTP: dcgm names and labels, modes, faults, and the lint."""

from __future__ import annotations

import csv
import pathlib
import shutil
import subprocess
import threading
import time

import pytest
import requests

from contract import names
from exporter.collector import DCGM_COUNTERS, DEVICE_LABELS, DEVICE_METRICS

from .conftest import H100, SECOND
from .fakenvml import FakeGpu, FakeNvml

REFERENCE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "reference" / "nvidia" / "dcgm-exporter_default-counters.csv"


def dcgm_reference() -> dict[str, str]:
    """dcgm-exporter's default counters, commented-out ones included: name -> type."""
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is missing")
    fields = {}
    for row in csv.reader(REFERENCE.read_text().splitlines()):
        if not row or not row[0].lstrip("# ").startswith("DCGM_"):
            continue
        fields[row[0].lstrip("# ").strip()] = row[1].strip()
    return fields


def is_device_series(name: str) -> bool:
    """Whether a served series is a GPU's rather than one of the exporter's own metrics."""
    return name.removesuffix("_total") not in names.EXPORTER_METRICS


def device_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")
            and is_device_series(line.split("{")[0].split(" ")[0])]


def test_device_series_carry_dcgm_names_and_labels(start_exporter):
    running = start_exporter()
    text = running.text()
    identity = dict(zip(names.DEVICE_LABELS, ("0", H100, "00000000:01:00.0", "nvidia0", "NVIDIA H100 80GB HBM3",
                                              "node-a", "580.159.04"), strict=True))
    rendered = ",".join(f'{label}="{value}"' for label, value in sorted(identity.items()))
    assert f"{names.GPU_UTIL}{{{rendered}}}" in text
    # names as written on the wire (the Python parser would add `_total` to counters)
    served = {line.split("{")[0] for line in device_lines(text)}
    assert served == set(DEVICE_METRICS)
    samples = [s for s in running.samples() if is_device_series(s.name)]
    for sample in samples:
        assert set(sample.labels) == set(names.DEVICE_LABELS)
        assert sample.labels["gpu"] == "0" and sample.labels["device"] == "nvidia0"
        assert sample.labels["modelName"] == "NVIDIA H100 80GB HBM3"
    energy = names.TOTAL_ENERGY_CONSUMPTION
    assert f"# TYPE {energy} counter\n{energy}{{" in text


def test_names_types_and_labels_match_dcgm_exporter_for_every_shared_metric():
    """The one place dcgm-exporter's names are written out: the compatibility the contract keeps."""
    reference = dcgm_reference()
    shared = [name for name in DEVICE_METRICS if name in reference]
    # everything the issue lists that dcgm-exporter's default file names
    assert {"DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID_ERRORS",
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"} <= set(shared)
    for name in shared:
        assert DEVICE_METRICS[name][0] == reference[name], name
    assert DEVICE_LABELS == ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")


def test_sidecar_mode_labels_the_pod_and_exports_only_visible_gpus(start_exporter):
    gpus = [FakeGpu(H100), FakeGpu(SECOND, minor=1)]
    running = start_exporter(gpus, environ={"POD_NAME": "worker-7f9", "POD_NAMESPACE": "diffusion",
                                            "CONTAINER_NAME": "worker", "NVIDIA_VISIBLE_DEVICES": SECOND})
    temps = [s for s in running.samples() if s.name == names.GPU_TEMP]
    assert [(s.labels["UUID"], s.labels["pod"], s.labels["namespace"], s.labels["container"]) for s in temps] == [
        (SECOND, "worker-7f9", "diffusion", "worker")]


def test_a_scrape_never_waits_on_a_hung_nvml_call_and_stale_values_are_withheld(start_exporter):
    gpu = FakeGpu(H100)
    nvml = FakeNvml([gpu])
    running = start_exporter(nvml=nvml, flags=["--collect-timeout", "0.2"])
    assert running.value(names.POWER_USAGE) == 118.0
    release = threading.Event()
    nvml.hangs["nvmlDeviceGetPowerUsage"] = release
    assert nvml.hung.wait(5)
    running.wait_for(lambda: running.value(names.EXPORTER_SNAPSHOT_STALE) == 1)
    started = time.monotonic()
    text = running.text()
    assert time.monotonic() - started < 0.5
    assert not device_lines(text)  # no stale numbers
    assert running.value(names.EXPORTER_COLLECTION_TIMEOUTS + "_total") >= 1
    running.wait_for(lambda: running.value(names.EXPORTER_COLLECTIONS_SKIPPED + "_total") >= 1)
    assert running.value(names.EXPORTER_GPU_UP, gpu="0") == 0
    del nvml.hangs["nvmlDeviceGetPowerUsage"]
    release.set()
    running.wait_for(lambda: running.value(names.EXPORTER_SNAPSHOT_STALE) == 0)
    assert running.value(names.POWER_USAGE) == 118.0


def test_a_lost_gpu_drops_its_series_and_comes_back(start_exporter):
    first, second = FakeGpu(H100), FakeGpu(SECOND, minor=1)
    running = start_exporter([first, second])
    second.lost = True
    running.wait_for(lambda: running.value(names.EXPORTER_GPU_UP, gpu="1") == 0)
    temps = {s.labels["gpu"] for s in running.samples() if s.name == names.GPU_TEMP}
    assert temps == {"0"}
    second.lost = False
    running.wait_for(lambda: running.value(names.EXPORTER_GPU_UP, gpu="1") == 1, timeout_s=15)
    assert running.value(names.GPU_TEMP, gpu="1") == 41


def test_without_nvml_it_serves_self_metrics_and_stays_healthy(start_exporter):
    running = start_exporter(nvml=FakeNvml([FakeGpu(H100)], library_present=False))
    assert running.value(names.EXPORTER_NVML_UP) == 0
    assert not [s for s in running.samples() if is_device_series(s.name)]
    assert requests.get(f"{running.url}/healthz", timeout=5).status_code == 200


def test_nvml_errors_are_counted_by_gpu_and_call(start_exporter):
    running = start_exporter([FakeGpu(H100, errors={"nvmlDeviceGetTemperature": 999})])
    errors = names.EXPORTER_NVML_ERRORS + "_total"
    running.wait_for(lambda: (running.value(errors, gpu="0", **{names.EXPORTER_CALL_LABEL: "temperature"}) or 0) >= 2)
    assert running.value(names.GPU_TEMP) is None
    assert running.value(names.SM_CLOCK) == 1980


def test_per_process_memory_is_exported_on_request(start_exporter):
    running = start_exporter([FakeGpu(H100, processes=[(4242, 1024)])], flags=["--per-process"])
    assert running.value(names.EXPORTER_PROCESS_MEMORY, gpu="0", **{names.EXPORTER_PID_LABEL: "4242"}) == 1024


def test_metrics_pass_promtool_except_exactly_the_dcgm_counters(start_exporter):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool comes with the prometheus package (tools/ensure-prometheus.sh)")
    running = start_exporter([FakeGpu(H100, processes=[(1, 2)])], flags=["--per-process"])
    result = subprocess.run([promtool, "check", "metrics"], input=running.text(), capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # Allowed, by name: dcgm-exporter's counters without `_total`, and its camelCase label
    # `modelName` on its device metrics. Both are the compatibility contract with dashboards.
    allowed = {f'{name} counter metrics should have "_total" suffix' for name in DCGM_COUNTERS}
    allowed |= {f"{name} label names should be written in 'snake_case' not 'camelCase'" for name in DEVICE_METRICS}
    allowed.add(f"{names.PCIE_REPLAY_COUNTER} metric name should not include type 'counter'")
    assert {line.strip() for line in problems} <= allowed, problems
    assert {line.strip() for line in problems if "_total" in line} == {
        f'{name} counter metrics should have "_total" suffix' for name in DCGM_COUNTERS}
