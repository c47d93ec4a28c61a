"""docs/WORKER.md stays true to the code: every serve flag and every metric is documented."""

from __future__ import annotations

import argparse
import pathlib

from prometheus_client import CollectorRegistry

from contract import names as contract_names
from worker.__main__ import build_parser
from worker.metrics import LiveState, WorkerMetrics

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "WORKER.md").read_text()


def serve_flags() -> list[str]:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    return [option for action in serve._actions for option in action.option_strings if option.startswith("--")
            and option != "--help"]


def test_every_serve_flag_is_in_the_flag_table():
    missing = [flag for flag in serve_flags() if f"| `{flag}` |" not in DOC]
    assert missing == []


def test_the_worker_serves_the_contracts_metrics_and_documents_each():
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.watch(LiveState(lambda: 0, lambda: 0, lambda: 0.0, lambda: 1, lambda: True,
                            lambda: 10.0, lambda: {1: 10.0}, lambda: 5.0, lambda: 2.0, lambda: 3.0))
    families = {family.name: family.type for family in metrics.registry.collect()}
    assert sorted(families) == sorted(contract_names.WORKER_METRICS)
    names = {name + ("_total" if kind == "counter" else "") for name, kind in families.items()}
    missing = [name for name in sorted(names) if f"`{name}" not in DOC]
    assert missing == []
