"""The layout is the architecture (docs/ARCHITECTURE.md): the import contracts hold, every
metric name lives in the contract, and no comment points outside the repository."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("adapter", "contract", "exporter", "gateway", "lab", "worker")


def test_the_import_contracts_in_pyproject_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("import-linter is a dev dependency: pip install -e '.[dev]'")
    result = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and "kept" in result.stdout


def source_files():
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "_proto" not in p.parts)


def code_strings(path: Path):
    """(line, text) of every string constant in a module (f-string parts too), docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_metric_names_are_written_only_in_the_contract():
    """A metric name in a string anywhere but contract/names.py (PromQL text included) is a
    second place to rename; docstrings and comments may name them."""
    from contract import names

    word = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    suffixes = re.compile(r"_(?:total|bucket|sum|count)$")
    files = [*source_files(), *(ROOT / "bench").glob("*.py"), *(ROOT / "tools").glob("*.py")]
    offenders = [f"{path.relative_to(ROOT)}:{line}: {found}"
                 for path in files if path != ROOT / "contract" / "names.py"
                 for line, text in code_strings(path) for found in word.findall(text)
                 if found in names.ALL_METRICS or suffixes.sub("", found) in names.ALL_METRICS]
    assert offenders == []


def test_no_module_of_a_deployable_is_over_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in source_files()
            if p.parts[len(ROOT.parts)] in ("adapter", "exporter", "gateway", "worker", "contract")
            and (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_no_comment_or_doc_cites_a_file_outside_the_repository():
    files = [*source_files(), *(ROOT / "docs").glob("*.md"), ROOT / "README.md", *(ROOT / "bench").glob("*.py"),
             *(ROOT / "tools").glob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in files if "DESIGN.md" in p.read_text()]
    assert offenders == []


def test_the_docs_name_only_metrics_of_the_contract_and_each_deployables_page_lists_all_of_its_own():
    from contract import names

    labels = {names.SIGNAL_LABEL, *names.DEVICE_LABELS}
    # dcgm-exporter's default fields that docs/EXPORTER.md says this exporter does not export
    not_exported = {"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_VGPU_LICENSE_STATUS"}
    known = set(names.ALL_METRICS) | labels | not_exported
    pages = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")} | {"README.md": (ROOT / "README.md").read_text()}
    token = re.compile(r"\b((?:diffusion|scaler|gpu_exporter|gateway)_[a-z0-9_]*[a-z0-9]|DCGM_FI_[A-Z0-9_]*[A-Z0-9])\b(?!\.(?:py|json))")
    unknown = {page: sorted(name for name in set(token.findall(text))
                            if name not in known and re.sub(r"_(bucket|sum|count|total)$", "", name) not in known)
               for page, text in pages.items()}
    assert {page: found for page, found in unknown.items() if found} == {}
    for metrics, page in ((names.WORKER_METRICS, "WORKER.md"), (names.SCALER_METRICS, "SCALER.md"),
                          (names.EXPORTER_METRICS + tuple(names.DCGM_METRICS), "EXPORTER.md"),
                          (names.GATEWAY_METRICS, "GATEWAY.md")):
        assert [m for m in metrics if m not in pages[page]] == [], page


def test_the_query_record_is_keyed_by_the_contracts_query_names():
    """The readers look queries up by contract name (`getattr(spec.queries, name)`): renaming a
    signal in the contract must rename the field too."""
    from dataclasses import fields

    from adapter.promql import Queries
    from contract import names

    assert {f.name for f in fields(Queries)} == set(names.QUERIES)
