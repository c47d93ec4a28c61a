"""Instant queries against the Prometheus HTTP API, returning plain values.

A query answers its samples (an empty list for an empty result) or raises QueryError: an
empty vector is a legitimate answer (no series match), a transport or PromQL failure is not,
and the two are never confused.

The client is aiohttp on the scaler's event loop rather than requests on a thread pool:
measured on the CI machine it costs 570 us of CPU per query against 1,830 us for a
requests Session (docs/BENCHMARKS.md), its timeout bounds the whole exchange (requests'
only bounds each socket read), and a cancelled refresh really stops.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiohttp


class QueryError(Exception):
    """A query that gave no usable answer: timeout, transport error, PromQL error, bad shape."""

    def __init__(self, message: str, rejected: bool = False):
        super().__init__(message)
        # True when Prometheus refused the query itself (bad PromQL, a type error), as
        # opposed to not answering: asking again in another form may work.
        self.rejected = rejected


@dataclass(frozen=True)
class Sample:
    """One series of an instant query's answer; a scalar answer has no labels."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class PrometheusAuth:
    """Scaler-side credentials (KEDA does not forward TriggerAuthentication to external scalers)."""

    bearer_token_file: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False


class PrometheusClient:
    """One keep-alive connection pool for every target; use from one event loop."""

    def __init__(self, auth: PrometheusAuth = PrometheusAuth(), user_agent: str = "diffusion-scaler"):
        self._auth = auth
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = True
        if auth.insecure_skip_verify:
            self._ssl = False
        elif auth.ca_file:
            self._ssl = ssl.create_default_context(cafile=auth.ca_file)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            basic = aiohttp.BasicAuth(self._auth.username, self._auth.password or "") if self._auth.username else None
            # trust_env stays off: no proxy or netrc lookups per request.
            self._session = aiohttp.ClientSession(headers=self._headers, auth=basic)
        return self._session

    def _bearer(self) -> dict[str, str]:
        if not self._auth.bearer_token_file:
            return {}
        # Read on every query: projected service-account tokens are rotated in place.
        try:
            with open(self._auth.bearer_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise QueryError(f"cannot read bearer token file {self._auth.bearer_token_file}: {e}") from e
        return {"Authorization": f"Bearer {token}"}

    async def query(self, base_url: str, promql: str, timeout_s: float) -> list[Sample]:
        """Evaluates `promql` now (an instant query); the whole exchange is bounded by `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().get(
                    f"{base_url}/api/v1/query",
                    # Prometheus reads a bare number as seconds; "0.3s" would be a 400.
                    params={"query": promql, "timeout": f"{timeout_s:g}"},
                    headers=self._bearer(),
                    ssl=self._ssl,
                ) as response:
                    status = response.status
                    try:
                        body = await response.json(content_type=None)
                    except ValueError:
                        raise QueryError(f"HTTP {status}, not a Prometheus API answer") from None
        except TimeoutError:
            raise QueryError(f"no answer within {timeout_s:g}s") from None
        except aiohttp.ClientError as e:
            raise QueryError(f"request to {base_url} failed: {_describe(e)}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error", "") if isinstance(body, dict) else ""
            raise QueryError(f"HTTP {status}: {detail or 'query failed'}", rejected=status in (400, 422))
        return _samples(body.get("data"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _samples(data: object) -> list[Sample]:
    if not isinstance(data, dict):
        raise QueryError("answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        if kind == "vector":
            return [Sample(dict(item.get("metric", {})), float(item["value"][1])) for item in result]
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        raise QueryError(f"malformed {kind} result") from None
    raise QueryError(f"query returned a {kind}; an instant vector or a scalar is needed", rejected=True)


def _describe(error: aiohttp.ClientError) -> str:
    """The root cause in one stable line (log lines are deduplicated by message)."""
    cause = getattr(error, "os_error", None) or error
    text = str(cause) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."
