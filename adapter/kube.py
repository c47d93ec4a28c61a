"""The Kubernetes API, read-only: how many ready replicas a ScaledObject's scale target has.

`KubernetesReplicas` reads the ScaledObject (keda.sh/v1alpha1) for its `scaleTargetRef`, then
the target itself for `status.readyReplicas`, with the blocking `kubernetes` client on a worker
thread, both requests inside one timeout, cached for a TTL per ScaledObject. It answers None
when the API cannot say (off, outside a cluster, 403, unreachable, any other error): the caller
then falls back to the history rule. Why it cannot say is kept per ScaledObject: the log says
so once per change of a ScaledObject's reason, and `on_fallback` gets how many ScaledObjects
fall back for each reason (a metric).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
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
# Kinds whose API omits status.readyReplicas when it is 0; any other kind must set it.
OMITS_ZERO_READY = {("apps", "Deployment"), ("apps", "StatefulSet"), ("apps", "ReplicaSet")}

Key = tuple[str, str]  # a ScaledObject's namespace and name


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
    """Ready replica counts of scale targets, from the API, cached `ttl_s` per ScaledObject."""

    def __init__(
        self,
        configuration: client.Configuration | None,
        *,
        ttl_s: float = 30.0,
        timeout_s: float = 2.0,
        unavailable: str = NOT_IN_CLUSTER,
        on_fallback: Callable[[Mapping[str, int]], None] = lambda counts: None,
    ):
        """`configuration` None: the API is never asked, and `unavailable` says why.
        `timeout_s` bounds one read, both of its requests together."""
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._on_fallback = on_fallback
        self._cache: dict[Key, _Cached] = {}
        self._reasons: dict[Key, str | None] = {}  # each known ScaledObject's reason, None: the API answered
        self._api: client.CustomObjectsApi | None = None
        self._fixed: str | None = unavailable if configuration is None else None
        if configuration is not None:
            # One attempt per request: the refresher retries on its own schedule, and urllib3's
            # default retries would stretch a dead API past the timeout.
            configuration.retries = 0
            self._api_client = client.ApiClient(configuration)
            self._api = client.CustomObjectsApi(self._api_client)
        else:
            log.warning("the Kubernetes API is %s; the history rule decides whether an empty answer from "
                        "Prometheus is 0 (%s)", "turned off (--kubernetes-api off)" if self._fixed == OFF
                        else "not configured (not running in a cluster)", self._fixed)

    async def replicas(self, namespace: str, name: str, now: float) -> int | None:
        """The scale target's ready replicas, or None when the API cannot say. Never raises;
        asks the API at most once per `ttl_s` per ScaledObject, off the event loop thread."""
        key = (namespace, name)
        if self._api is None:
            self._note(key, self._fixed, "")
            return None
        cached = self._cache.get(key)
        if cached is None or now - cached.at >= self._ttl_s:
            cached = await self._ask(namespace, name, now)
            self._cache[key] = cached
            self._note(key, cached.reason, cached.detail)
        return cached.replicas

    def forget(self, namespace: str, name: str) -> None:
        """Drops a ScaledObject the scaler no longer serves: its cached count and its reason."""
        self._cache.pop((namespace, name), None)
        if self._reasons.pop((namespace, name), None) is not None:
            self._report()

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
        """Blocking: the ScaledObject's scaleTargetRef, then that target's status.readyReplicas."""
        assert self._api is not None
        deadline = time.monotonic() + self._timeout_s
        so = self._get("the ScaledObject", deadline, self._api.get_namespaced_custom_object,
                       KEDA_GROUP, KEDA_VERSION, namespace, SCALEDOBJECTS, name)
        ref = (so.get("spec") or {}).get("scaleTargetRef") or {}
        kind = ref.get("kind") or "Deployment"
        api_version = ref.get("apiVersion") or "apps/v1"
        if not ref.get("name") or "/" not in api_version:
            raise CannotSay(ERROR, f"unsupported scaleTargetRef {ref}")
        group, version = api_version.split("/", 1)
        what = f"{kind} {namespace}/{ref['name']}"
        target = self._get(what, deadline, self._api.get_namespaced_custom_object,
                           group, version, namespace, _plural(kind), ref["name"])
        status = target.get("status") or {}
        ready = status.get("readyReplicas", 0 if (group, kind) in OMITS_ZERO_READY else None)
        if not isinstance(ready, int) or isinstance(ready, bool) or ready < 0:
            raise CannotSay(ERROR, f"{what} has status.readyReplicas {ready!r}")
        return ready

    def _get(self, what: str, deadline: float, call: Callable[..., dict], *args: str) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CannotSay(UNREACHABLE, f"no time left within {self._timeout_s:g}s to read {what}")
        try:
            # (connect, read): the client ignores a float, and an int would round 0.4 s to 0 (none)
            return call(*args, _request_timeout=(remaining, remaining))
        except ApiException as e:
            if e.status == 0 or e.status is None:
                raise CannotSay(UNREACHABLE, f"reading {what}: {e.reason}") from e
            reason = FORBIDDEN if e.status in (401, 403) else ERROR
            raise CannotSay(reason, f"reading {what}: HTTP {e.status} {e.reason}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise CannotSay(UNREACHABLE, f"reading {what}: {type(e).__name__}: {e}") from e

    def _note(self, key: Key, reason: str | None, detail: str) -> None:
        """Keeps a ScaledObject's reason; logs and reports only a change of it."""
        known = key in self._reasons
        if known and self._reasons[key] == reason:
            return
        previous = self._reasons.get(key)
        self._reasons[key] = reason
        self._report()
        namespace, name = key
        if self._api is None:
            return  # said once, at start-up
        if reason is not None:
            log.warning("ScaledObject %s/%s: %s; the history rule decides whether an empty answer from "
                        "Prometheus is 0 (%s)", namespace, name, detail, reason)
        elif known and previous is not None:
            log.info("ScaledObject %s/%s: the Kubernetes API answers again: an empty answer while its "
                     "target has ready replicas is missing data", namespace, name)

    def _report(self) -> None:
        counts = Counter(reason for reason in self._reasons.values() if reason is not None)
        self._on_fallback({reason: counts.get(reason, 0) for reason in FALLBACK_REASONS})
