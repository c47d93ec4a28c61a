"""CPU per Prometheus query for the HTTP clients the scaler could use, side by side in one run.

    .venv/bin/python bench/http_client_cost.py [--queries 1000] [--rounds 3]

Each client sends the same joined instant query (three signals) to a real Prometheus,
sequentially, and the process's own CPU time (user + system) is divided by the number of
queries. Rounds alternate the clients so drift hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import resource
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import requests  # noqa: E402
import urllib3  # noqa: E402

from adapter.promql import builtin_queries  # noqa: E402
from contract.names import QUERIES, SIGNAL_LABEL  # noqa: E402
from lab.localprom import LocalPrometheus  # noqa: E402
from lab.synthetic import PodLoad, SyntheticPods  # noqa: E402

# A target's joined refresh query, as adapter/signals.py builds it (queue, ready and GPU).
_QUERIES = builtin_queries('deployment="sd-3"', "1m")
QUERY = " or ".join(f'label_replace({getattr(_QUERIES, n)}, "{SIGNAL_LABEL}", "{n}", "", "")' for n in QUERIES[:3])


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def with_requests(url: str, n: int) -> None:
    session = requests.Session()
    for _ in range(n):
        session.get(url, params={"query": QUERY, "timeout": "2"}, timeout=2).json()


def with_urllib3(url: str, n: int) -> None:
    pool = urllib3.PoolManager()
    for _ in range(n):
        json.loads(pool.request("GET", url, fields={"query": QUERY, "timeout": "2"}, timeout=2).data)


def with_aiohttp(url: str, n: int) -> None:
    async def go():
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.get(url, params={"query": QUERY, "timeout": "2"}) as response:
                    await response.json()

    asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fleet = SyntheticPods()
    port = fleet.start()
    for i in range(50):
        fleet.set_pod("bench", f"sd-{i}", f"sd-{i}-0", PodLoad(queue=3, gpu_util_percent=50))
    clients = {"requests": with_requests, "urllib3": with_urllib3, "aiohttp": with_aiohttp}
    cost: dict[str, list[float]] = {name: [] for name in clients}
    with LocalPrometheus([f"127.0.0.1:{port}"]) as prometheus:
        prometheus.wait_for_scrapes()
        url = f"{prometheus.url}/api/v1/query"
        for _ in range(args.rounds):
            for name, run in clients.items():
                before = cpu_s()
                run(url, args.queries)
                cost[name].append((cpu_s() - before) / args.queries * 1e6)
    fleet.stop()
    for name, values in cost.items():
        values.sort()
        print(f"{name:9s} CPU per query: median {values[len(values) // 2]:6.0f} us  (min {values[0]:.0f}, max {values[-1]:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
