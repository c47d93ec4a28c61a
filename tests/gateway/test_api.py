"""The gateway's APIs over a real port against a real Redis, with a fake worker on the other side
of the queue."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from contract import names
from tests.gateway.conftest import BODY, IMAGES


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def test_the_synchronous_api_answers_with_the_workers_images(gateway, pool):
    pending = pool.submit(gateway.post)
    job_id = gateway.worker().complete()
    response = pending.result(15)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == IMAGES
    assert isinstance(response.json()["created"], int)
    assert response.headers["X-Job-Id"] == job_id
    stored = gateway.job(job_id)
    assert json.loads(stored["request"])["prompt"] == BODY["prompt"]
    assert gateway.backlog() == 0  # FINISH acknowledged and deleted the entry


def test_a_job_submitted_asynchronously_is_queued_then_shows_its_images(gateway):
    response = gateway.post("/v1/jobs")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0 and job["data"] is None
    assert job["deadline"] == pytest.approx(job["created_at"] + gateway.config.request_timeout_s)
    assert len(job["id"]) >= 22  # 16 random bytes, URL-safe
    assert gateway.backlog() == 1
    assert gateway.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"

    assert gateway.worker().complete() == job["id"]
    done = gateway.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "done" and done["data"] == IMAGES and done["attempts"] == 1
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]


def test_delete_cancels_a_queued_job_and_a_worker_then_drops_it(gateway):
    job_id = gateway.post("/v1/jobs").json()["id"]
    response = gateway.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    worker = gateway.worker()
    assert worker.take() == job_id
    assert worker.start(job_id) == "final:cancelled"
    assert gateway.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_delete_cancels_a_running_job_and_its_late_result_does_not_overwrite_it(gateway):
    job_id = gateway.post("/v1/jobs").json()["id"]
    worker = gateway.worker()
    assert worker.take() == job_id and worker.start(job_id) == "run"
    assert gateway.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert worker.finish(job_id, "done", "result", json.dumps(IMAGES)) == 0
    assert gateway.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_delete_of_an_ended_job_is_refused_and_the_job_keeps_its_status(gateway):
    job_id = gateway.post("/v1/jobs").json()["id"]
    gateway.worker().complete()
    response = gateway.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["status"] == "done" and "done" in response.json()["detail"]
    assert gateway.get(f"/v1/jobs/{job_id}").json()["data"] == IMAGES


def test_unknown_jobs_are_404_for_get_and_delete(gateway):
    for path in ("/v1/jobs/no-such-job", "/v1/jobs/has%20a%20space"):
        assert gateway.get(path).status_code == 404
        assert gateway.delete(path).status_code == 404


def test_an_idempotent_retry_returns_the_same_job_and_enqueues_once(gateway):
    first = gateway.post("/v1/jobs", key="order-17")
    again = gateway.post("/v1/jobs", key="order-17")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert gateway.backlog() == 1
    other = gateway.post("/v1/jobs", key="order-18")
    assert other.json()["id"] != first.json()["id"] and gateway.backlog() == 2


def test_synchronous_retries_with_one_key_wait_for_the_same_job(gateway, pool):
    waiters = [pool.submit(gateway.post, key="same") for _ in range(2)]
    job_id = gateway.worker().complete()
    responses = [w.result(15) for w in waiters]
    assert [r.status_code for r in responses] == [200, 200]
    assert {r.headers["X-Job-Id"] for r in responses} == {job_id}
    assert gateway.backlog() == 0 and gateway.worker().take(block_s=0.2) is None


def test_a_key_reused_with_another_body_is_refused_naming_the_header_and_not_the_keys_job(gateway):
    job_id = gateway.post("/v1/jobs", key="k1").json()["id"]
    for path in ("/v1/jobs", "/v1/images/generations"):
        response = gateway.post(path, body={**BODY, "prompt": "something else"}, key="k1")
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        assert job_id not in response.text  # the id would let whoever reused the key read or cancel the job
    assert gateway.backlog() == 1


def test_a_key_whose_job_record_expired_is_refused_rather_than_silently_recomputed(gateway):
    job_id = gateway.post("/v1/jobs", key="k2").json()["id"]
    gateway.redis.delete(gateway.keys.job(job_id))  # what the result TTL does after the job ends
    response = gateway.post("/v1/jobs", key="k2")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert "expired" in response.json()["detail"][0]["msg"] and job_id not in response.text


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_invalid_input_is_422_naming_the_field_and_never_enqueued(gateway, path):
    response = gateway.post(path, body={"prompt": "x", "size": "100x100"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "size"]
    assert gateway.post(path, body={"n": 2}).json()["detail"][0]["loc"] == ["body", "prompt"]
    assert gateway.post(path, key="").json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert gateway.backlog() == 0


def test_a_size_over_max_image_side_is_422_naming_size_and_never_enqueued(start_gateway):
    gateway = start_gateway(max_image_side=512)
    for path in ("/v1/jobs", "/v1/images/generations"):
        for size in ("768x512", "512x1024"):
            response = gateway.post(path, body={**BODY, "size": size})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"] == ["body", "size"]
            assert "512" in response.json()["detail"][0]["msg"]
    assert gateway.backlog() == 0
    assert gateway.metric(names.GATEWAY_REJECTED + "_total", reason="invalid") == 4
    assert gateway.post("/v1/jobs", body={**BODY, "size": "512x512"}).status_code == 202


def test_the_default_max_image_side_is_the_workers_1024(gateway):
    assert gateway.post("/v1/jobs", body={**BODY, "size": "2048x2048"}).json()["detail"][0]["loc"] == ["body", "size"]
    assert gateway.post("/v1/jobs", body={**BODY, "size": "1024x1024"}).status_code == 202
    assert gateway.backlog() == 1


def test_a_full_backlog_is_429_with_retry_after_and_enqueues_nothing(start_gateway):
    gateway = start_gateway(max_backlog=2)
    assert [gateway.post("/v1/jobs").status_code for _ in range(2)] == [202, 202]
    for path in ("/v1/jobs", "/v1/images/generations"):
        refused = gateway.post(path)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0 and "--max-backlog" in refused.json()["detail"]
    assert gateway.backlog() == 2
    gateway.worker().complete()
    assert gateway.post("/v1/jobs").status_code == 202


def test_a_failed_job_is_500_with_the_workers_error(gateway, pool):
    pending = pool.submit(gateway.post)
    job_id = gateway.worker().fail("CUDA out of memory at batch 1")
    response = pending.result(15)
    assert response.status_code == 500
    assert "CUDA out of memory at batch 1" in response.json()["detail"]
    assert gateway.get(f"/v1/jobs/{job_id}").json()["error"] == "CUDA out of memory at batch 1"


def test_a_synchronous_request_whose_job_no_worker_started_is_504_and_the_job_expires_unstarted(start_gateway):
    gateway = start_gateway(request_timeout_s=1.0)
    began = time.monotonic()
    response = gateway.post()
    assert response.status_code == 504 and "deadline" in response.json()["detail"]
    assert 0.9 < time.monotonic() - began < 4
    job_id = response.headers["X-Job-Id"]
    assert gateway.job(job_id)["status"] == "queued"  # not cancelled: past its deadline, START expires it
    worker = gateway.worker()
    assert worker.take() == job_id and worker.start(job_id) == "expired"


def test_a_running_job_outlives_its_synchronous_timeout_and_its_result_is_readable_later(start_gateway, pool):
    gateway = start_gateway(request_timeout_s=1.5)
    pending = pool.submit(gateway.post, key="slow-render")
    worker = gateway.worker()
    job_id = worker.take()
    assert worker.start(job_id) == "run"
    response = pending.result(10)
    assert response.status_code == 504 and response.headers["X-Job-Id"] == job_id
    assert "running" in response.json()["detail"] and f"/v1/jobs/{job_id}" in response.json()["detail"]
    assert gateway.job(job_id)["status"] == "running"  # not cancelled under the worker
    assert worker.finish(job_id, "done", "result", json.dumps(IMAGES)) == 1
    assert gateway.get(f"/v1/jobs/{job_id}").json()["data"] == IMAGES
    retry = gateway.post(key="slow-render")  # a keyed retry finds the job and its result
    assert retry.status_code == 200 and retry.headers["X-Job-Id"] == job_id and retry.json()["data"] == IMAGES


def test_a_job_that_expired_unstarted_is_504_for_its_waiter(start_gateway, pool):
    gateway = start_gateway(request_timeout_s=3.0)
    pending = pool.submit(gateway.post)
    worker = gateway.worker()
    job_id = worker.take()
    assert worker.finish(job_id, "expired", "error", "past its deadline") == 1  # as a worker ends a late job
    response = pending.result(10)
    assert response.status_code == 504 and "deadline" in response.json()["detail"]


def test_a_client_that_goes_away_cancels_its_job(gateway):
    with pytest.raises(requests.Timeout):
        gateway.post(timeout_s=0.5)
    worker = gateway.worker()
    job_id = worker.take()
    gateway.wait_for(lambda: gateway.job(job_id)["status"] == "cancelled", timeout_s=5)
    assert worker.start(job_id) == "final:cancelled"


def test_a_client_with_an_idempotency_key_that_goes_away_leaves_its_job_for_the_retry(gateway, pool):
    with pytest.raises(requests.Timeout):
        gateway.post(key="may-retry", timeout_s=0.5)
    time.sleep(1.0)  # a cancel on disconnect comes within milliseconds (the test above)
    worker = gateway.worker()
    job_id = worker.take()
    assert gateway.job(job_id)["status"] == "queued"
    retry = pool.submit(gateway.post, key="may-retry")
    assert worker.start(job_id) == "run"
    assert worker.finish(job_id, "done", "result", json.dumps(IMAGES)) == 1
    response = retry.result(10)
    assert response.status_code == 200 and response.headers["X-Job-Id"] == job_id


def test_the_openapi_document_lists_both_apis(gateway):
    paths = gateway.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/images/generations"]["post"]["responses"]) >= {"200", "413", "422", "429", "500", "503", "504"}
    assert set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "202" in paths["/v1/jobs"]["post"]["responses"]
