"""README's ScaledObject example is valid for KEDA's CRD and for the scaler's parser."""

from __future__ import annotations

import os
import pathlib
import re

import jsonschema
import pytest
import yaml

from adapter.config import KNOWN_KEYS, METADATA_KEYS, parse_metadata

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD = ROOT.parent / "shared" / "reference" / "keda" / "keda.sh_scaledobjects.yaml"


def readme_scaled_object() -> dict:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    objects = [yaml.safe_load(b) for b in blocks]
    [scaled_object] = [o for o in objects if isinstance(o, dict) and o.get("kind") == "ScaledObject"]
    return scaled_object


def test_readme_example_validates_against_kedas_crd():
    if not CRD.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CRD} is missing")
        pytest.skip(f"{CRD} is missing")
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    jsonschema.validate(readme_scaled_object(), version["schema"]["openAPIV3Schema"])


def test_readme_example_metadata_parses_without_unknown_keys():
    [trigger] = readme_scaled_object()["spec"]["triggers"]
    spec = parse_metadata(trigger["metadata"])
    assert spec.unknown_keys == ()
    assert spec.policy.signals == ("queue", "gpu", "latency")


def test_readme_documents_every_metadata_key():
    text = (ROOT / "README.md").read_text()
    missing = [key for key in sorted(KNOWN_KEYS) if f"`{key}`" not in text]
    assert not missing, f"README's metadata table lacks {missing}"


def readme_metadata_defaults() -> dict[str, str]:
    """key -> the default README's metadata table shows for it, where a row gives one per key."""
    text = (ROOT / "README.md").read_text()
    table = text.split("### Trigger metadata", 1)[1].split("\n\n", 2)[1]
    shown = {}
    for row in table.splitlines()[2:]:
        cells = row.split("|")
        keys = re.findall(r"`(\w+)`", cells[1])
        defaults = re.findall(r"`([^`]*)`", cells[-2])
        if len(keys) == len(defaults):
            shown.update(zip(keys, defaults))
    return shown


def test_readme_states_the_default_the_parser_applies():
    shown = readme_metadata_defaults()
    for key in METADATA_KEYS:
        default = key.default
        if isinstance(default, (int, float)) or (isinstance(default, str) and default):
            expected = f"{default:g}" if isinstance(default, float) else str(default)
            assert shown.get(key.name) == expected, f"README's default for {key.name}"
