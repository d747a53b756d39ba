"""Kubernetes Events for what a person running ``kubectl describe`` wants to see.

Best effort by design: an Event must never stop a fill or crash the loop, so ``emit`` swallows
every error (logged) and makes a single short attempt. Repeats of an identical event within
``window`` seconds are aggregated into one Event whose ``count`` grows, like client-go's
EventCorrelator, so a flapping verify does not flood etcd.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from agent.errors import KubeApiError
from agent.k8s.client import MERGE_PATCH, KubeApi, call
from agent.k8s.crd import API_VERSION as CRD_API_VERSION

log = structlog.get_logger("agent.k8s.events")

EventType = Literal["Normal", "Warning"]
_API_VERSIONS = {"CachedModel": CRD_API_VERSION, "Node": "v1"}


@dataclass
class _Seen:
    event_name: str
    count: int
    first: float


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Writes core/v1 Events about CachedModels and this Node into ``namespace`` (cluster-scoped objects)."""

    def __init__(
        self,
        api: KubeApi,
        component: str = "model-cache-agent",
        node_name: str = "",
        *,
        namespace: str = "default",
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 3.0,
    ) -> None:
        self.api = api
        self.component = component
        self.node_name = node_name
        self.namespace = namespace
        self.window = window
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str, str, str], _Seen] = {}

    def emit(
        self,
        kind: str,
        name: str,
        reason: str,
        message: str,
        type: EventType = "Normal",
        *,
        uid: str | None = None,
    ) -> bool:
        """Record an Event on ``kind``/``name`` (``CachedModel`` or ``Node``); True if written, never raises."""
        try:
            return self._emit(kind, name, reason, message[:1024], type, uid)
        except Exception as e:  # best effort: any failure is only logged
            log.warning("event.failed", kind=kind, name=name, reason=reason, error=str(e))
            return False

    def _emit(self, kind: str, name: str, reason: str, message: str, type: str, uid: str | None) -> bool:
        key = (kind, name, reason, message, type)
        now = self.clock()
        with self._lock:
            for k in [k for k, s in self._seen.items() if now - s.first >= self.window]:
                del self._seen[k]
            seen = self._seen.get(key)
        if seen is not None:
            body = {"count": seen.count + 1, "lastTimestamp": _now()}
            try:
                call(
                    self.api.core.patch_namespaced_event,
                    seen.event_name,
                    self.namespace,
                    body,
                    what=f"patch event {seen.event_name}",
                    timeout=self.timeout,
                    _content_type=MERGE_PATCH,
                )
            except KubeApiError as e:
                if e.status != 404:
                    raise
            else:
                with self._lock:
                    seen.count += 1
                return True
        stamp = _now()
        involved: dict[str, Any] = {"kind": kind, "name": name, "apiVersion": _API_VERSIONS.get(kind, "v1")}
        if uid:
            involved["uid"] = uid
        event_name = f"{name}.{uuid.uuid4().hex[:16]}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": event_name, "namespace": self.namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.component, "host": self.node_name},
            "reportingComponent": self.component,
            "reportingInstance": self.node_name,
        }
        call(
            self.api.core.create_namespaced_event,
            self.namespace,
            body,
            what=f"create event {reason}",
            timeout=self.timeout,
        )
        with self._lock:
            self._seen[key] = _Seen(event_name, 1, now)
        return True


def list_events(api: KubeApi, namespace: str = "default") -> list[dict[str, Any]]:
    """Raw Events in a namespace (for the ``status`` command and tests)."""
    body = call(api.core.list_namespaced_event, namespace, what="list events", timeout=api.request_timeout)
    return list(body.get("items") or [])
