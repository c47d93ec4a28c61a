"""API keys for the worker's and the gateway's HTTP APIs: the keys a server accepts (`ApiKeys`),
read from a file, a mounted Secret re-read when it changes, or from an environment variable, and
the ASGI middleware that answers 401 to a request without one of them (`RequireApiKey`).

The key travels as a Bearer token (RFC 6750): `Authorization: Bearer <key>`. A refusal carries
`WWW-Authenticate: Bearer`, plus `error="invalid_token"` when a key was sent and is not one of
those accepted (RFC 6750 section 3.1: no error code when the request had no credentials). Keys
are kept and compared as SHA-256 digests with `hmac.compare_digest`, against every accepted
key, so the time a check takes tells neither a key's length, nor how much of it matched, nor
which key it was; and the keys themselves are never held after loading, logged or echoed.

A file holds one key per line (blank lines ignored), so a key rotates without downtime: add the
new key as a second line, move the clients to it, then delete the old line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from contract.cli import Environment

log = logging.getLogger("contract.apikey")

# Probes and Prometheus must reach these without a key; every other route needs one, the
# OpenAPI document and its pages included (they describe the API to whoever may use it).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RELOAD_CHECK_S = 5.0  # a changed key file is noticed within this long (one stat(), never a read per request)
MIN_KEY_CHARS = 16  # `openssl rand -hex 32` gives 64
# RFC 6750's b64token: what may follow "Bearer " in the header, so a key outside it could never be sent
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

OK, MISSING, INVALID = "ok", "missing", "invalid"  # `ApiKeys.check`'s verdicts

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def parse_keys(text: str, source: str) -> tuple[bytes, ...]:
    """The SHA-256 digests of the keys in `text`, one key per line, surrounding whitespace and
    blank lines ignored. Raises ValueError naming `source` (never a key) when there is no key,
    or when a line is not a usable key: fewer than MIN_KEY_CHARS characters, or characters
    outside RFC 6750's token syntax (A-Z a-z 0-9 - . _ ~ + /, then = padding)."""
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key:
            continue
        if len(key) < MIN_KEY_CHARS or not _TOKEN.fullmatch(key):
            raise ValueError(f"line {number} of {source} is not a usable API key: keys are at least {MIN_KEY_CHARS} "
                             "characters of A-Z a-z 0-9 - . _ ~ + / (then = padding), e.g. `openssl rand -hex 32`")
        digests.append(_digest(key.encode()))
    if not digests:
        raise ValueError(f"{source} holds no API key (one per line); an empty key never turns the check off")
    return tuple(digests)


