"""The gateway's API key, attacked through the real HTTP server against a real Redis: no key, a
wrong key, a key of another length, the right one, on every route of both APIs; nothing is
enqueued, read or cancelled for a refused request; the probes and /metrics stay open."""

from __future__ import annotations

import threading

import pytest
import requests

from contract import names
from contract.apikey import ApiKeys
from gateway.__main__ import main

from .conftest import BODY

KEY = "gateway-key-0123456789abcdef"
ROTATED = "rotated-key-fedcba987654321"
REFUSED = names.GATEWAY_REJECTED + "_total"


@pytest.fixture
def keyed(start_gateway):
    return start_gateway(api_keys=ApiKeys.from_text(f"{KEY}\n{ROTATED}\n", "test"), api_key=KEY)


WRONG = [
    ({}, "Bearer"),
    ({"Authorization": f"Basic {KEY}"}, "Bearer"),
    ({"Authorization": "Bearer wrong-key-0123456789abcde"}, 'Bearer error="invalid_token"'),  # same length
    ({"Authorization": f"Bearer {KEY[:-1]}"}, 'Bearer error="invalid_token"'),  # one character short
    ({"Authorization": f"Bearer {KEY}{KEY}"}, 'Bearer error="invalid_token"'),  # the key, and more
]


@pytest.mark.parametrize(("headers", "challenge"), WRONG)
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_a_post_without_an_accepted_key_gets_401_and_enqueues_nothing(keyed, path, headers, challenge):
    answer = requests.post(keyed.url + path, json=BODY, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == challenge
    assert set(answer.json()) == {"detail"} and KEY not in answer.text and KEY[:-1] not in answer.text
    assert keyed.backlog() == 0
    assert keyed.metric(REFUSED, reason="unauthorized") == 1
    assert keyed.metric(names.GATEWAY_ACCEPTED + "_total", api="sync") == 0
    assert keyed.metric(names.GATEWAY_ACCEPTED + "_total", api="async") == 0


@pytest.mark.parametrize(("headers", "challenge"), WRONG[::2])
def test_reading_or_cancelling_a_job_without_an_accepted_key_gets_401_and_leaves_it(keyed, headers, challenge):
    job_id = keyed.post("/v1/jobs").json()["id"]
    for method in (requests.get, requests.delete):
        answer = method(f"{keyed.url}/v1/jobs/{job_id}", headers=headers, timeout=10)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == challenge
        assert job_id not in answer.text
    assert keyed.job(job_id)["status"] == "queued"
    assert keyed.metric(REFUSED, reason="unauthorized") == 2


def test_each_accepted_key_is_served(keyed):
    submitted = keyed.post("/v1/jobs")
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    rotated = {"Authorization": f"Bearer {ROTATED}"}
    read = requests.get(f"{keyed.url}/v1/jobs/{job_id}", headers=rotated, timeout=10)
    assert read.status_code == 200 and read.json()["status"] == "queued"
    cancelled = requests.delete(f"{keyed.url}/v1/jobs/{job_id}", headers=rotated, timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert keyed.metric(REFUSED, reason="unauthorized") == 0


def test_the_synchronous_api_answers_with_the_key(keyed):
    worker = keyed.worker()
    done: list[requests.Response] = []
    client = threading.Thread(target=lambda: done.append(keyed.post()))
    client.start()
    worker.complete()
    client.join(30)
    assert done and done[0].status_code == 200 and done[0].json()["data"][0]["seed"] == 7
    assert keyed.metric(REFUSED, reason="unauthorized") == 0


def test_the_probes_and_metrics_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(keyed.url + path, timeout=10).status_code == 200, path
    assert keyed.metric(REFUSED, reason="unauthorized") == 0


def test_the_openapi_document_and_unknown_paths_need_the_key(keyed):
    for path in ("/openapi.json", "/docs", "/redoc", "/no-such-path"):
        assert requests.get(keyed.url + path, timeout=10).status_code == 401, path
    document = keyed.get("/openapi.json")
    assert document.status_code == 200
    assert "401" in document.json()["paths"]["/v1/jobs"]["post"]["responses"]


def test_an_unauthenticated_client_cannot_push_a_body_through(keyed):
    """The key is checked before the body is read: a large upload gets 401, not 413 or a read."""
    answer = requests.post(keyed.url + "/v1/jobs", data=b"x" * (200 * 1024), timeout=10,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 401
    assert keyed.metric(REFUSED, reason="invalid") == 0


def test_without_keys_the_api_is_open_for_local_use(gateway):
    assert gateway.post("/v1/jobs").status_code == 202
    assert "401" not in gateway.get("/openapi.json").text


@pytest.mark.parametrize(("content", "message"), [("\n", "holds no API key"), ("short\n", "not a usable API key")])
def test_an_empty_or_bad_key_file_exits_2_naming_the_flag(tmp_path, capsys, content, message):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        main(["--api-key-file", str(path)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--api-key-file" in error and message in error


def test_a_set_but_empty_key_variable_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("GATEWAY_API_KEY", " ")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "GATEWAY_API_KEY holds no API key" in capsys.readouterr().err
