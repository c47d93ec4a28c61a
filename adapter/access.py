"""What a ScaledObject's trigger metadata may make the scaler reach (docs/SECURITY.md).

Whoever may create a ScaledObject in any namespace writes its metadata, and one scaler serves
the whole cluster. The rules here keep one tenant from using the scaler against the others or
against the cluster:

- **Credentials go only where the operator said.** The scaler's Prometheus credentials are
  bound to `--prometheus-address`, its Redis password to `--redis-address`; a ScaledObject that
  names another address is read without them (`Endpoint.same_as`), or refused where the
  operator lists the addresses metadata may name (`--allowed-prometheus-urls`).
- **Addresses are checked.** `http`/`https` (Prometheus) and `redis`/`rediss` only, no
  redirects, and no address in `--denied-networks` (loopback, link-local with the cloud
  metadata endpoints, unspecified) unless the operator configured that address itself. An IP
  literal is refused when the metadata is parsed; a host name when it resolves, at connect time
  (`check_resolved`, used by adapter/prometheus.py's resolver and adapter/redisqueue.py).
- **Namespaces are confined.** A ScaledObject's queries see only series with its own
  `namespace` label (`confine_selector`, `check_query`), and it reads only its own namespace's
  streams (`stream_namespace`), unless the operator allows cross-namespace reads.
- **Errors are bounded.** What a backend answered reaches a log line or a gRPC status only as
  `excerpt`, never as a whole body.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import promql_parser

from contract.jobqueue import stream_namespace

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses no Prometheus or Redis of a tenant's lives at, and that a request from the scaler's
# pod must not reach on a tenant's word: the pod's own loopback (the scaler's /metrics), link-local
# (169.254.169.254 is the AWS, GCP, Azure and OpenStack metadata endpoint), AWS's IPv6 metadata
# endpoint, Alibaba Cloud's, and the unspecified addresses.
DEFAULT_DENIED_NETWORKS = (
    "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128",
    "100.100.100.200/32",
)  # fmt: skip
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
# For a lab whose every server runs on loopback (the local stack, the tests): the rest still hold.
DENIED_NETWORKS_BUT_LOOPBACK = tuple(n for n in DEFAULT_DENIED_NETWORKS if n not in LOOPBACK_NETWORKS)
EXCERPT_CHARS = 200  # of a backend's answer, in an error


def excerpt(text: object, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line, control characters replaced, cut to `limit` characters with "...":
    what a backend (a tenant's server, perhaps) said, safe to log and to return over gRPC."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))
    return flat if len(flat) <= limit else flat[:limit] + "..."


def parse_networks(texts: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDR blocks (`169.254.0.0/16`, `fe80::/10`, or one address); raises ValueError naming the bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text.strip()!r} is not a CIDR block such as 169.254.0.0/16 or fe80::/10") from None
    return tuple(networks)


def denied(address: str, networks: Sequence[IpNetwork]) -> IpNetwork | None:
    """The network of `networks` that holds the IP address `address` (an IPv4-mapped IPv6
    address counts as its IPv4 one), or None; None for a text that is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return next((n for n in networks if ip.version == n.version and ip in n), None)


@dataclass(frozen=True)
class Endpoint:
    """A URL's scheme, host (lower case) and port (the scheme's default filled in) and path,
    compared as a browser compares origins: `http://prom:9090` is not `http://prom:9090.evil`."""

    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def of(cls, url: str) -> Endpoint:
        """Raises ValueError for a URL without a host or with a bad port."""
        parts = urllib.parse.urlsplit(url.strip())
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
        default = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme.lower())
        return cls(parts.scheme.lower(), parts.hostname.lower(), parts.port or default, parts.path.rstrip("/"))

    def same_server(self, other: Endpoint) -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)

    def same_as(self, other: Endpoint) -> bool:
        """The same server and path: where credentials bound to `other` may go."""
        return self.same_server(other) and self.path == other.path

    def within(self, prefix: Endpoint) -> bool:
        """The same server, and a path at or below `prefix`'s, at a segment boundary."""
        return self.same_server(prefix) and (self.path == prefix.path or self.path.startswith(prefix.path + "/"))


