"""The gateway reads no request body over its cap: 413 before the body is read when its declared
length is over, or as soon as a chunked body passes the cap; every valid request still fits."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from contract import names
from gateway.bodylimit import MAX_BODY_BYTES
from tests.gateway.conftest import BODY


def connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def test_a_declared_length_over_the_cap_is_413_before_the_body_is_read(gateway):
    conn = connection(gateway.url)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))  # a gigabyte announced; a few bytes sent
    conn.endheaders()
    conn.send(b'{"prompt": "')
    response = conn.getresponse()  # without the cap the server would wait for the rest (the timeout)
    assert response.status == 413
    assert str(MAX_BODY_BYTES) in json.loads(response.read())["detail"]
    conn.close()
    assert gateway.backlog() == 0


def test_a_chunked_body_is_413_once_it_passes_the_cap(gateway):
    conn = connection(gateway.url)
    conn.putrequest("POST", "/v1/images/generations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * 8192
    for _ in range(MAX_BODY_BYTES // len(chunk) + 1):  # past the cap, never the final empty chunk
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert gateway.backlog() == 0
    assert gateway.metric(names.GATEWAY_REJECTED + "_total", reason="invalid") == 1


def test_the_largest_valid_request_fits_under_the_cap(gateway):
    # Every character of both text fields at its longest JSON form, a surrogate-pair escape:
    # what Python's json.dumps (and requests' json=) sends for an emoji.
    largest = {**BODY, "prompt": "\U0001f30a" * 4000, "negative_prompt": "\U0001f30b" * 4000, "n": 10,
               "size": "1024x1024", "seed": 2**63 - 1, "guidance_scale": 29.999999999999996}
    body = json.dumps(largest).encode()
    assert MAX_BODY_BYTES * 0.6 < len(body) <= MAX_BODY_BYTES
    response = gateway.post("/v1/jobs", body=largest)
    assert response.status_code == 202, response.text[:300]
    assert gateway.backlog() == 1


def test_an_ordinary_body_passes_through_whole_and_a_waiting_client_can_still_be_seen_leaving(gateway):
    """The buffered body reaches the app, and after it the app's wait still hears the disconnect
    (the synchronous API cancels a keyless job whose client left)."""
    conn = connection(gateway.url)
    payload = json.dumps(BODY).encode()
    conn.request("POST", "/v1/images/generations", body=payload, headers={"Content-Type": "application/json"})
    worker = gateway.worker()
    job_id = worker.take()
    assert json.loads(gateway.job(job_id)["request"])["prompt"] == BODY["prompt"]
    conn.close()
    gateway.wait_for(lambda: gateway.job(job_id)["status"] == "cancelled", timeout_s=5)
