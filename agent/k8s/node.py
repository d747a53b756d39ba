"""This node's ready labels and status annotation, kept in step with what the loop wants.

Coalescing follows node-problem-detector's condition manager: ``set_desired`` only records the
latest wish (cheap, any thread, any rate); ``flush`` writes at most one JSON merge patch when

- needUpdate: the wish differs from what was last applied,
- needResync: the last write failed (or nothing was read yet), so re-read the Node first,
- needHeartbeat: ``heartbeat`` seconds passed, so re-read the Node and repair drift (someone
  deleted our label, a stale label from an older run).

The patch names only keys under ``<prefix>/`` (null deletes), so labels owned by kubelet, GPU
operators or people are never touched, and concurrent writers of other keys never conflict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.core.selector import READY, label_patch, status_key
from agent.errors import KubeApiError
from agent.k8s.client import MERGE_PATCH, WRITE_BACKOFF, Backoff, KubeApi, call, retrying

log = structlog.get_logger("agent.k8s.node")


def ready_labels(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """The desired label set for the models that are complete and verified on this node."""
    return {f"{prefix}/{name}": READY for name in names}


@dataclass(frozen=True)
class ReporterState:
    """What /readyz and metrics need to know about label publishing."""

    in_sync: bool
    patches: int
    failures: int
    last_error: str | None
    last_success: float | None


class NodeReporter:
    """Publishes ``<prefix>/<model>=ready`` labels and the ``<prefix>/status`` annotation for one Node."""

    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        prefix: str = "modelcache.dev",
        *,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: float = 300.0,
        backoff: Backoff = WRITE_BACKOFF,
        settle: float = 0.05,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.prefix = prefix
        self.clock = clock
        self.heartbeat = heartbeat
        self.backoff = backoff
        self.settle = settle
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._desired: dict[str, str] = {}
        self._desired_status: str | None = None
        self._version = 0  # bumped by set_desired when the wish changes
        self._applied = -1  # version last written successfully (-1: never)
        self._need_resync = True
        self._last_sync: float | None = None
        self._labels: dict[str, str] = {}
        self._annotations: dict[str, str] = {}
        self._patches = 0
        self._failures = 0
        self._last_error: str | None = None

    # ---- called by the loop ----------------------------------------------------------------
    def set_desired(self, labels: Mapping[str, str], status_annotation: str | None = None) -> None:
        """Record the full desired set of prefix labels (and the status JSON); cheap, thread-safe.

        Anything under the prefix that is not in ``labels`` is removed on the next flush: passing the
        set of models verified on disk at start removes stale ready labels from an earlier run.
        ``status_annotation=None`` leaves the annotation as it is.
        """
        wanted = {k: v for k, v in labels.items() if k.startswith(self.prefix + "/") and k != status_key(self.prefix)}
        if len(wanted) != len(labels):
            raise ValueError(f"labels outside {self.prefix}/ are not ours to set: {sorted(set(labels) - set(wanted))}")
        with self._lock:
            if wanted == self._desired and status_annotation == self._desired_status:
                return
            self._desired = wanted
            self._desired_status = status_annotation
            self._version += 1
        self._wake.set()

    def remove_stale(self, verified_names: Iterable[str], status_annotation: str | None = None) -> None:
        """At start: keep ready labels only for models verified on disk (everything else under the prefix goes)."""
        self.set_desired(ready_labels(self.prefix, verified_names), status_annotation)

    def node_labels(self) -> dict[str, str]:
        """All labels of the Node as last read or written (for nodeSelector matching); a copy."""
        with self._lock:
            return dict(self._labels)

    def state(self) -> ReporterState:
        with self._lock:
            return ReporterState(
                in_sync=self._applied == self._version and not self._need_resync,
                patches=self._patches,
                failures=self._failures,
                last_error=self._last_error,
                last_success=self._last_sync,
            )

    # ---- I/O ---------------------------------------------------------------------------------
    def refresh(self, stop: threading.Event | None = None) -> dict[str, str]:
        """GET the Node and cache its labels and annotations; raises KubeApiError after retries."""
        node = retrying(
            lambda: call(
                self.api.core.read_node,
                self.node_name,
                what=f"get node {self.node_name}",
                timeout=self.api.request_timeout,
            ),
            what=f"get node {self.node_name}",
            backoff=self.backoff,
            stop=stop,
        )
        self._remember(node)
        return self.node_labels()

    def _remember(self, node: Mapping[str, Any]) -> None:
        meta = node.get("metadata") or {}
        with self._lock:
            self._labels = dict(meta.get("labels") or {})
            self._annotations = dict(meta.get("annotations") or {})

    def flush(self, stop: threading.Event | None = None) -> bool:
        """Write once if needed; False only when the API failed (a wish newer than this flush stays pending).

        Never raises for API errors: a failure is remembered (needResync) and the next call retries,
        so the loop can keep filling models through an API outage and converge afterwards.
        """
        with self._lock:
            version = self._version
            desired = dict(self._desired)
            status = self._desired_status
            need_update = self._applied != version
            need_resync = self._need_resync
            need_heartbeat = self._last_sync is None or self.clock() - self._last_sync >= self.heartbeat
        if not (need_update or need_resync or need_heartbeat):
            return True
        try:
            if need_resync or need_heartbeat:
                self.refresh(stop)
            with self._lock:
                current_labels, current_ann = dict(self._labels), dict(self._annotations)
            labels = label_patch(current_labels, desired, self.prefix)
            meta: dict[str, Any] = {}
            if labels:
                meta["labels"] = labels
            skey = status_key(self.prefix)
            if status is not None and current_ann.get(skey) != status:
                meta["annotations"] = {skey: status}
            if meta:
                what = f"patch node {self.node_name}"
                node = retrying(
                    lambda: call(
                        self.api.core.patch_node,
                        self.node_name,
                        {"metadata": meta},
                        what=what,
                        timeout=self.api.request_timeout,
                        _content_type=MERGE_PATCH,
                    ),
                    what=what,
                    backoff=self.backoff,
                    stop=stop,
                )
                self._remember(node)
                log.info("node.patched", node=self.node_name, labels=labels, status=skey in meta.get("annotations", {}))
        except KubeApiError as e:
            with self._lock:
                self._need_resync = True
                self._failures += 1
                self._last_error = str(e)
            log.warning("node.patch_failed", node=self.node_name, error=str(e), permanent=e.permanent)
            return False
        with self._lock:
            self._applied = version
            self._need_resync = False
            self._last_sync = self.clock()
            self._last_error = None
            if meta:
                self._patches += 1
        return True

    def run(self, stop: threading.Event) -> None:
        """Flush whenever woken by ``set_desired``, on heartbeat, and after failures with backoff."""
        threading.Thread(target=lambda: (stop.wait(), self._wake.set()), name="node-reporter-stop", daemon=True).start()
        failures = 0
        while not stop.is_set():
            ok = self.flush(stop)
            failures = 0 if ok else failures + 1
            if failures:
                timeout = self.backoff.delay(failures)
            else:
                with self._lock:
                    pending = self._applied != self._version
                    last = self._last_sync
                if pending:
                    continue
                timeout = max(0.0, self.heartbeat - (self.clock() - last)) if last is not None else 0.0
            self._wake.wait(timeout)
            if stop.is_set():
                return
            if self._wake.is_set():
                self._wake.clear()
                stop.wait(self.settle)  # let a burst of set_desired calls land: one patch for all

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=f"node-reporter-{self.node_name}", daemon=True)
        thread.start()
        return thread
