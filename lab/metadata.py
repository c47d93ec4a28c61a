"""Trigger metadata given on a lab command line, one `KEY=VALUE` at a time."""

from __future__ import annotations

import argparse


def metadata_item(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (key, value), both stripped; an argparse type, so it raises
    ArgumentTypeError naming the text when there is no `=` or no key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()
