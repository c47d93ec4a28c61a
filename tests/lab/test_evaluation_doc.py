"""docs/EVALUATION.md's tables are what the simulator prints today (two scenarios rerun, and the
SD trace's two rows at min 0: four days at real speed, so not the min-1 policies)."""

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


def test_the_sd_traces_rows_at_min_0_are_reproduced_digit_for_digit():
    if not evaluation.TRACES.exists():
        pytest.skip("../shared/traces is not beside the checkout")
    rows = evaluation.run("sd", ["--policies", "composite-min0,keda-queue-min0"])
    section = DOC.split("### sd\n", 1)[1].split("\n### ", 1)[0]
    header, rule, composite_min0, keda_min0 = evaluation.table(rows).splitlines()
    assert composite_min0.startswith("| composite-min0 |") and keda_min0.startswith("| keda-queue-min0 |")
    assert f"{header}\n{rule}\n" in section and f"\n{composite_min0}\n{keda_min0}\n" in section


def test_the_readme_links_the_evaluation_and_every_plot_it_names_exists():
    assert "docs/EVALUATION.md" in (ROOT / "README.md").read_text()
    for link in [part.split(")", 1)[0] for part in DOC.split("](")[1:]]:
        assert (ROOT / "docs" / link).exists(), link
