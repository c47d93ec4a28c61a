"""Instant queries against the Prometheus HTTP API, returning plain values.

A query answers its samples (an empty list for an empty result) or raises QueryError: an
empty vector is a legitimate answer (no series match), a transport or PromQL failure is not,
and the two are never confused.

The client is aiohttp on the scaler's event loop rather than requests on a thread pool:
measured on the CI machine it costs 570 us of CPU per query against 1,830 us for a
requests Session (docs/BENCHMARKS.md), its timeout bounds the whole exchange (requests'
only bounds each socket read), and a cancelled refresh really stops.

Two connection pools (adapter/access.py, docs/SECURITY.md): the operator's Prometheus
(`--prometheus-address`), the only one with the credentials, and every other address a
ScaledObject names, without credentials, whose host names are refused at connect time when they
resolve into a denied network. Neither follows a redirect, and an error carries at most an
excerpt of what the server answered.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from adapter.access import AccessRules, Endpoint, IpNetwork, check_resolved, excerpt


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

    def configured(self) -> bool:
        """Whether any credential is set (the CA file and the TLS switch are not credentials)."""
        return bool(self.bearer_token_file or self.username or self.password)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver, refusing a name that resolves into a denied network. It is asked at
    connect time, so the check holds for the address actually connected to, whatever the name
    resolved to when the metadata was parsed (DNS rebinding). aiohttp does not ask a resolver
    for an IP literal; `AccessRules.prometheus_problem` refuses those when the metadata is parsed."""

    def __init__(self, networks: Sequence[IpNetwork]):
        self._networks = networks
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        answers = await self._inner.resolve(host, port, family)
        check_resolved(host, (a["host"] for a in answers), self._networks)
        return answers

    async def close(self) -> None:
        await self._inner.close()


class PrometheusClient:
    """Keep-alive connection pools shared by every target; use from one event loop.

    `auth` goes only to `rules.prometheus_address` (same scheme, host, port and path): a
    ScaledObject naming any other address is read with no credentials, through a pool whose
    resolver refuses `rules.denied_networks` (`rules.allowed_prometheus_urls` are the operator's
    too: no credentials, no network check). Raises ValueError when credentials are set without
    `rules.prometheus_address`: they would have nowhere safe to go.
    """

    def __init__(self, auth: PrometheusAuth = PrometheusAuth(), user_agent: str = "diffusion-scaler",
                 rules: AccessRules = AccessRules()):
        if auth.configured() and not rules.prometheus_address:
            raise ValueError("Prometheus credentials are set (--prometheus-bearer-token-file, --prometheus-username) "
                             "but --prometheus-address (SCALER_PROMETHEUS_ADDRESS) is not: the scaler sends "
                             "them only to the address the operator configures, never to one a ScaledObject names")
        self._auth = auth
        self._rules = rules
        self._home = Endpoint.of(rules.prometheus_address) if rules.prometheus_address else None
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._ssl: ssl.SSLContext | bool = True
        if auth.insecure_skip_verify:
            self._ssl = False
        elif auth.ca_file:
            self._ssl = ssl.create_default_context(cafile=auth.ca_file)

    def _pool(self, base_url: str) -> tuple[str, aiohttp.ClientSession]:
        """("home", the credentialed pool) for the operator's Prometheus; ("trusted", ...) for an
        allowed prefix; ("tenant", the guarded pool) for anything else."""
        if self._home is not None and Endpoint.of(base_url).same_as(self._home):
            kind = "home"
        elif self._rules.operator_prometheus(base_url):
            kind = "trusted"
        else:
            kind = "tenant"
        session = self._sessions.get(kind)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._rules.denied_networks)) \
                if kind == "tenant" else aiohttp.TCPConnector()
            # trust_env stays off: no proxy or netrc lookups per request.
            session = self._sessions[kind] = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return kind, session

    def _credentials(self, kind: str) -> dict[str, str]:
        """The Authorization header for the operator's Prometheus; nothing for any other."""
        if kind != "home":
            return {}
        if self._auth.username:
            pair = f"{self._auth.username}:{self._auth.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
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
        kind, session = self._pool(base_url)
        try:
            async with asyncio.timeout(timeout_s):
                async with session.get(
                    f"{base_url}/api/v1/query",
                    # Prometheus reads a bare number as seconds; "0.3s" would be a 400.
                    params={"query": promql, "timeout": f"{timeout_s:g}"},
                    headers=self._credentials(kind),
                    ssl=True if kind == "tenant" else self._ssl,
                    # A redirect could take the request, and a header, anywhere: none is followed.
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if 300 <= status < 400:
                        location = excerpt(response.headers.get("Location", "nowhere"), 120)
                        raise QueryError(f"HTTP {status} redirect to {location}, not followed: set prometheusAddress "
                                         "to where Prometheus answers")
                    try:
                        body = await response.json(content_type=None)
                    except ValueError:
                        raise QueryError(f"HTTP {status}, not a Prometheus API answer") from None
        except TimeoutError:
            raise QueryError(f"no answer within {timeout_s:g}s") from None
        except aiohttp.ClientError as e:
            raise QueryError(f"request to {base_url} failed: {_describe(e)}") from None
        except OSError as e:  # the guarded resolver's refusal (access.Denied), outside ClientError
            raise QueryError(f"request to {base_url} refused: {excerpt(e, 300)}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            detail = body.get("error", "") if isinstance(body, dict) else ""
            raise QueryError(f"HTTP {status}: {excerpt(detail) or 'query failed'}", rejected=status in (400, 422))
        return _samples(body.get("data"))

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


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
    return excerpt(str(cause) or type(error).__name__, 300)
