"""Load-test a deployed worker (or a Service in front of many) with Locust.

    pip install locust
    locust -f bench/locustfile.py --host http://worker.example:8000 --users 32 --spawn-rate 4 \
        --run-time 5m --headless

Settings come from the environment: PROMPT, SIZE (default 512x512), STEPS (20), IMAGES (n, 1),
GUIDANCE (7.5), WAIT_S (think time between a user's requests, default 0: closed loop), API_KEY
(sent as `Authorization: Bearer`, for a worker or gateway run with --api-key-file).
Responses are checked, not just counted: a 200 must carry IMAGES base64 PNGs. 429 and 503 are
reported under their own names so backpressure is visible apart from real failures.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, constant, task

BODY = {
    "prompt": os.environ.get("PROMPT", "a lighthouse on a cliff at dusk, oil painting"),
    "size": os.environ.get("SIZE", "512x512"),
    "num_inference_steps": int(os.environ.get("STEPS", "20")),
    "n": int(os.environ.get("IMAGES", "1")),
    "guidance_scale": float(os.environ.get("GUIDANCE", "7.5")),
}
PNG_B64_PREFIX = "iVBORw0KGgo"  # base64 of the PNG signature
HEADERS = {"Authorization": f"Bearer {os.environ['API_KEY']}"} if os.environ.get("API_KEY") else {}


class ImageClient(HttpUser):
    wait_time = constant(float(os.environ.get("WAIT_S", "0")))

    @task
    def generate(self) -> None:
        body = {**BODY, "seed": random.randrange(2**31)}
        with self.client.post("/v1/images/generations", json=body, headers=HEADERS, catch_response=True,
                              name="/v1/images/generations") as response:
            if response.status_code in (429, 503):
                response.failure(f"backpressure {response.status_code} Retry-After={response.headers.get('Retry-After')}")
                response.request_meta["name"] = f"/v1/images/generations [{response.status_code}]"
            elif response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            else:
                data = response.json().get("data", [])
                if len(data) != BODY["n"] or not all(item.get("b64_json", "").startswith(PNG_B64_PREFIX) for item in data):
                    response.failure("200 without the expected PNG images")
