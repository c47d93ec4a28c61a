"""What the three `__main__` modules share: flag defaults from environment variables, argparse
types that name the bound they enforce, and one logging set-up (text or JSON lines)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")


class Environment:
    """Flag defaults read from `<prefix><NAME>` variables, e.g. SCALER_GRPC_PORT."""

    def __init__(self, prefix: str, environ: Mapping[str, str] = os.environ) -> None:
        self.prefix = prefix
        self._environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._environ.get(self.prefix + name, default)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean variable: 1, true, yes or on (any case) is true; absent is `default`."""
        return truthy(self.get(name, str(default)))


def truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg (and exception when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Logs to stderr at `level` (one of LOG_LEVELS) as `text` or `json` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
