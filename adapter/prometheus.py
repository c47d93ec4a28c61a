"""Instant queries against the Prometheus HTTP API, returning plain values.

A query answers one float, None for an empty result, or raises QueryError: an empty vector
is a legitimate answer (no series match), a transport or PromQL failure is not, and the two
are never confused.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import requests


class QueryError(Exception):
    """A query that gave no usable answer: timeout, transport error, PromQL error, bad shape."""


@dataclass(frozen=True)
class PrometheusAuth:
    """Scaler-side credentials (KEDA does not forward TriggerAuthentication to external scalers)."""

    bearer_token_file: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False


class PrometheusClient:
    """Thread-safe: each thread keeps its own keep-alive session."""

    def __init__(self, auth: PrometheusAuth = PrometheusAuth(), user_agent: str = "diffusion-scaler"):
        self._auth = auth
        self._user_agent = user_agent
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self._user_agent
            session.headers["Accept"] = "application/json"
            if self._auth.username is not None:
                session.auth = (self._auth.username, self._auth.password or "")
            if self._auth.insecure_skip_verify:
                session.verify = False
            elif self._auth.ca_file:
                session.verify = self._auth.ca_file
            self._local.session = session
        return session

    def _headers(self) -> dict[str, str]:
        if not self._auth.bearer_token_file:
            return {}
        # Read on every query: projected service-account tokens are rotated in place.
        try:
            with open(self._auth.bearer_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise QueryError(f"cannot read bearer token file {self._auth.bearer_token_file}: {e}") from e
        return {"Authorization": f"Bearer {token}"}

    def query(self, base_url: str, promql: str, timeout_s: float) -> float | None:
        """Evaluates `promql` now; one sample's value, or None when the result is empty."""
        try:
            response = self._session().get(
                f"{base_url}/api/v1/query",
                # Prometheus reads a bare number as seconds; "0.3s" would be a 400.
                params={"query": promql, "timeout": f"{timeout_s:g}"},
                headers=self._headers(),
                timeout=timeout_s,
            )
        except requests.Timeout:
            raise QueryError(f"no answer within {timeout_s:g}s") from None
        except requests.RequestException as e:
            raise QueryError(f"request to {base_url} failed: {_describe(e)}") from None
        try:
            body = response.json()
        except ValueError:
            raise QueryError(f"HTTP {response.status_code}, not a Prometheus API answer") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error", "") if isinstance(body, dict) else ""
            raise QueryError(f"HTTP {response.status_code}: {detail or 'query failed'}")
        return _single_value(body.get("data"))


def _single_value(data: object) -> float | None:
    if not isinstance(data, dict):
        raise QueryError("answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            return float(result[1])
        if kind == "vector":
            if not result:
                return None
            if len(result) > 1:
                raise QueryError(f"query returned {len(result)} series; aggregate it to one, e.g. with sum()")
            return float(result[0]["value"][1])
    except (TypeError, KeyError, IndexError, ValueError):
        raise QueryError(f"malformed {kind} result") from None
    raise QueryError(f"query returned a {kind}; an instant vector of one series or a scalar is needed")


def _describe(error: requests.RequestException) -> str:
    """The root cause in one stable line (log lines are deduplicated by message)."""
    inner = error.args[0] if error.args else None
    reason = getattr(inner, "reason", None) or inner or error
    text = str(reason)
    # urllib3 prefixes "HTTPConnection(host='h', port=9): "; the rest is the useful part
    text = re.sub(r"^HTTPS?Connection\([^)]*\): ", "", text)
    return text if len(text) <= 300 else text[:300] + "..."
