"""Which pod holds which GPU, from the kubelet's PodResources API (the DaemonSet mode).

`List` over the kubelet's unix socket, cached for `ttl_s`. The kubelet rate-limits this
service (about 100 QPS, burst 10): a refused or failed call keeps the last good mapping, is
counted, and backs off. GPU device ids are UUIDs (`GPU-...`, `MIG-...`) or indexes, with
`::<n>` appended for time-slicing replicas.

gRPC and the generated stubs are imported by `PodResourcesCache` alone, so that a sidecar,
which never builds one, does not hold them in memory (about 13 MiB of RSS).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._proto import podresources_pb2 as pb

log = logging.getLogger("exporter.podresources")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu", "nvidia.com/mig-")


@dataclass(frozen=True, order=True)
class PodRef:
    pod: str
    namespace: str
    container: str


def device_key(device_id: str) -> str:
    """The GPU a device id names: time-slicing replicas (`<id>::<n>`) name their GPU."""
    return device_id.split("::", 1)[0]


def gpu_owners(response: pb.ListPodResourcesResponse) -> dict[str, tuple[PodRef, ...]]:
    """Device id (UUID or index) -> the containers holding it, from a List response."""
    owners: dict[str, set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if not devices.resource_name.startswith(GPU_RESOURCE_PREFIXES):
                    continue
                for device_id in devices.device_ids:
                    owners.setdefault(device_key(device_id), set()).add(PodRef(pod.name, pod.namespace, container.name))
    return {key: tuple(sorted(refs)) for key, refs in owners.items()}


class PodResourcesCache:
    """The last good GPU -> pod mapping, refreshed from the kubelet at most every `ttl_s`."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        ttl_s: float = 10.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.socket_path = socket_path
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.backoff_max_s = backoff_max_s
        self.errors: Counter[str] = Counter()  # by gRPC status name
        self.refreshes = 0
        self._owners: dict[str, tuple[PodRef, ...]] = {}
        self._next_at = 0.0
        self._backoff_s = ttl_s
        import grpc  # noqa: PLC0415 - DaemonSet mode only: see the module's docstring

        from ._proto import podresources_pb2, podresources_pb2_grpc  # noqa: PLC0415

        self._rpc_error = grpc.RpcError
        self._request = podresources_pb2.ListPodResourcesRequest()
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = podresources_pb2_grpc.PodResourcesListerStub(self._channel)

    def owners(self) -> dict[str, tuple[PodRef, ...]]:
        """The mapping, refreshed first when the TTL has passed; never raises."""
        now = self.clock()
        if now >= self._next_at:
            try:
                response = self._stub.List(self._request, timeout=self.timeout_s)
            except self._rpc_error as error:
                code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
                self.errors[code] += 1
                if self.errors[code] == 1 or code != "RESOURCE_EXHAUSTED":
                    log.warning("PodResources List failed (%s); keeping the last mapping", code)
                self._next_at = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
            else:
                self._owners = gpu_owners(response)
                self.refreshes += 1
                self._next_at = now + self.ttl_s
                self._backoff_s = self.ttl_s
        return self._owners

    def close(self) -> None:
        self._channel.close()
