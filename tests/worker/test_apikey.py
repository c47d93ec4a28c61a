"""The worker's API key, attacked through the real HTTP server: no key, a wrong key, a key of
another length, the right one; the probes and /metrics stay open; a refusal never reaches the
batcher and never counts as an arrival. And `serve`'s flag: an empty key file exits 2."""

from __future__ import annotations

import pytest
import requests

from contract import names
from contract.apikey import ApiKeys
from worker.__main__ import main

KEY = "worker-key-0123456789abcdef"
ROTATED = "rotated-key-fedcba98765432"


@pytest.fixture
def keyed(start_worker):
    return start_worker(api_keys=ApiKeys.from_text(f"{KEY}\n{ROTATED}\n", "test"), api_key=KEY)


def generate(worker, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{worker.url}/v1/images/generations", json={"prompt": "a red fox", "num_inference_steps": 1},
                         headers=headers, timeout=60)


@pytest.mark.parametrize(("headers", "challenge"), [
    ({}, "Bearer"),
    ({"Authorization": f"Basic {KEY}"}, "Bearer"),
    ({"Authorization": "Bearer wrong-key-0123456789abcd"}, 'Bearer error="invalid_token"'),  # same length
    ({"Authorization": f"Bearer {KEY[:-1]}"}, 'Bearer error="invalid_token"'),  # one character short
    ({"Authorization": f"Bearer {KEY}{KEY}"}, 'Bearer error="invalid_token"'),  # the key, and more
])
def test_a_request_without_an_accepted_key_gets_401_and_never_reaches_the_pipeline(keyed, headers, challenge):
    answer = generate(keyed, headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == challenge
    assert set(answer.json()) == {"detail"} and KEY not in answer.text and KEY[:-1] not in answer.text
    assert keyed.runner.calls == []
    assert keyed.metric(names.HTTP_UNAUTHORIZED + "_total") == 1
    # refused clients are not arrivals: the scaler reads the requests counter's rate as such
    assert all(keyed.metric(names.REQUESTS + "_total", outcome=outcome) == 0 for outcome in names.OUTCOMES)


def test_each_accepted_key_is_served(keyed):
    assert keyed.post(num_inference_steps=1).status_code == 200
    answer = generate(keyed, {"Authorization": f"Bearer {ROTATED}"})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1
    assert keyed.metric(names.REQUESTS + "_total", outcome="ok") == 2
    assert keyed.metric(names.HTTP_UNAUTHORIZED + "_total") == 0


def test_the_probes_and_metrics_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(keyed.url + path, timeout=10).status_code == 200, path
    assert keyed.metric(names.HTTP_UNAUTHORIZED + "_total") == 0


def test_the_openapi_document_and_unknown_paths_need_the_key(keyed):
    for path in ("/openapi.json", "/docs", "/redoc", "/no-such-path"):
        assert requests.get(keyed.url + path, timeout=10).status_code == 401, path
    document = requests.get(keyed.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert document.status_code == 200
    assert "401" in document.json()["paths"]["/v1/images/generations"]["post"]["responses"]


def test_without_keys_the_api_is_open_for_local_use(start_worker):
    worker = start_worker()
    assert worker.post(num_inference_steps=1).status_code == 200
    assert "401" not in requests.get(worker.url + "/openapi.json", timeout=10).text


@pytest.mark.parametrize(("content", "message"), [("\n", "holds no API key"), ("short\n", "not a usable API key")])
def test_serve_refuses_an_empty_or_bad_key_file_with_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "keys"
    path.write_text(content)
    assert main(["serve", "--model", str(tmp_path), "--api-key-file", str(path)]) == 2
    error = capsys.readouterr().err
    assert "--api-key-file" in error and message in error and "short" not in error


def test_serve_refuses_a_set_but_empty_key_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKER_API_KEY", "")
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "WORKER_API_KEY holds no API key" in capsys.readouterr().err
