"""The API keys shared by the worker and the gateway (`contract.apikey`): where keys come from,
what a check answers, and a key file's rotation, read as timelines (`now_s` is an argument).
The apps' own tests attack the check through their real HTTP servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from contract.apikey import (
    INVALID, MISSING, OK, RELOAD_CHECK_S, ApiKeys, RequireApiKey, api_keys_from, describe, parse_keys,
)
from contract.cli import Environment

OLD = "old-key-0123456789abcdef"
NEW = "new-key-fedcba9876543210"


def bearer(key: str) -> bytes:
    return f"Bearer {key}".encode()


def key_file(tmp_path, *keys: str):
    path = tmp_path / "api-keys"
    path.write_text("".join(key + "\n" for key in keys))
    return path


def test_each_line_is_a_key_and_blank_lines_and_spaces_around_are_ignored():
    keys = ApiKeys.from_text(f"\n  {OLD}  \n\n{NEW}\n", "test")
    assert len(keys) == 2
    assert keys.check(bearer(OLD), 0) == OK and keys.check(bearer(NEW), 0) == OK


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_no_key_is_an_error_never_an_open_api(text):
    with pytest.raises(ValueError, match="holds no API key"):
        parse_keys(text, "the file")


@pytest.mark.parametrize("bad", ["short-key", "has a space in it 0123", "quote\"d-0123456789abcdef", "ключ" * 5])
def test_a_key_that_could_not_be_sent_or_is_too_short_is_refused_without_repeating_it(bad):
    with pytest.raises(ValueError, match="line 2 of the file is not a usable API key") as raised:
        parse_keys(f"{OLD}\n{bad}\n", "the file")
    assert bad not in str(raised.value) and OLD not in str(raised.value)


@pytest.mark.parametrize(("header", "verdict"), [
    (None, MISSING),
    (b"", MISSING),
    (b"Bearer", MISSING),
    (b"Bearer   ", MISSING),
    (f"Basic {OLD}".encode(), MISSING),  # another scheme is no Bearer credential
    (OLD.encode(), MISSING),  # the bare key, without its scheme
    (bearer(OLD[:-1]), INVALID),  # a prefix of the key: a different length
    (bearer(OLD + "0"), INVALID),
    (bearer(OLD[:-1] + "X"), INVALID),  # same length, last character wrong
    (bearer(NEW), INVALID),
    (bearer(OLD), OK),
    (f"bearer {OLD}".encode(), OK),  # the scheme's case does not matter (RFC 7235)
    (f"BEARER  {OLD} ".encode(), OK),
])
def test_only_a_bearer_credential_holding_an_accepted_key_passes(header, verdict):
    assert ApiKeys.from_text(OLD, "test").check(header, 0) == verdict


def test_the_keys_are_kept_as_digests_and_never_shown(tmp_path):
    keys = ApiKeys.from_file(key_file(tmp_path, OLD), 0)
    held = repr(keys) + repr(vars(keys)) + describe(keys)
    assert OLD not in held and OLD.encode().hex() not in held
    assert "1 keys" in repr(keys) and str(tmp_path) in describe(keys)


def test_a_file_comes_before_the_variable_as_the_redis_password_does(tmp_path):
    env = Environment("APP_", {"APP_API_KEY": NEW})
    from_file = api_keys_from(str(key_file(tmp_path, OLD)), env, 0)
    assert from_file.check(bearer(OLD), 0) == OK and from_file.check(bearer(NEW), 0) == INVALID
    from_variable = api_keys_from(None, env, 0)
    assert from_variable.check(bearer(NEW), 0) == OK and from_variable.source == "the variable APP_API_KEY"
    assert api_keys_from(None, Environment("APP_", {}), 0) is None  # neither: no key needed (local use)


@pytest.mark.parametrize("value", ["", "  \n"])
def test_a_variable_set_and_empty_is_an_error_not_an_open_api(value):
    with pytest.raises(ValueError, match="the variable APP_API_KEY holds no API key"):
        api_keys_from(None, Environment("APP_", {"APP_API_KEY": value}), 0)


def test_an_empty_or_missing_file_is_an_error_naming_the_flag(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--api-key-file: .*empty holds no API key"):
        api_keys_from(str(empty), Environment("APP_", {"APP_API_KEY": NEW}), 0)  # the variable does not step in
    with pytest.raises(ValueError, match="--api-key-file .*missing: cannot read it: No such file"):
        api_keys_from(str(tmp_path / "missing"), Environment("APP_", {}), 0)


def test_rotation_add_the_new_key_move_the_clients_then_remove_the_old_one(tmp_path):
    now = 1000.0
    path = key_file(tmp_path, OLD)
    keys = ApiKeys.from_file(path, now)
    key_file(tmp_path, OLD, NEW)
    # Within the check interval the file is not looked at: no read per request.
    assert keys.check(bearer(NEW), now + 1) == INVALID
    assert keys.check(bearer(NEW), now + RELOAD_CHECK_S) == OK
    assert keys.check(bearer(OLD), now + RELOAD_CHECK_S) == OK  # both, while the clients move
    key_file(tmp_path, NEW)
    assert keys.check(bearer(OLD), now + RELOAD_CHECK_S + 1) == OK
    assert keys.check(bearer(OLD), now + 2 * RELOAD_CHECK_S) == INVALID
    assert keys.check(bearer(NEW), now + 2 * RELOAD_CHECK_S) == OK and len(keys) == 1


def test_a_kubernetes_secret_update_swapping_the_data_directory_is_picked_up(tmp_path):
    """A Secret volume is `key -> ..data/key`, `..data -> ..<timestamp>/`; an update writes a new
    directory and renames a new `..data` link over the old one. The new file may have the old
    one's size and modification time: its inode tells it apart."""
    first, second = tmp_path / "..2024_01", tmp_path / "..2024_02"
    first.mkdir()
    second.mkdir()
    (first / "key").write_text(OLD + "\n")
    (second / "key").write_text(NEW + "\n")
    mtime = (first / "key").stat().st_mtime_ns
    os.utime(second / "key", ns=(mtime, mtime))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "key").symlink_to("..data/key")
    keys = ApiKeys.from_file(tmp_path / "key", 0)
    assert keys.check(bearer(OLD), 0) == OK
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert keys.check(bearer(NEW), RELOAD_CHECK_S) == OK
    assert keys.check(bearer(OLD), RELOAD_CHECK_S) == INVALID


