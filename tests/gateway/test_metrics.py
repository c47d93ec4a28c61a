"""The gateway's metrics move with what happens, each once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from contract import names

ACCEPTED = names.GATEWAY_ACCEPTED + "_total"
REJECTED = names.GATEWAY_REJECTED + "_total"


def test_accepted_counts_new_jobs_by_api_and_not_idempotent_replays(gateway):
    assert gateway.metric(ACCEPTED, api="sync") == 0 and gateway.metric(ACCEPTED, api="async") == 0
    for key in ("a", "a", "b", None):
        assert gateway.post("/v1/jobs", key=key).status_code == 202
    assert gateway.metric(ACCEPTED, api="async") == 3
    assert gateway.metric(ACCEPTED, api="sync") == 0


def test_rejections_are_counted_by_reason_and_accept_nothing(start_gateway):
    gateway = start_gateway(max_backlog=1)
    assert gateway.post("/v1/jobs", body={"prompt": ""}).status_code == 422
    assert gateway.post("/v1/jobs", key="k").status_code == 202
    assert gateway.post("/v1/jobs", body={"prompt": "other"}, key="k").status_code == 422
    assert gateway.post("/v1/jobs").status_code == 429
    assert gateway.metric(REJECTED, reason="invalid") == 2
    assert gateway.metric(REJECTED, reason="backlog_full") == 1
    assert gateway.metric(REJECTED, reason="redis_unavailable") == 0
    assert gateway.metric(ACCEPTED, api="async") == 1


def test_latency_and_queue_wait_are_observed_once_per_answer_and_per_job(gateway):
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gateway.post)
        gateway.worker().complete()
        assert pending.result(15).status_code == 200
    assert gateway.metric(names.GATEWAY_LATENCY + "_count") == 1
    assert gateway.metric(names.GATEWAY_QUEUE_WAIT + "_count") == 1

    job_id = gateway.post("/v1/jobs").json()["id"]
    gateway.get(f"/v1/jobs/{job_id}")  # still queued: no wait to observe yet
    assert gateway.metric(names.GATEWAY_QUEUE_WAIT + "_count") == 1
    gateway.worker().complete()
    for _ in range(3):
        assert gateway.get(f"/v1/jobs/{job_id}").json()["status"] == "done"
    assert gateway.metric(names.GATEWAY_QUEUE_WAIT + "_count") == 2
    assert gateway.metric(names.GATEWAY_LATENCY + "_count") == 1  # the asynchronous API is not in it


def test_the_backlog_gauge_follows_the_streams_length(gateway):
    assert gateway.metric(names.GATEWAY_BACKLOG) == 0
    for _ in range(3):
        gateway.post("/v1/jobs")
    gateway.wait_for(lambda: gateway.metric(names.GATEWAY_BACKLOG) == 3, timeout_s=5)
    gateway.worker().complete()
    gateway.wait_for(lambda: gateway.metric(names.GATEWAY_BACKLOG) == 2, timeout_s=5)


def test_the_demand_counts_the_image_steps_of_new_jobs_of_both_apis_when_enqueued(gateway):
    requested = names.GATEWAY_REQUESTED_IMAGE_STEPS + "_total"
    assert gateway.metric(requested) == 0
    triptych = {"prompt": "three lighthouses", "n": 3, "num_inference_steps": 4}
    assert gateway.post("/v1/jobs", body=triptych, key="k").status_code == 202
    assert gateway.post("/v1/jobs", body=triptych, key="k").status_code == 202  # a replay: not a new job
    assert gateway.post("/v1/jobs", body={"prompt": ""}).status_code == 422
    assert gateway.metric(requested) == 3 * 4
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(gateway.post, body={"prompt": "a pair", "n": 2, "num_inference_steps": 5})
        # counted when enqueued, while no worker runs: the demand in queue mode
        gateway.wait_for(lambda: gateway.metric(requested) == 3 * 4 + 2 * 5)
        worker = gateway.worker()
        worker.complete()
        worker.complete()
        assert waiting.result(15).status_code == 200
    assert gateway.metric(requested) == 3 * 4 + 2 * 5
