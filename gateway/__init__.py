"""The gateway: the front door that holds generation requests on the Redis job queue while no
worker exists, so the fleet can scale to zero (docs/GATEWAY.md).

| module | one sentence |
| --- | --- |
| `gateway/config.py` | the gateway's settings, parsed once and validated |
| `gateway/jobs.py` | the job queue as the gateway uses it: enqueue, read, wait, cancel (the Redis boundary) |
| `gateway/metrics.py` | the Prometheus metrics |
| `gateway/api.py` | HTTP only: routes, status codes, headers |
| `gateway/bodylimit.py` | an ASGI middleware refusing request bodies over a byte cap with 413 |
| `gateway/server.py` | uvicorn, with the consumer group created (and retried) beside it |
"""
