"""The Prometheus text format (version 0.0.4), written directly: a family's header, a label set, a number.

The exporter renders its whole exposition once per collection, so it writes the few pieces of
the format it needs itself, byte for byte as prometheus_client's `generate_latest` writes them
(its `exposition.py`): HELP and TYPE lines, label sets sorted by name with their values
escaped, and numbers as Go formats them (its `utils.floatToGoString`).
tests/exporter/test_exposition.py checks whole expositions against prometheus_client's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

KINDS = frozenset({"counter", "gauge"})  # the only types the exporter serves


def header(name: str, help_text: str, kind: str) -> str:
    """A family's `# HELP` and `# TYPE` lines, `name` as given (a counter's `_total` is the caller's)."""
    if kind not in KINDS:
        raise ValueError(f"{name}: the type must be one of {', '.join(sorted(KINDS))}, got {kind!r}")
    escaped = help_text.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n"


def label_set(labels: Iterable[tuple[str, str]]) -> str:
    """`{name="value",...}` sorted by name, values escaped (backslash, newline, double quote); "" for none."""
    pairs = sorted(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def number(value: float) -> str:
    """A sample value as prometheus_client's `floatToGoString` writes it, which this must match.

    Python's shortest repr, except that a positive number with more than six digits before
    the point takes an exponent, as Go's formatting does: 5000000 is `5e+06`, 1763900000.5 is
    `1.7639000005e+09`. Infinities and NaN are `+Inf`, `-Inf` and `NaN`.
    """
    value = float(value)
    if -math.inf < value < 1e6:  # most values: repr as it is (NaN and the infinities fail the test)
        return repr(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text
