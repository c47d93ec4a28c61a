"""core/v1 Events on ScaledObjects through the Kubernetes API, with the blocking `kubernetes` client.

`kubectl describe scaledobject` lists the core/v1 Events whose involvedObject matches the
ScaledObject's kind, namespace, name and uid, so the uid is read from the ScaledObject itself
(`get`, which the missing-data rule's RBAC already grants) and cached for `uid_ttl_s`: a
ScaledObject deleted and created again gets a new uid, and its Events follow within that TTL.
Writes are `create` and a strategic merge `patch` of `events` in the ScaledObject's namespace:
the verbs `manifests/components/scaler-access` grants. Called on the EventRecorder's writer thread
only; every request is bounded by `timeout_s`, and every failure is an EventWriteError.
"""

from __future__ import annotations

import time
from typing import Callable

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from adapter.kube import KEDA_GROUP, KEDA_VERSION, SCALEDOBJECTS
from adapter.recorder import ERROR, FORBIDDEN, NOT_FOUND, UNREACHABLE, EventWriteError


class KubernetesEventSink:
    """An `adapter.recorder.EventSink` on the API server `configuration` names."""

    def __init__(self, configuration: client.Configuration, *, timeout_s: float = 2.0, uid_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        if timeout_s <= 0 or uid_ttl_s < 0:
            raise ValueError(f"timeout_s must be above 0 and uid_ttl_s at least 0, not {timeout_s}, {uid_ttl_s}")
        self._timeout_s, self._uid_ttl_s, self._clock = timeout_s, uid_ttl_s, clock
        configuration.retries = 0  # one attempt: a dead API must not hold the writer past the timeout
        self._api_client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api_client)
        self._custom = client.CustomObjectsApi(self._api_client)
        self._references: dict[tuple[str, str], tuple[float, dict]] = {}

    def involved_object(self, namespace: str, name: str) -> dict:
        """The ScaledObject's reference (apiVersion, kind, namespace, name, uid), cached `uid_ttl_s`."""
        cached = self._references.get((namespace, name))
        now = self._clock()
        if cached is not None and now - cached[0] < self._uid_ttl_s:
            return cached[1]
        so = self._call(f"reading ScaledObject {namespace}/{name}", self._custom.get_namespaced_custom_object,
                        KEDA_GROUP, KEDA_VERSION, namespace, SCALEDOBJECTS, name)
        uid = (so.get("metadata") or {}).get("uid") if isinstance(so, dict) else None
        if not uid:
            raise EventWriteError(ERROR, f"ScaledObject {namespace}/{name} has no metadata.uid")
        reference = {"apiVersion": so.get("apiVersion") or f"{KEDA_GROUP}/{KEDA_VERSION}", "kind": "ScaledObject",
                     "namespace": namespace, "name": name, "uid": uid}
        self._references[(namespace, name)] = (now, reference)
        return reference

    def create(self, namespace: str, body: dict) -> None:
        self._call(f"creating an Event in {namespace}", self._core.create_namespaced_event, namespace, body)

    def patch(self, namespace: str, event_name: str, body: dict) -> None:
        # A dict body goes out as application/strategic-merge-patch+json (the client's choice for PATCH).
        self._call(f"patching Event {namespace}/{event_name}", self._core.patch_namespaced_event,
                   event_name, namespace, body)

    def close(self) -> None:
        self._api_client.close()

    def _call(self, what: str, call: Callable, *args):
        try:
            # (connect, read): the client ignores a lone float
            return call(*args, _request_timeout=(self._timeout_s, self._timeout_s))
        except ApiException as e:
            if e.status == 0 or e.status is None:
                raise EventWriteError(UNREACHABLE, f"{what}: {e.reason}") from e
            reason = {401: FORBIDDEN, 403: FORBIDDEN, 404: NOT_FOUND}.get(e.status, ERROR)
            raise EventWriteError(reason, f"{what}: HTTP {e.status} {e.reason}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise EventWriteError(UNREACHABLE, f"{what}: {type(e).__name__}: {e}") from e
