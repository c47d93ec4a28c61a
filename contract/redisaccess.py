"""How the worker's and the gateway's Redis clients reach Redis: an ACL user and its password,
and TLS (`rediss://`) with the server checked against a CA and, for mutual TLS, a client
certificate. Parsed once from flags (`add_redis_flags`, `redis_access_from`) into `RedisAccess`,
which gives redis-py's keyword arguments.

Secrets never sit in a flag's value or a URL (`contract.jobqueue.redis_url_problem`): the
password comes from a file or an environment variable (`contract.jobqueue.password_from`), and
the private key from a file. Certificate checking is never turned off: without
`--redis-ca-file` the server's certificate is checked against the system's trusted CAs, and a
URL's `ssl_*` options, which would override these settings in redis-py, are refused.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from contract.cli import Environment
from contract.jobqueue import password_from

USERNAME_FLAG, PASSWORD_FLAG = "--redis-username", "--redis-password-file"
CA_FLAG, CERT_FLAG, KEY_FLAG = "--redis-ca-file", "--redis-cert-file", "--redis-key-file"


@dataclass(frozen=True)
class RedisAccess:
    """Who a client is to Redis and how it trusts the server.

    `username`: the ACL user (Redis 6+ `AUTH username password`); None: the `default` user.
    `password`: that user's password; never shown by repr. `ca_file`: PEM of the CAs that may
    sign the server's certificate (None: the system's). `cert_file` and `key_file`: the client's
    certificate and private key in PEM, for a server with `tls-auth-clients yes`; the key may sit
    in `cert_file`. The TLS files are loaded once here, so a missing, unreadable or mismatched
    file is a ValueError naming its flag at start-up rather than a refused connection later.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.username is not None and (not self.username or any(c.isspace() for c in self.username)):
            raise ValueError(f"{USERNAME_FLAG} must be a Redis ACL user name without spaces, not {self.username!r}")
        if self.key_file and not self.cert_file:
            raise ValueError(f"{KEY_FLAG} needs {CERT_FLAG}: the key is the private half of that certificate")
        if not self.tls_files:
            return
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"{CA_FLAG} {self.ca_file}: not a readable PEM file of CA certificates "
                                 f"({_reason(error)})") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(f"{CERT_FLAG} {self.cert_file}" + (f" with {KEY_FLAG} {self.key_file}" if self.key_file
                                 else "") + f": not a readable certificate and matching private key ({_reason(error)})"
                                 ) from None

    @property
    def tls_files(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def check_url(self, url: str, url_flag: str) -> None:
        """Raises ValueError naming the flags when TLS files come with a URL that is not
        `rediss://` (they would be ignored, or the connection sent in the clear)."""
        if self.tls_files and urlsplit(url).scheme != "rediss":
            given = CA_FLAG if self.ca_file else CERT_FLAG
            raise ValueError(f"{given} is for TLS: {url_flag} must then start with rediss://")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `redis.asyncio.Redis.from_url` (for a URL `check_url` passed):
        credentials, and the TLS files where given. With rediss://, redis-py requires a
        certificate and checks the host name by default; nothing here relaxes either."""
        options: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.ca_file:
            options["ssl_ca_certs"] = self.ca_file
        if self.cert_file:
            options["ssl_certfile"] = self.cert_file
            options["ssl_keyfile"] = self.key_file
        return options


def _reason(error: BaseException) -> str:
    return (error.strerror if isinstance(error, OSError) and error.strerror else None) or str(error)


def add_redis_flags(add: Callable[..., Any], env: Environment) -> None:
    """Adds the Redis access flags to a parser (`add` is its, or a group's, add_argument), each
    with its default from `<prefix><NAME>`."""
    prefix = env.prefix
    add(USERNAME_FLAG, default=env.get("REDIS_USERNAME"), metavar="USER",
        help=f"Redis ACL user to authenticate as; unset: the default user (env {prefix}REDIS_USERNAME)")
    add(PASSWORD_FLAG, default=env.get("REDIS_PASSWORD_FILE"), metavar="PATH",
        help=f"file holding the Redis password, e.g. a mounted Secret; unset, the variable {prefix}REDIS_PASSWORD "
             f"holds it, if any (env {prefix}REDIS_PASSWORD_FILE)")
    add(CA_FLAG, default=env.get("REDIS_CA_FILE"), metavar="PATH",
        help="PEM file of the CAs that sign the Redis server's certificate (rediss:// only); unset: the "
             f"system's trusted CAs. The certificate and host name are always checked (env {prefix}REDIS_CA_FILE)")
    add(CERT_FLAG, default=env.get("REDIS_CERT_FILE"), metavar="PATH",
        help="PEM file of the client certificate, for a Redis that requires one (tls-auth-clients; rediss:// "
             f"only) (env {prefix}REDIS_CERT_FILE)")
    add(KEY_FLAG, default=env.get("REDIS_KEY_FILE"), metavar="PATH",
        help=f"PEM file of the client certificate's private key, unless it is in {CERT_FLAG} "
             f"(env {prefix}REDIS_KEY_FILE)")


def redis_access_from(args: argparse.Namespace, env: Environment) -> RedisAccess:
    """`RedisAccess` from the flags `add_redis_flags` added; the password from the file, else
    the variable `<prefix>REDIS_PASSWORD`. Raises ValueError naming the flag of a bad value."""
    try:
        password = password_from(env.prefix + "REDIS_PASSWORD", args.redis_password_file)
    except OSError as error:
        raise ValueError(f"{PASSWORD_FLAG} {args.redis_password_file}: cannot read it: {_reason(error)}") from None
    return RedisAccess(username=args.redis_username, password=password, ca_file=args.redis_ca_file,
                       cert_file=args.redis_cert_file, key_file=args.redis_key_file)
