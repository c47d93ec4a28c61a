"""The local stack's offered load: a scenario's rate over time, played as open-loop Poisson arrivals."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Scenario:
    """Offered load in requests per second over a run of `length_s`: idle, a ramp, a burst, a cool-down
    (the idle phases at `idle_rps`, 0 for a scenario that opens and ends quiet)."""

    length_s: float
    idle_rps: float = 0.5
    peak_rps: float = 6.0
    burst_rps: float = 10.0

    def rate(self, t: float) -> float:
        phase = t / self.length_s
        if phase < 0.15:
            return self.idle_rps
        if phase < 0.45:
            return self.idle_rps + (phase - 0.15) / 0.30 * (self.peak_rps - self.idle_rps)
        if phase < 0.65:
            return self.burst_rps
        return self.idle_rps


@dataclass
class LoadStats:
    """What the load generator sent and what came back."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    arrivals: list[float] = field(default_factory=list)  # seconds from the scenario's start, as sent


async def generate_load(url: str, scenario: Scenario, steps: int, stats: LoadStats, stop: asyncio.Event,
                        started: float) -> None:
    """Open-loop Poisson arrivals at the scenario's rate until `stop`; each request in its own task."""
    rng = random.Random(7)
    tasks: set[asyncio.Task] = set()
    # No connection limit: a synchronous request through the gateway holds its connection while
    # it waits in the queue, and aiohttp's default of 100 would cap the backlog the client can make.
    # Idle connections are dropped after 2 s, before the gateway's or a worker's uvicorn closes
    # them at 5 s: reusing one as the server closes it loses the request ("Server disconnected";
    # one CI run failed a request so, after an idle phase).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)) as session:

        async def one() -> None:
            try:
                body = {"prompt": "a lighthouse at dusk", "num_inference_steps": steps, "seed": rng.randrange(1 << 30)}
                async with session.post(url, json=body) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except aiohttp.ClientError:
                ok = False
            stats.ok += ok
            stats.failed += not ok

        while not stop.is_set():
            rate = scenario.rate(time.monotonic() - started)
            if rate <= 0:  # an idle phase: nothing arrives; look again shortly
                await asyncio.sleep(0.2)
                continue
            gap = rng.expovariate(rate)
            if gap > 1.0:  # the rate may change meanwhile: wait a second and draw again (memoryless)
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(gap)
            if stop.is_set():
                break
            stats.sent += 1
            stats.arrivals.append(time.monotonic() - started)
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
