"""docs/SECURITY.md names, for each rule, the test that attacks it: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_security_page_names_exists():
    page = (ROOT / "docs" / "SECURITY.md").read_text()
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", page))  # test functions, not files
    defined = {m for path in (ROOT / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(), re.M)}
    assert len(named) >= 30
    assert sorted(named - defined) == []


def test_every_flag_the_security_page_names_is_a_real_flag():
    page = (ROOT / "docs" / "SECURITY.md").read_text()
    from adapter.__main__ import build_parser

    scaler_flags = {a for action in build_parser()._actions for a in action.option_strings}
    for flag in ("--prometheus-address", "--allowed-prometheus-urls", "--denied-networks", "--allow-cross-namespace",
                 "--max-scaled-objects-per-namespace", "--redis-address", "--redis-ca-file", "--tls-client-ca-file"):
        assert flag in page and flag in scaler_flags, flag
