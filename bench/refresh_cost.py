"""What the background refresh of 500 ScaledObjects costs the scaler and Prometheus, with
one joined request per refresh (the scaler) against one request per query (a subclass that
forces the fallback), side by side in one run.

    .venv/bin/python bench/refresh_cost.py [--scaled-objects 500] [--seconds 20] [--rounds 2]

Each phase starts one scaler, registers every ScaledObject as KEDA would on first contact,
waits for the registration storm to pass, then reads both processes' CPU time from /proc
over the measured seconds. Nothing calls the scaler meanwhile: this is the refresh alone.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from lab.localprom import LocalPrometheus, free_port  # noqa: E402
from lab.synthetic import PodLoad, SyntheticPods  # noqa: E402
from bench.scaler_rpc import make_refs, process_cpu_s, register, start_scaler  # noqa: E402

SEPARATE = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'refresh_cost'; import adapter.signals as s; "
    "s.SignalReader._read_combined = lambda self, spec, names: s.asyncio.sleep(0); "
    "from adapter.__main__ import main; sys.exit(main())",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaled-objects", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    fleet = SyntheticPods()
    port = fleet.start()
    for i in range(args.scaled_objects):
        fleet.set_pod("bench", f"sd-{i}", f"sd-{i}-0", PodLoad(queue=3, gpu_util_percent=50))
    prometheus = LocalPrometheus([f"127.0.0.1:{port}"]).start()
    prometheus.wait_for_scrapes()
    time.sleep(1.5)
    refs = make_refs(args.scaled_objects, prometheus.url)
    commands = {"joined": [sys.executable, "-m", "adapter"], "separate": SEPARATE}
    rows = []
    try:
        for round_index in range(args.rounds):
            for name, command in commands.items():
                grpc_port = free_port()
                process = start_scaler(command, grpc_port, free_port())
                try:
                    register(f"127.0.0.1:{grpc_port}", refs)
                    time.sleep(6)  # one refresh period past the registration storm
                    scaler_before, prom_before = process_cpu_s(process.pid), process_cpu_s(prometheus.pid)
                    time.sleep(args.seconds)
                    scaler = (process_cpu_s(process.pid) - scaler_before) / args.seconds
                    prom = (process_cpu_s(prometheus.pid) - prom_before) / args.seconds
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(20)
                rows.append((round_index + 1, name, scaler, prom))
                print(f"round {round_index + 1} {name:9s} scaler {scaler:.3f} cores, prometheus {prom:.3f} cores", flush=True)
    finally:
        prometheus.close()
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