def _signature(path: Path) -> tuple[int, int, int, int]:
    """What changes when the file is rewritten or replaced. stat() follows symbolic links, so a
    Kubernetes Secret volume's update (a new directory swapped in under `..data`) shows."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


class ApiKeys:
    """The API keys a server accepts now, as digests; with a file, re-read when it changes.

    `now_s` arguments are monotonic seconds. The file's signature (inode, mtime, size) is
    checked at most every RELOAD_CHECK_S, and read again only when it changed. A reload that
    fails (the file gone, empty or holding a bad line) keeps the keys in force and logs the
    error once: the check is never turned off by a broken update, and never locks every
    client out either.
    """

    def __init__(self, digests: tuple[bytes, ...], source: str, path: Path | None = None,
                 now_s: float = 0.0) -> None:
        self._digests = digests
        self.source = source
        self.path = path
        self._signature = _signature(path) if path is not None else None
        self._checked_at_s = now_s
        self._failing = False  # the last reload failed, on the file as `_failed_signature` says
        self._failed_signature: tuple[int, int, int, int] | None = None

    @classmethod
    def from_file(cls, path: str | Path, now_s: float) -> ApiKeys:
        """Raises OSError when the file cannot be read, ValueError when it holds no usable key."""
        path = Path(path)
        return cls(parse_keys(path.read_text(), str(path)), str(path), path, now_s)

    @classmethod
    def from_text(cls, text: str, source: str) -> ApiKeys:
        """Keys given whole (an environment variable's value); they never change. Raises
        ValueError naming `source` when `text` holds no usable key."""
        return cls(parse_keys(text, source), source)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys from {self.source})"

    def refresh(self, now_s: float) -> None:
        """Re-reads the file if RELOAD_CHECK_S passed since the last look and it changed."""
        if self.path is None or now_s - self._checked_at_s < RELOAD_CHECK_S:
            return
        self._checked_at_s = now_s
        try:
            signature = _signature(self.path)
        except OSError as error:
            self._reload_failed(None, error)
            return
        if signature == self._signature or (self._failing and signature == self._failed_signature):
            return
        try:
            digests = parse_keys(self.path.read_text(), self.source)
        except (OSError, ValueError) as error:
            self._reload_failed(signature, error)
            return
        log.info("API keys reloaded from %s: %d now (%d before)", self.source, len(digests), len(self))
        self._digests, self._signature, self._failing = digests, signature, False

    def _reload_failed(self, signature: tuple[int, int, int, int] | None, error: Exception) -> None:
        """Logs a failed reload once per state of the file (None: gone); the keys stay."""
        if self._failing and signature == self._failed_signature:
            return
        self._failing, self._failed_signature = True, signature
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        log.error("could not reload the API keys from %s, keeping the %d in force: %s", self.source, len(self), reason)

    def check(self, authorization: bytes | None, now_s: float) -> str:
        """OK when `authorization` (the header's value) is `Bearer <an accepted key>`, MISSING
        when it is absent or not a Bearer credential, INVALID otherwise. The scheme's case is
        ignored (RFC 7235 section 2.1)."""
        self.refresh(now_s)
        if authorization is None:
            return MISSING
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return MISSING
        sent = _digest(token)
        matched = False
        for digest in self._digests:  # no early exit: the time taken does not tell which key matched
            matched |= hmac.compare_digest(sent, digest)
        return OK if matched else INVALID


# An OpenAPI response's description, for the routes that need a key
UNAUTHORIZED_DESCRIPTION = "No API key, or not one the server accepts (--api-key-file); WWW-Authenticate: Bearer"

_CHALLENGES = {MISSING: b"Bearer", INVALID: b'Bearer error="invalid_token"'}
_DETAILS = {MISSING: "an API key is required: send Authorization: Bearer <key>",
            INVALID: "the API key is not valid"}


class RequireApiKey:
    """Wraps an ASGI `app`: an HTTP (or WebSocket) request to a path outside `open_paths`
    without an accepted key gets 401 with `{"detail": ...}` and `WWW-Authenticate` and never
    reaches `app`; `on_refused` is called once per refusal. `clock` gives monotonic seconds."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str] = OPEN_PATHS,
                 on_refused: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.on_refused = on_refused
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The router matches the same `path`, so what is open here is exactly what it serves there.
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        verdict = self.keys.check(values[0] if len(values) == 1 else None, self.clock())
        if verdict == OK:
            await self.app(scope, receive, send)
            return
        self.on_refused()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
            return
        body = json.dumps({"detail": _DETAILS[verdict]}).encode()
        # The body, if any, is left unread: the connection closes after the answer.
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", _CHALLENGES[verdict]), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


FILE_FLAG = "--api-key-file"


def add_api_key_flag(add: Callable[..., Any], env: Environment) -> None:
    """Adds FILE_FLAG to a parser (`add` is its add_argument), its default from `<prefix>API_KEY_FILE`."""
    add(FILE_FLAG, default=env.get("API_KEY_FILE"), metavar="PATH",
        help=f"file of API keys, one per line (a mounted Secret; re-read within {RELOAD_CHECK_S:g} s of a change): "
             "every route but /healthz, /readyz and /metrics then needs Authorization: Bearer <key>; unset, the "
             f"variable {env.prefix}API_KEY holds them, if any; neither: no key is needed "
             f"(env {env.prefix}API_KEY_FILE)")


def api_keys_from(file: str | None, env: Environment, now_s: float) -> ApiKeys | None:
    """The keys from FILE_FLAG's `file`, else from the variable `<prefix>API_KEY` (the file
    first, as `contract.jobqueue.password_from`), else None: no key needed. Raises ValueError
    naming the flag or the variable when the file cannot be read or either holds no usable key."""
    if file:
        try:
            return ApiKeys.from_file(file, now_s)
        except OSError as error:
            raise ValueError(f"{FILE_FLAG} {file}: cannot read it: {error.strerror or error}") from None
        except ValueError as error:
            raise ValueError(f"{FILE_FLAG}: {error}") from None
    text = env.get("API_KEY")
    if text is None:
        return None
    # Set and empty (a Secret's key mapped to the variable, left blank) is an error, as an
    # empty file is: a missing key never turns the check off.
    return ApiKeys.from_text(text, f"the variable {env.prefix}API_KEY")


def describe(keys: ApiKeys | None) -> str:
    """One line for a start-up log: whether a key is needed, and where keys come from."""
    if keys is None:
        return f"no API key needed ({FILE_FLAG} unset): anyone who reaches the port may use the API"
    reload = f", re-read within {RELOAD_CHECK_S:g} s of a change" if keys.path is not None else ""
    return f"API key needed: {len(keys)} accepted, from {keys.source}{reload}"


def warn_if_open(keys: ApiKeys | None, host: str, logger: logging.Logger) -> None:
    """Logs `describe(keys)`, as a warning when no key is needed on an address beyond loopback."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if keys is None and not loopback:
        logger.warning(describe(keys))
    else:
        logger.info(describe(keys))