@pytest.mark.parametrize("breakage", ["empty", "bad line", "deleted"])
def test_a_broken_update_keeps_the_keys_in_force_and_logs_once(tmp_path, caplog, breakage):
    path = key_file(tmp_path, OLD)
    keys = ApiKeys.from_file(path, 0)
    if breakage == "deleted":
        path.unlink()
    else:
        path.write_text("\n" if breakage == "empty" else f"{OLD}\nshort\n")
    with caplog.at_level(logging.ERROR, logger="contract.apikey"):
        for step in range(1, 4):
            assert keys.check(bearer(OLD), step * RELOAD_CHECK_S) == OK
            assert keys.check(None, step * RELOAD_CHECK_S) == MISSING  # never turned off either
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the 1 in force" in errors[0] and OLD not in errors[0]
    key_file(tmp_path, NEW)  # mended: taken at the next look
    assert keys.check(bearer(NEW), 10 * RELOAD_CHECK_S) == OK


def call(app: RequireApiKey, scope: dict) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_two_authorization_headers_are_refused_rather_than_one_picked():
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    app = RequireApiKey(inner, ApiKeys.from_text(OLD, "test"))
    headers = [(b"authorization", bearer(OLD)), (b"authorization", bearer(NEW))]
    sent = call(app, {"type": "http", "path": "/v1/jobs", "headers": headers})
    assert reached == [] and sent[0]["status"] == 401
    assert json.loads(sent[1]["body"]) == {"detail": "an API key is required: send Authorization: Bearer <key>"}
    call(app, {"type": "http", "path": "/v1/jobs", "headers": headers[:1]})
    assert reached == ["/v1/jobs"]


def test_a_websocket_without_a_key_is_closed_before_it_is_accepted():
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    refusals = []
    app = RequireApiKey(inner, ApiKeys.from_text(OLD, "test"), on_refused=lambda: refusals.append(1))
    sent = call(app, {"type": "websocket", "path": "/ws", "headers": []})
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}] and refusals == [1]
