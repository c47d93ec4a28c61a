"""Trigger metadata values: the error a bad one raises, the key record, and each kind's parser.

`adapter/config.py` holds the table of keys (`METADATA_KEYS`) and the rules between them; this
module holds what one key needs on its own: `MetadataError`, `MetadataKey`, and the parsers that
turn a key's stripped text into its field's value, or raise MetadataError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from adapter import promql
from adapter.policy import COMBINE_MODES
from adapter.promql import parse_duration_seconds
from contract.jobqueue import CARRIES_PASSWORD, QueueKeys, redis_url_problem
from contract.names import SIGNALS

MAX_REPLICAS = 1_000_000
REPLICAS = "accepted: a whole number of replicas >= 0"


class MetadataError(ValueError):
    """A metadata value that cannot be used: names the key, the value and what is accepted.

    `key` is a metadata key (one of KNOWN_KEYS), `value` its text (None when it is missing)
    and `accepted` the sentence that says what would do; str() reads
    `trigger metadata <key>: <value!r> is not valid; <accepted>`.
    """

    def __init__(self, key: str, value: str | None, accepted: str):
        self.key = key
        self.value = value
        self.accepted = accepted
        # A tenant's text, bounded: it reaches the log and KEDA's status.
        shown = "missing" if value is None else repr(value if len(value) <= 300 else value[:300] + "...")
        super().__init__(f"trigger metadata {key}: {shown} is not valid; {accepted}")


@dataclass(frozen=True)
class MetadataKey:
    """One row of the metadata table: a key, the field it sets, how its text is read.

    `parse(key, text)` turns the key's stripped, non-empty text into the field's value, or
    raises MetadataError(key.name, text, ...). `above` is an exclusive lower bound, `at_least`
    and `at_most` inclusive ones, for the number and replica-count parsers. `accepted` is what a
    rejection of this key says is accepted.
    """

    name: str
    owner: type  # PolicySpec, ScalerSpec or Queries
    field: str
    parse: Callable[[MetadataKey, str], Any]
    accepted: str
    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None

    @property
    def default(self) -> Any:
        """The field's default in `owner`; None where it has none (a required key, a query)."""
        [spec_field] = [f for f in dataclasses.fields(self.owner) if f.name == self.field]
        if spec_field.default is not dataclasses.MISSING:
            return spec_field.default
        if spec_field.default_factory is not dataclasses.MISSING:
            return spec_field.default_factory()
        return None


# -- parsers: (key, stripped text) -> value, or MetadataError naming the key ----------------------


def text(key: MetadataKey, raw: str) -> str:
    return raw


def url(key: MetadataKey, raw: str) -> str:
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise MetadataError(key.name, raw, key.accepted)
    return raw.rstrip("/")


def redis_url(key: MetadataKey, raw: str) -> str:
    problem = redis_url_problem(raw, ("redis", "rediss"))
    if problem == CARRIES_PASSWORD:  # shown without what precedes the @ or the query: never logged
        parts = urllib.parse.urlsplit(raw)
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2], query="").geturl()
        raise MetadataError(key.name, shown, "credentials never go in metadata; the scaler reads the password "
                            "from --redis-password-file or SCALER_REDIS_PASSWORD")
    if problem is not None:
        raise MetadataError(key.name, raw, key.accepted)
    parts = urllib.parse.urlsplit(raw)
    if (parts.query or parts.fragment
            or not re.fullmatch(r"/?|/[0-9]{1,5}", parts.path)):
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def stream(key: MetadataKey, raw: str) -> str:
    try:
        QueueKeys(stream=raw)
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    return raw


def matching(pattern: re.Pattern[str]) -> Callable[[MetadataKey, str], str]:
    def parse(key: MetadataKey, raw: str) -> str:
        if not pattern.match(raw):
            raise MetadataError(key.name, raw, key.accepted)
        return raw

    return parse


def selector(key: MetadataKey, raw: str) -> str:
    try:
        promql.parse_selector(raw)  # the direct-scrape source reads it with the same parser
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    return raw


def duration(key: MetadataKey, raw: str) -> str:
    try:
        seconds = parse_duration_seconds(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def number(key: MetadataKey, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key.name, raw, key.accepted) from None
    if (
        not math.isfinite(value)
        or (key.above is not None and value <= key.above)
        or (key.at_least is not None and value < key.at_least)
        or (key.at_most is not None and value > key.at_most)
    ):
        raise MetadataError(key.name, raw, key.accepted)
    return value


def count(key: MetadataKey, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise MetadataError(key.name, raw, REPLICAS)
    value = int(raw)
    if value > MAX_REPLICAS:
        raise MetadataError(key.name, raw, f"accepted: a whole number of replicas from 0 to {MAX_REPLICAS}")
    if key.at_least is not None and value < key.at_least:
        raise MetadataError(key.name, raw, key.accepted)
    return value


def combine(key: MetadataKey, raw: str) -> str:
    if raw not in COMBINE_MODES:
        raise MetadataError(key.name, raw, key.accepted)
    return raw


def signals(key: MetadataKey, raw: str) -> tuple[str, ...]:
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names or any(n not in SIGNALS for n in names):
        raise MetadataError(key.name, raw, key.accepted)
    return tuple(s for s in SIGNALS if s in names)


def weights(key: MetadataKey, raw: str) -> dict[str, float]:
    weights = dict(key.default)  # a signal the text leaves out keeps its default weight
    for part in raw.split(","):
        name, sep, number = part.partition("=")
        name = name.strip()
        try:
            value = float(number)
        except ValueError:
            raise MetadataError(key.name, raw, key.accepted) from None
        if not sep or name not in SIGNALS or not math.isfinite(value) or value < 0:
            raise MetadataError(key.name, raw, key.accepted)
        weights[name] = value
    return weights