@dataclass(frozen=True)
class AccessRules:
    """The operator's rules for what metadata may reach (the scaler's flags; docs/SECURITY.md).

    `prometheus_address` and `redis_address` are where the scaler's credentials go, and the only
    places they go. `allowed_prometheus_urls` (empty: any address not denied) are the prefixes a
    metadata `prometheusAddress` must fall within. `denied_networks` holds no address a tenant
    may make the scaler connect to, unless it is one of the operator's own addresses above.
    `cross_namespace` lets a ScaledObject read other namespaces' series and streams (a trusted
    cluster only). `max_per_namespace` bounds the triggers one namespace may register.
    """

    prometheus_address: str | None = None
    redis_address: str | None = None
    allowed_prometheus_urls: tuple[str, ...] = ()
    denied_networks: tuple[IpNetwork, ...] = parse_networks(DEFAULT_DENIED_NETWORKS)
    cross_namespace: bool = False
    max_per_namespace: int = 200

    def operator_prometheus(self, url: str) -> bool:
        """Whether `url` is the operator's own: `--prometheus-address` or within an allowed prefix."""
        endpoint = Endpoint.of(url)
        if self.prometheus_address and endpoint.same_as(Endpoint.of(self.prometheus_address)):
            return True
        return any(endpoint.within(Endpoint.of(prefix)) for prefix in self.allowed_prometheus_urls)

    def prometheus_problem(self, url: str) -> str | None:
        """Why a metadata `prometheusAddress` is refused, or None."""
        if self.operator_prometheus(url):
            return None
        if self.allowed_prometheus_urls:
            return "this scaler only queries addresses within " + ", ".join(self.allowed_prometheus_urls)
        return self._host_problem(Endpoint.of(url).host)

    def redis_problem(self, url: str) -> str | None:
        """Why a metadata `redisAddress` is refused, or None."""
        endpoint = Endpoint.of(url)
        if self.redis_address and endpoint.same_server(Endpoint.of(self.redis_address)):
            return None
        return self._host_problem(endpoint.host)

    def redis_credentials(self, url: str) -> bool:
        """Whether the scaler's Redis password may be sent to `url`: it is the operator's Redis."""
        return bool(self.redis_address) and Endpoint.of(url).same_server(Endpoint.of(self.redis_address))

    def _host_problem(self, host: str) -> str | None:
        network = denied(host, self.denied_networks)
        if network is not None:
            return f"{host} is in {network}, a network this scaler does not connect to for metadata (--denied-networks)"
        return None


class Denied(OSError):
    """A host name resolved into a denied network: no connection was made."""


def check_resolved(host: str, addresses: Iterable[str], networks: Sequence[IpNetwork]) -> None:
    """Raises Denied when any address `host` resolved to is in `networks`: a name that resolves
    both inside and outside is refused, as the connection could go either way."""
    for address in addresses:
        network = denied(address, networks)
        if network is not None:
            raise Denied(f"{host} resolves to {address}, in {network}, a network this scaler does not connect to "
                         "for metadata (--denied-networks)")


# -- namespaces -------------------------------------------------------------------------------

NAMESPACE_LABEL = "namespace"


class Confinement(ValueError):
    """A selector, query or stream that would read outside the ScaledObject's namespace."""


def confine_selector(matchers: Sequence[tuple[str, str, str]], namespace: str) -> tuple[tuple[str, str, str], ...]:
    """The selector's matchers (as `adapter.promql.parse_selector` gives them) with
    `namespace="<namespace>"` first; raises Confinement when a namespace matcher names
    anything else (another namespace, a regular expression, a negation)."""
    own = (NAMESPACE_LABEL, "=", namespace)
    others = [m for m in matchers if m[0] == NAMESPACE_LABEL and m != own]
    if others:
        label, op, value = others[0]
        raise Confinement(f'{label}{op}"{value}" reads outside the ScaledObject\'s namespace: a ScaledObject in '
                          f'{namespace} reads namespace="{namespace}" only (the scaler\'s --allow-cross-namespace allows more)')
    return (own, *(m for m in matchers if m != own))


def check_query(query: str, namespace: str) -> None:
    """Raises Confinement unless every series selector in the PromQL `query` carries
    `namespace="<namespace>"` (in each `or` branch of its matchers): the only way a query reads
    only its own namespace's series. Parsed with promql-parser (a PromQL parser); a query it
    cannot parse is refused too, with its error."""
    try:
        expression = promql_parser.parse(query)
    except (ValueError, RuntimeError) as error:
        raise Confinement(f"cannot check which namespaces it reads: {excerpt(error)}") from None
    for selector in _selectors(expression):
        branches = [selector.matchers.matchers, *selector.matchers.or_matchers] if selector.matchers.or_matchers \
            else [selector.matchers.matchers]
        for branch in branches:
            if not any(m.name == NAMESPACE_LABEL and m.op == promql_parser.MatchOp.Equal and m.value == namespace
                       for m in branch):
                shown = selector.name or str(selector)
                raise Confinement(f'{excerpt(shown, 80)} has no namespace="{namespace}" matcher: a ScaledObject in '
                                  f'{namespace} reads its own namespace\'s series only (add the matcher to every '
                                  "selector; the scaler's --allow-cross-namespace allows more)")


def _selectors(node: Any) -> Iterable[Any]:
    """Every VectorSelector in a promql-parser expression tree."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _selectors(node.expr)
        if node.param is not None:
            yield from _selectors(node.param)
    elif isinstance(node, promql_parser.Call):
        for argument in node.args:
            yield from _selectors(argument)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from _selectors(node.expr)
    elif not isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
        raise Confinement(f"cannot check a {type(node).__name__} for the namespaces it reads")


def check_stream(stream: str, namespace: str) -> None:
    """Raises Confinement unless `stream` is one of `namespace`'s (`diffusion:<namespace>:<name>`,
    `contract.jobqueue.namespaced_stream`)."""
    owner = stream_namespace(stream)
    if owner != namespace:
        raise Confinement(f"a ScaledObject in {namespace} reads its own namespace's streams only: "
                          f'"diffusion:{namespace}:<name>", as the gateway and workers in {namespace} name it '
                          "(the scaler's --allow-cross-namespace allows more)")
