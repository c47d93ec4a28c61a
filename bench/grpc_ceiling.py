"""The ceiling for bench/scaler_rpc.py: grpcio's asyncio server answering GetMetrics with a
constant, no lookup, no metrics. What the scaler cannot beat on the same cores.

    python bench/grpc_ceiling.py --listen-address 127.0.0.1 --grpc-port 6002 --http-port 9104
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from adapter._proto import externalscaler_pb2 as pb  # noqa: E402
from adapter._proto import externalscaler_pb2_grpc as pb_grpc  # noqa: E402

ANSWER = pb.GetMetricsResponse(metricValues=[pb.MetricValue(metricName="composite", metricValue=1, metricValueFloat=1.0)])


class Constant(pb_grpc.ExternalScalerServicer):
    async def GetMetrics(self, request, context):
        return ANSWER


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


async def serve(address: str, grpc_port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(Constant(), server)
    server.add_insecure_port(f"{address}:{grpc_port}")
    await server.start()
    await server.wait_for_termination()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-address", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True, help="answers /healthz, as the scaler does")
    args, _ = parser.parse_known_args()
    http = ThreadingHTTPServer((args.listen_address, args.http_port), _Healthy)
    Thread(target=http.serve_forever, daemon=True).start()
    asyncio.run(serve(args.listen_address, args.grpc_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
