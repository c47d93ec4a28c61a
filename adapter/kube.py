"""The Kubernetes API, read-only: how many replicas a ScaledObject's scale target has.

`KubernetesReplicas` reads the ScaledObject (keda.sh/v1alpha1) for its `scaleTargetRef`,
then the target's `scale` subresource for `status.replicas`, with the blocking `kubernetes`
client on a worker thread, bounded by a timeout and cached for a TTL per ScaledObject. It
answers None when the API cannot say (off, outside a cluster, 403, unreachable, any other
error): the caller then falls back to the history rule. Why it cannot say is reported once
per change, in the log and through `on_fallback` (a metric).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# Why the API gives no count; each is a value of the fallback metric's reason label (adapter.metrics).
OFF = "off"  # --kubernetes-api off
NOT_IN_CLUSTER = "not_in_cluster"  # no in-cluster configuration (no service account token)
FORBIDDEN = "forbidden"  # 401/403: the ServiceAccount lacks the RBAC in manifests/base
UNREACHABLE = "unreachable"  # connection refused, reset, or no answer within the timeout
ERROR = "error"  # any other answer: 404 (no such ScaledObject), an unsupported target, a bad body
FALLBACK_REASONS = (OFF, NOT_IN_CLUSTER, FORBIDDEN, UNREACHABLE, ERROR)
MODES = ("auto", "off")

KEDA_GROUP, KEDA_VERSION, SCALEDOBJECTS = "keda.sh", "v1alpha1", "scaledobjects"


class CannotSay(Exception):
    """The API gave no replica count; `reason` is one of FALLBACK_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class _Cached:
    at: float
    replicas: int | None
    reason: str | None
    detail: str


def in_cluster_configuration() -> client.Configuration | None:
    """The service account's configuration when running in a pod; None elsewhere."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        return None
    return configuration


def _plural(kind: str) -> str:
    return kind.lower() + "s"  # Deployment, StatefulSet: what KEDA scales here


class KubernetesReplicas:
    """Replica counts of scale targets, from the API, cached `ttl_s` per ScaledObject."""

    def __init__(
        self,
        configuration: client.Configuration | None,
        *,
        ttl_s: float = 30.0,
        timeout_s: float = 2.0,
        unavailable: str = NOT_IN_CLUSTER,
        on_fallback: Callable[[str | None], None] = lambda reason: None,
    ):
        """`configuration` None: the API is never asked, and `unavailable` says why."""
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._on_fallback = on_fallback
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._reason: str | None = None
        self._api: client.CustomObjectsApi | None = None
        self._fixed: str | None = unavailable if configuration is None else None
        if configuration is not None:
            # One attempt per read: the refresher retries on its own schedule, and urllib3's
            # default retries would stretch a dead API past the timeout.
            configuration.retries = 0
            self._api_client = client.ApiClient(configuration)
            self._api = client.CustomObjectsApi(self._api_client)
        self._report(self._fixed, "the Kubernetes API is " + ("turned off (--kubernetes-api off)" if self._fixed == OFF
                                                           else "not configured (not running in a cluster)"))

    async def replicas(self, namespace: str, name: str, now: float) -> int | None:
        """The scale target's `status.replicas`, or None when the API cannot say. Never raises;
        asks the API at most once per `ttl_s` per ScaledObject, off the event loop thread."""
        if self._api is None:
            return None
        key = (namespace, name)
        cached = self._cache.get(key)
        if cached is None or now - cached.at >= self._ttl_s:
            cached = await self._ask(namespace, name, now)
            self._cache[key] = cached
            self._report(cached.reason, cached.detail)
        return cached.replicas

    def forget(self, namespace: str, name: str) -> None:
        self._cache.pop((namespace, name), None)

    def close(self) -> None:
        if self._api is not None:
            self._api_client.close()

    async def _ask(self, namespace: str, name: str, now: float) -> _Cached:
        try:
            async with asyncio.timeout(self._timeout_s + 0.5):  # a backstop: the client has its own
                replicas = await asyncio.to_thread(self._read, namespace, name)
        except CannotSay as e:
            return _Cached(now, None, e.reason, str(e))
        except TimeoutError:
            return _Cached(now, None, UNREACHABLE, f"no answer within {self._timeout_s:g}s")
        except Exception as e:  # never let the API fail a refresh: the history rule still works
            return _Cached(now, None, ERROR, f"{type(e).__name__}: {e}")
        return _Cached(now, replicas, None, "")

    def _read(self, namespace: str, name: str) -> int:
        """Blocking: the ScaledObject's scaleTargetRef, then that target's scale subresource."""
        assert self._api is not None
        so = self._get(f"ScaledObject {namespace}/{name}", self._api.get_namespaced_custom_object,
                       KEDA_GROUP, KEDA_VERSION, namespace, SCALEDOBJECTS, name)
        ref = (so.get("spec") or {}).get("scaleTargetRef") or {}
        kind = ref.get("kind") or "Deployment"
        api_version = ref.get("apiVersion") or "apps/v1"
        if not ref.get("name") or "/" not in api_version:
            raise CannotSay(ERROR, f"ScaledObject {namespace}/{name}: unsupported scaleTargetRef {ref}")
        group, version = api_version.split("/", 1)
        what = f"{kind} {namespace}/{ref['name']}"
        scale = self._get(f"the scale of {what}", self._api.get_namespaced_custom_object_scale,
                          group, version, namespace, _plural(kind), ref["name"])
        replicas = (scale.get("status") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or replicas < 0:
            raise CannotSay(ERROR, f"the scale of {what} has status.replicas {replicas!r}")
        return replicas

    def _get(self, what: str, call: Callable[..., dict], *args: str) -> dict:
        try:
            return call(*args, _request_timeout=self._timeout_s)
        except ApiException as e:
            if e.status == 0 or e.status is None:
                raise CannotSay(UNREACHABLE, f"reading {what}: {e.reason}") from e
            reason = FORBIDDEN if e.status in (401, 403) else ERROR
            raise CannotSay(reason, f"reading {what}: HTTP {e.status} {e.reason}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise CannotSay(UNREACHABLE, f"reading {what}: {type(e).__name__}: {e}") from e

    def _report(self, reason: str | None, detail: str) -> None:
        """Logs and reports why the history rule is in use, once per change of reason."""
        if reason == self._reason and reason is not None:
            return
        changed = reason != self._reason
        self._reason = reason
        self._on_fallback(reason)
        if reason is None:
            if changed:
                log.info("the Kubernetes API answers: an empty answer while it reports replicas is missing data")
            return
        log.warning("%s; the history rule decides whether an empty answer from Prometheus is 0 (%s)",
                    detail, reason)
