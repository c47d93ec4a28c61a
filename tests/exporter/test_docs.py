"""docs/EXPORTER.md stays true to the code: every flag and every metric the exporter serves."""

from __future__ import annotations

import pathlib

from contract import names
from exporter.__main__ import build_parser
from exporter.collector import DEVICE_METRICS

from .fakenvml import FakeGpu

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "EXPORTER.md").read_text()


def test_every_flag_is_in_the_flag_table():
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert [flag for flag in flags if f"| `{flag}` |" not in DOC] == []


def test_every_metric_served_in_either_mode_is_documented(start_exporter):
    running = start_exporter([FakeGpu("GPU-1", processes=[(1, 2)])], flags=["--per-process"])
    served = {line.split("{")[0].split(" ")[0] for line in running.text().splitlines() if line and not line.startswith("#")}
    # the DaemonSet's PodResources counters and holder count, which this sidecar does not serve
    served |= set(DEVICE_METRICS) | {names.EXPORTER_PODRESOURCES_ERRORS + "_total",
                                     names.EXPORTER_PODRESOURCES_REFRESHES + "_total", names.EXPORTER_GPU_HOLDERS}
    assert sorted(name for name in served if f"`{name}`" not in DOC) == []


def test_readme_names_every_metric_too():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented_in_exporter_doc = {line.split("`")[1] for line in DOC.splitlines() if line.startswith("| `")}
    # the exporter's own metrics as EXPORTER.md writes them, counters with their `_total`
    own = {n for n in documented_in_exporter_doc if n.removesuffix("_total") in names.EXPORTER_METRICS}
    metrics = set(DEVICE_METRICS) | own
    assert sorted(name for name in metrics if f"`{name}`" not in readme) == []
