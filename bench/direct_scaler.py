"""The comparison point for bench/scaler_rpc.py: the same scaler, but every GetMetrics queries
Prometheus before answering, as KEDA's built-in prometheus scaler does. Same code path as the
product (same reader, same policy), only the cache is bypassed.

    python bench/direct_scaler.py --grpc-port 6001 --http-port 9103
"""

from __future__ import annotations

import asyncio
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from adapter import __main__ as cli  # noqa: E402
from adapter import server as server_module  # noqa: E402
from adapter.service import ExternalScalerService  # noqa: E402


class QueryEveryCall(ExternalScalerService):
    async def _ready(self, ref):
        target = await super()._ready(ref)
        await self._registry.refresh(target)
        return target


def main() -> int:
    server_module.ExternalScalerService = QueryEveryCall
    args = cli.build_parser().parse_args()
    cli.configure_logging(args.log_level, args.log_format)
    asyncio.run(cli.serve(cli.config_from_args(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
