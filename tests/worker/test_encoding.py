"""PNG encoding in processes of its own: the same bytes as in a thread, and nothing lost when a
process dies."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client import CollectorRegistry

from contract import names
from worker.encoding import PngEncoder, encode_all
from worker.metrics import WorkerMetrics
from worker.service import WorkerLimits, WorkerService

from .test_drain import start_process


def pictures(count: int, side: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def decoded(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB"))


@pytest.fixture
def encoder():
    pool = PngEncoder(processes=2)
    pool.start()
    yield pool
    pool.close()


def test_processes_encode_the_same_pngs_as_a_thread_in_order(encoder):
    images = pictures(5)
    encoded = asyncio.run(encoder.encode(images))
    assert encoded == encode_all(images)
    for png, pixels in zip(encoded, images, strict=True):
        assert np.array_equal(decoded(png), pixels)


def test_a_killed_encoder_process_loses_no_answer_and_the_pool_is_replaced(encoder):
    images = pictures(3)
    victim = next(iter(encoder._current()._processes))
    os.kill(victim, signal.SIGKILL)
    answers = [asyncio.run(encoder.encode(images)) for _ in range(3)]
    assert all(answer == encode_all(images) for answer in answers)
    assert encoder.replaced == 1  # broken once, replaced once, the next calls on the new pool
    service = WorkerService(WorkerLimits(), WorkerMetrics(CollectorRegistry()))
    service.encoder = encoder
    restarts = {family.name: family.samples[0].value for family in service.metrics.registry.collect() if family.samples}
    assert restarts[names.ENCODER_RESTARTS] == 1  # exported, so a dashboard sees it


def test_a_thread_encodes_when_no_processes_are_asked_for_and_a_negative_count_is_refused():
    images = pictures(2)
    assert asyncio.run(PngEncoder(0).encode(images)) == encode_all(images)
    with pytest.raises(ValueError, match="--encode-processes"):
        PngEncoder(-1)


def test_a_served_worker_with_encoder_processes_answers_pictures(tiny_model):
    process, url = start_process(tiny_model, "--encode-processes", "1")
    try:
        response = requests.post(f"{url}/v1/images/generations", timeout=60,
                                  json={"prompt": "a lighthouse", "n": 2, "num_inference_steps": 2})
        assert response.status_code == 200, response.text
        shapes = {decoded(item["b64_json"]).shape for item in response.json()["data"]}
        assert shapes == {(64, 64, 3)}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # drained, and the encoder processes closed with it
