"""docs/EVALUATION.md's tables are what the simulator prints today (two scenarios rerun, and one
row of the SD trace: four days at real speed, so one policy only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import evaluation  # noqa: E402 - bench/ is not a package

DOC = (ROOT / "docs" / "EVALUATION.md").read_text()


@pytest.mark.parametrize("scenario", ["spike", "conv-x2"])
def test_the_documented_table_is_reproduced_digit_for_digit(scenario):
    if not evaluation.TRACES.exists():
        pytest.skip("../shared/traces is not beside the checkout")
    rows = evaluation.run(scenario, [])
    section = DOC.split(f"### {scenario}\n", 1)[1].split("\n### ", 1)[0]
    assert evaluation.table(rows) in section
    assert f"Goal: {evaluation.verdict(rows)}." in section


def test_the_sd_traces_scale_to_zero_baseline_row_is_reproduced_digit_for_digit():
    if not evaluation.TRACES.exists():
        pytest.skip("../shared/traces is not beside the checkout")
    rows = evaluation.run("sd", ["--policies", "keda-queue-min0"])
    section = DOC.split("### sd\n", 1)[1].split("\n### ", 1)[0]
    header, rule, row = evaluation.table(rows).splitlines()
    assert row.startswith("| keda-queue-min0 |") and f"{header}\n{rule}\n" in section and f"\n{row}\n" in section


def test_the_readme_links_the_evaluation_and_every_plot_it_names_exists():
    assert "docs/EVALUATION.md" in (ROOT / "README.md").read_text()
    for link in [part.split(")", 1)[0] for part in DOC.split("](")[1:]]:
        assert (ROOT / "docs" / link).exists(), link
