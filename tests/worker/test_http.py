"""The worker through its real HTTP server with a real tiny pipeline on the CPU."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from worker.batching import BatchKey


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.int16)


def in_background(worker, bodies: list[dict]):
    pool = ThreadPoolExecutor(max_workers=len(bodies))
    return pool, [pool.submit(worker.post, **body) for body in bodies]


def queue_has(worker, images: int):
    worker.wait_for(lambda: worker.service.queue.waiting_images == images)


def test_a_request_returns_pngs_of_the_requested_size_and_their_seeds(start_worker):
    worker = start_worker()
    response = worker.post(n=2, size="64x128", seed=11)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int)
    assert [item["seed"] for item in body["data"]] == [11, 12]
    assert [pixels(item).shape for item in body["data"]] == [(128, 64, 3)] * 2


def test_concurrent_requests_form_batches(start_worker):
    worker = start_worker(max_batch_size=8)
    worker.runner.hold()
    pool, first = in_background(worker, [{"prompt": "first"}])
    worker.runner.entered.wait(10)
    pool2, rest = in_background(worker, [{"prompt": f"r{index}"} for index in range(6)])
    queue_has(worker, 6)
    worker.runner.release()
    assert all(f.result().status_code == 200 for f in first + rest)
    assert worker.metric("diffusion_batch_size_count") == 2
    assert worker.metric("diffusion_batch_size_sum") == 7
    assert worker.metric("diffusion_batch_size_bucket", le="6.0") == 2  # the six rode together
    pool.shutdown(), pool2.shutdown()


def test_incompatible_requests_are_not_mixed(start_worker):
    worker = start_worker(max_batch_size=8)
    worker.runner.hold()
    pool, first = in_background(worker, [{"prompt": "gate"}])
    worker.runner.entered.wait(10)
    kinds = [
        {"prompt": "small-1"}, {"prompt": "steps-1", "num_inference_steps": 3},
        {"prompt": "small-2"}, {"prompt": "wide-1", "size": "128x64"},
        {"prompt": "steps-2", "num_inference_steps": 3}, {"prompt": "cfg-1", "guidance_scale": 2.0},
    ]
    pool2, rest = in_background(worker, kinds)
    queue_has(worker, 6)
    worker.runner.release()
    assert all(f.result().status_code == 200 for f in first + rest)
    # arrival order among the six is up to the threads; which rode together is not
    batches = {key: sorted(prompts) for key, prompts, _ in worker.runner.calls[1:]}
    assert len(worker.runner.calls) == 5
    assert batches == {
        BatchKey(64, 64, 2, 7.5): ["small-1", "small-2"],
        BatchKey(64, 64, 3, 7.5): ["steps-1", "steps-2"],
        BatchKey(128, 64, 2, 7.5): ["wide-1"],
        BatchKey(64, 64, 2, 2.0): ["cfg-1"],
    }
    pool.shutdown(), pool2.shutdown()


def test_a_seed_gives_the_same_image_alone_and_inside_a_batch(start_worker):
    worker = start_worker(max_batch_size=8)
    alone = pixels(worker.post(seed=42, prompt="a red fox").json()["data"][0])
    other = pixels(worker.post(seed=43, prompt="a red fox").json()["data"][0])
    worker.runner.hold()
    pool, gate = in_background(worker, [{"prompt": "gate"}])
    worker.runner.entered.wait(10)
    pool2, batched = in_background(worker, [
        {"prompt": "something else", "seed": 7, "n": 2},
        {"prompt": "a red fox", "seed": 41, "n": 2},  # its second image has seed 42
        {"prompt": "a red fox", "seed": 42},
    ])
    queue_has(worker, 5)
    worker.runner.release()
    results = [f.result().json() for f in batched]
    gate[0].result()
    assert len(worker.runner.calls[-1][2]) == 5  # the five images ran as one batch
    for candidate in (pixels(results[1]["data"][1]), pixels(results[2]["data"][0])):
        difference = np.abs(candidate - alone)
        assert difference.max() <= 3 and difference.mean() < 0.5
    assert np.abs(other - alone).mean() > 5  # another seed is another picture
    pool.shutdown(), pool2.shutdown()


def test_a_full_queue_answers_429_with_retry_after(start_worker):
    worker = start_worker(max_batch_size=1, max_queue_images=4)
    worker.runner.hold()
    pool, running = in_background(worker, [{"prompt": "running"}])
    worker.runner.entered.wait(10)
    pool2, queued = in_background(worker, [{"n": 4}])
    queue_has(worker, 4)
    refused = worker.post(prompt="one too many")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue full" in refused.json()["detail"]
    worker.runner.release()
    assert running[0].result().status_code == 200 and queued[0].result().status_code == 200
    assert worker.metric("diffusion_requests_total", outcome="rejected") == 1
    assert worker.metric("diffusion_requests_total", outcome="ok") == 2
    pool.shutdown(), pool2.shutdown()


def test_a_request_past_its_timeout_gets_504_and_leaves_the_queue(start_worker):
    worker = start_worker(max_batch_size=1, request_timeout_s=0.5)
    worker.runner.hold()
    pool, running = in_background(worker, [{"prompt": "running"}])
    worker.runner.entered.wait(10)
    waiting = worker.post(prompt="waits too long")
    assert waiting.status_code == 504
    assert "request timeout of 0.5 s" in waiting.json()["detail"]
    assert worker.service.queue.waiting_images == 0
    worker.runner.release()
    assert running[0].result().status_code == 504  # its batch outlived the timeout too
    assert worker.metric("diffusion_requests_total", outcome="timeout") == 2
    assert len(worker.runner.calls) == 1  # the timed-out waiting request never ran
    pool.shutdown()


def test_a_client_that_disconnects_before_its_batch_starts_is_dropped(start_worker):
    worker = start_worker(max_batch_size=1)
    worker.runner.hold()
    pool, running = in_background(worker, [{"prompt": "running"}])
    worker.runner.entered.wait(10)
    host, port = worker.url.removeprefix("http://").split(":")
    body = b'{"prompt": "I will hang up", "num_inference_steps": 2}'
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        queue_has(worker, 1)
    worker.wait_for(lambda: worker.metric("diffusion_requests_total", outcome="cancelled") == 1)
    assert worker.service.queue.waiting_images == 0
    worker.runner.release()
    assert running[0].result().status_code == 200
    assert [prompts for _, prompts, _ in worker.runner.calls] == [["running"]]
    pool.shutdown()


def test_out_of_memory_splits_the_batch_and_lowers_the_max_batch_gauge(start_worker):
    worker = start_worker(max_batch_size=8)
    worker.runner.oom_above = 2
    worker.runner.hold()
    pool, gate = in_background(worker, [{"prompt": "gate"}])
    worker.runner.entered.wait(10)
    pool2, rest = in_background(worker, [{"prompt": f"r{index}", "seed": index} for index in range(4)])
    queue_has(worker, 4)
    worker.runner.release()
    assert all(f.result().status_code == 200 for f in gate + rest)
    assert [len(seeds) for _, _, seeds in worker.runner.calls] == [1, 4, 2, 2]
    assert worker.metric("diffusion_max_batch_size") == 2
    assert worker.metric("diffusion_images_total") == 5
    pool.shutdown(), pool2.shutdown()


def test_an_error_only_at_larger_batches_is_retried_in_halves_and_lowers_the_max_batch(start_worker):
    # Issue 12, case 3: the batch is cut when 4 images wait (the deadline is far), twice.
    worker = start_worker(max_batch_size=4, max_wait_s=30)
    worker.runner.fail_above = 2
    for round_ in range(2):
        pool, futures = in_background(worker, [{"prompt": f"r{round_}-{index}"} for index in range(4)])
        assert [f.result().status_code for f in futures] == [200] * 4
        pool.shutdown()
    assert [len(seeds) for _, _, seeds in worker.runner.calls] == [4, 2, 2, 2, 2]
    assert worker.metric("diffusion_max_batch_size") == 2
    assert worker.metric("diffusion_batch_splits_total") == 1
    assert worker.metric("diffusion_requests_total", outcome="ok") == 8


def test_a_poison_request_gets_500_with_its_own_error_and_its_batch_mates_get_images(start_worker):
    worker = start_worker(max_batch_size=4, max_wait_s=30)
    worker.runner.explode_on = "explode"
    bodies = [{"prompt": "fine-a"}, {"prompt": "explode"}, {"prompt": "fine-b"}, {"prompt": "fine-c"}]
    pool, futures = in_background(worker, bodies)
    statuses = {body["prompt"]: f.result() for body, f in zip(bodies, futures, strict=True)}
    pool.shutdown()
    assert statuses["explode"].status_code == 500
    assert "RuntimeError: injected pipeline failure" in statuses["explode"].json()["detail"]
    assert [statuses[p].status_code for p in ("fine-a", "fine-b", "fine-c")] == [200] * 3
    assert len(worker.runner.calls[0][2]) == 4  # they did share a batch
    assert worker.metric("diffusion_isolated_failures_total") == 1
    assert worker.metric("diffusion_max_batch_size") == 4


def test_a_pipeline_error_fails_its_batch_with_500_and_the_worker_keeps_serving(start_worker):
    worker = start_worker()
    worker.runner.explode_on = "explode"
    failed = worker.post(prompt="explode")
    assert failed.status_code == 500
    assert "RuntimeError: injected pipeline failure" in failed.json()["detail"]
    assert worker.post(prompt="fine").status_code == 200
    assert worker.metric("diffusion_requests_total", outcome="error") == 1
    assert worker.metric("diffusion_requests_total", outcome="ok") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"size": "512"}, "size"),
        ({"size": "100x100"}, "size"),
        ({"size": "4096x64"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -5}, "seed"),
        ({"size": "256x256"}, "size"),  # valid shape, beyond this worker's --max-image-side
    ],
)
def test_invalid_input_is_422_naming_the_field_and_never_reaches_the_pipeline(start_worker, body, field):
    worker = start_worker(max_image_side=128)
    response = worker.post(**body)
    assert response.status_code == 422, response.text
    assert any(error["loc"][-1] == field for error in response.json()["detail"])
    assert worker.runner.calls == []


def test_metrics_add_up_to_what_was_sent(start_worker):
    worker = start_worker(max_batch_size=4)
    sent = [{"n": 1}, {"n": 3}, {"n": 2, "size": "128x128"}, {"n": 1, "num_inference_steps": 3}]
    pool, futures = in_background(worker, sent)
    assert all(f.result().status_code == 200 for f in futures)
    m = worker.metrics()
    assert m[("diffusion_requests_total", (("outcome", "ok"),))] == 4
    assert m[("diffusion_images_total", ())] == 7
    assert m[("diffusion_batch_size_sum", ())] == 7
    assert m[("diffusion_request_duration_seconds_count", ())] == 4
    assert m[("diffusion_queue_wait_seconds_count", ())] == 4
    assert m[("diffusion_queue_depth", ())] == 0
    assert m[("diffusion_requests_in_flight", ())] == 0
    assert m[("diffusion_ready", ())] == 1
    assert m[("diffusion_max_batch_size", ())] == 4
    assert m[("diffusion_model_load_seconds", ())] > 0
    busy = m[("diffusion_busy_seconds_total", ())]
    assert 0 < busy <= m[("diffusion_request_duration_seconds_sum", ())]
    pool.shutdown()


def test_in_flight_and_queue_depth_show_waiting_work_during_a_batch(start_worker):
    worker = start_worker(max_batch_size=1)
    worker.runner.hold()
    pool, futures = in_background(worker, [{"prompt": "a"}, {"prompt": "b", "n": 2}, {"prompt": "c"}])
    queue_has(worker, 3)
    assert worker.metric("diffusion_requests_in_flight") == 3
    assert worker.metric("diffusion_queue_depth") == 3  # images, not requests
    worker.runner.release()
    assert all(f.result().status_code == 200 for f in futures)
    pool.shutdown()


def test_probes_and_the_openapi_document(start_worker):
    import requests

    worker = start_worker()
    assert requests.get(f"{worker.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{worker.url}/readyz", timeout=5).status_code == 200
    spec = requests.get(f"{worker.url}/openapi.json", timeout=5).json()
    assert "/v1/images/generations" in spec["paths"]


def test_metrics_pass_promtool_lint(start_worker):
    import requests

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool comes with the prometheus package (tools/ensure-prometheus.sh)")
    worker = start_worker()
    worker.post()
    text = requests.get(f"{worker.url}/metrics", timeout=5).text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
