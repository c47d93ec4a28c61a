"""docs/EVALUATION.md's tables are what the simulator prints today: one scenario rerun in full
(the conv trace, every policy and the oracle, about 15 s), its table and its goal lines checked
digit for digit, so the page cannot drift from the code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import evaluation  # noqa: E402 - bench/ is not a package

DOC = (ROOT / "docs" / "EVALUATION.md").read_text()


def test_the_documented_table_and_goals_are_reproduced_digit_for_digit():
    if not evaluation.TRACES.exists():
        pytest.skip("../shared/traces is not beside the checkout")
    rows = evaluation.run("conv", [])
    section = DOC.split("### conv\n", 1)[1].split("\n### ", 1)[0]
    assert evaluation.table(rows) in section
    for index, (ok, line) in enumerate(evaluation.goals(rows, evaluation.duration_minutes(rows, "conv"))):
        assert f"- Goal {index + 1}: {'met' if ok else '**missed**'}: {line}" in section


def test_the_shipped_defaults_are_the_ones_the_choice_ranked_first():
    """bench/choose_defaults.py's table in the doc ranks the shipped queue overlay first."""
    table = DOC.split("## How the defaults were chosen", 1)[1].split("\n## ", 1)[0]
    first = next(line for line in table.splitlines() if line.startswith("| spare="))
    assert first.startswith("| spare=2@0.2 hold=3600 cooldown=60 smoothing=30 |"), first
    from lab.sim import shipped
    from adapter.policy import PolicySpec

    spec = PolicySpec()
    assert (spec.min_busy_replicas, spec.spare_above_load, spec.keep_warm_max_s, spec.queue_smoothing_s) == (
        2, 0.2, 3600.0, 30.0)
    assert "minBusyReplicas" not in shipped.SHIPPED_QUEUE_METADATA  # the base's 2
    assert shipped.SHIPPED_QUEUE_COOLDOWN_PERIOD_S == 60.0


def test_the_readme_links_the_evaluation_and_every_plot_it_names_exists():
    assert "docs/EVALUATION.md" in (ROOT / "README.md").read_text()
    for link in [part.split(")", 1)[0] for part in DOC.split("](")[1:]]:
        assert (ROOT / "docs" / link).exists(), link
