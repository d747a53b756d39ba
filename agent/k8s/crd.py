"""Desired models from ``CachedModel`` custom resources, and the writes agents make back to them.

The watcher is an informer reduced to what the loop needs: list, then watch from the list's
resourceVersion (with bookmarks so a quiet watch still advances), relist on 410 Gone or every
``resync`` seconds, reconnect with jittered backoff on errors. After every change it hands the
loop the *whole* current set (level-triggered): a missed or merged event can never leave the
loop with a wrong picture. A spec the agent cannot use is still in the set, with ``error`` set,
so the loop can report it (Event + condition naming the field) and keep running.

The revision pin is a compare-and-swap on the status subresource: the first agent to resolve a
branch or tag writes ``status.resolvedRevision`` guarded by the resourceVersion it read; the losers
get 409, re-read, and adopt the winner's commit, so every node fills the same commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from agent.core import selector
from agent.core.spec import ModelSpec, parse_model_spec
from agent.errors import KubeApiError, KubeConflictError, SpecError
from agent.k8s.client import CAS_BACKOFF, MERGE_PATCH, WATCH_BACKOFF, Backoff, KubeApi, call, classify, retrying

log = structlog.get_logger("agent.k8s.crd")

GROUP = "modelcache.dev"
VERSION = "v1alpha1"
PLURAL = "cachedmodels"
KIND = "CachedModel"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class CachedModelObj:
    """One CachedModel as the loop sees it: a parsed spec or the reason it could not be parsed."""

    name: str
    spec: ModelSpec | None
    error: SpecError | None
    resource_version: str
    resolved_revision: str | None  # status.resolvedRevision, when it pins the current spec.revision
    generation: int
    uid: str = ""

    @property
    def ok(self) -> bool:
        return self.spec is not None


def parse_cached_model(obj: Mapping[str, Any]) -> CachedModelObj:
    """Turn a raw CachedModel dict into our frozen type; spec problems become ``error``, never raise."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    spec: ModelSpec | None = None
    error: SpecError | None = None
    try:
        spec = parse_model_spec(obj)
        selector.validate(spec.node_selector, "spec.nodeSelector")
    except SpecError as e:
        spec, error = None, e
    resolved = status.get("resolvedRevision") if isinstance(status, Mapping) else None
    resolved_from = status.get("resolvedFrom") if isinstance(status, Mapping) else None
    if spec is not None and resolved_from is not None and resolved_from != spec.revision:
        resolved = None  # pinned for an older spec.revision: the pin no longer applies
    return CachedModelObj(
        name=str(meta.get("name", "")),
        spec=spec,
        error=error,
        resource_version=str(meta.get("resourceVersion", "")),
        resolved_revision=resolved if isinstance(resolved, str) and resolved else None,
        generation=int(meta.get("generation") or 0),
        uid=str(meta.get("uid", "")),
    )


class CachedModelWatcher:
    """List + watch CachedModels; calls ``on_snapshot(all_models)`` after every change."""

    def __init__(
        self,
        api: KubeApi,
        on_snapshot: Callable[[dict[str, CachedModelObj]], None],
        *,
        resync: float = 300.0,
        backoff: Backoff = WATCH_BACKOFF,
        stop: threading.Event,
        watch_timeout: float = 290.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.on_snapshot = on_snapshot
        self.resync = resync
        self.backoff = backoff
        self.stop = stop
        self.watch_timeout = watch_timeout
        self.clock = clock
        self._objs: dict[str, CachedModelObj] = {}
        self._rv: str | None = None
        self._need_list = True
        self._next_list = 0.0
        self._failures = 0
        self._lock = threading.Lock()
        self._watch: k8s_watch.Watch | None = None
        self.lists = 0  # for metrics and tests: how many full lists were made
        self.synced = threading.Event()  # set once the first full list was handed to on_snapshot

    def snapshot(self) -> dict[str, CachedModelObj]:
        with self._lock:
            return dict(self._objs)

    def _emit(self) -> None:
        try:
            self.on_snapshot(self.snapshot())
        except Exception:  # the loop's bug must not kill the watch
            log.exception("crd.on_snapshot_failed")

    def _list(self) -> None:
        body = call(
            self.api.custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            what="list cachedmodels",
            timeout=self.api.request_timeout,
        )
        objs = {}
        for item in body.get("items") or []:
            m = parse_cached_model(item)
            objs[m.name] = m
        with self._lock:
            self._objs = objs
            self._rv = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        self._need_list = False
        self._next_list = self.clock() + self.resync
        self.lists += 1
        log.info("crd.listed", count=len(objs), resource_version=self._rv)
        self._emit()
        self.synced.set()  # after the loop has the first full set, so "synced" means the loop knows

    def _apply(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        raw = event.get("raw_object") or event.get("object") or {}
        meta = raw.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self._rv = str(rv)
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            return
        with self._lock:
            if etype == "DELETED":
                self._objs.pop(str(meta.get("name", "")), None)
            else:
                m = parse_cached_model(raw)
                self._objs[m.name] = m
            if rv:
                self._rv = str(rv)
        self._emit()

    def run_once(self) -> None:
        """One step: (re)list if needed, then one watch session until it ends, expires or fails.

        Raises KubeApiError on failure; 410 Gone only marks the next step to relist.
        """
        if self._need_list or self._rv is None or self.clock() >= self._next_list:
            self._list()
        remaining = max(1.0, self._next_list - self.clock())
        timeout = int(max(1, min(self.watch_timeout, remaining)))
        w = k8s_watch.Watch()
        self._watch = w
        started = self.clock()
        got = 0
        try:
            for event in w.stream(
                self.api.custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                PLURAL,
                resource_version=self._rv,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=(self.api.request_timeout, timeout + 15),
            ):
                if self.stop.is_set():
                    break
                got += 1
                self._apply(event)
        except ApiException as e:
            if e.status == 410:
                log.info("crd.watch_expired", resource_version=self._rv)
                self._need_list = True
                return
            raise classify(e, "watch cachedmodels") from e
        except Exception as e:
            if self.stop.is_set():
                return
            raise classify(e, "watch cachedmodels") from e
        finally:
            self._watch = None
        if not got and self.clock() - started < 1.0 and not self.stop.is_set():
            # A watch closed at once with nothing in it: treat like an error so we back off, not spin.
            raise KubeApiError("watch cachedmodels: closed immediately", permanent=False)

    def run(self) -> None:
        """Until ``stop``: run_once, with jittered backoff after failures; never raises."""
        while not self.stop.is_set():
            try:
                self.run_once()
                self._failures = 0
            except KubeApiError as e:
                self._failures += 1
                if e.status == 410:
                    self._need_list = True
                delay = self.backoff.delay(min(self._failures, 30))
                if e.permanent:
                    delay = max(delay, self.backoff.maximum)
                log.warning("crd.watch_failed", error=str(e), attempt=self._failures, retry_in=round(delay, 3))
                self.stop.wait(delay)

    def start(self) -> threading.Thread:
        """Run in a daemon thread; a helper cuts the open watch as soon as ``stop`` is set."""

        def abort_on_stop() -> None:
            self.stop.wait()
            w = self._watch
            if w is not None:
                w.stop()

        threading.Thread(target=abort_on_stop, name="cachedmodel-watch-stop", daemon=True).start()
        thread = threading.Thread(target=self.run, name="cachedmodel-watch", daemon=True)
        thread.start()
        return thread


def get_cached_model(api: KubeApi, name: str) -> dict[str, Any]:
    return call(
        api.custom.get_cluster_custom_object,
        GROUP,
        VERSION,
        PLURAL,
        name,
        what=f"get cachedmodel {name}",
        timeout=api.request_timeout,
    )


def _patch_status(api: KubeApi, name: str, body: dict[str, Any]) -> dict[str, Any]:
    return call(
        api.custom.patch_cluster_custom_object_status,
        GROUP,
        VERSION,
        PLURAL,
        name,
        body,
        what=f"patch cachedmodel {name} status",
        timeout=api.request_timeout,
        _content_type=MERGE_PATCH,
    )


def pin_revision(
    api: KubeApi,
    name: str,
    resolved_commit: str,
    expected_resource_version: str,
    *,
    revision: str | None = None,
    backoff: Backoff = CAS_BACKOFF,
    stop: threading.Event | None = None,
) -> str:
    """Pin ``status.resolvedRevision`` once for the whole cluster; return the commit everyone must fill.

    The write carries ``metadata.resourceVersion`` so it only lands on the version we read. On 409
    we re-read: if someone pinned (for the same ``revision``), theirs wins and is returned; if only
    something else changed, we try again on the new version. Transient errors are retried.
    """
    rv = expected_resource_version
    for _ in range(10):
        status: dict[str, Any] = {
            "resolvedRevision": resolved_commit,
            "resolvedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if revision is not None:
            status["resolvedFrom"] = revision
        body = {"metadata": {"resourceVersion": rv}, "status": status}
        try:
            obj = retrying(
                lambda b=body: _patch_status(api, name, b),  # type: ignore[misc]
                what=f"pin {name}",
                backoff=backoff,
                stop=stop,
                retry_conflicts=False,
            )
            pinned = (obj.get("status") or {}).get("resolvedRevision") or resolved_commit
            log.info("crd.pinned", model=name, commit=pinned)
            return str(pinned)
        except KubeConflictError:
            current = retrying(lambda: get_cached_model(api, name), what=f"get {name}", backoff=backoff, stop=stop)
            cur_status = current.get("status") or {}
            pinned = cur_status.get("resolvedRevision")
            same_rev = revision is None or cur_status.get("resolvedFrom") in (None, revision)
            if pinned and same_rev:
                log.info("crd.pin_lost", model=name, ours=resolved_commit, theirs=pinned)
                return str(pinned)
            rv = str((current.get("metadata") or {}).get("resourceVersion"))
    raise KubeConflictError(f"pin {name}: still conflicting after 10 attempts")


def set_condition(
    api: KubeApi,
    name: str,
    type: str,
    status: str,
    reason: str,
    message: str,
    *,
    observed_generation: int | None = None,
    backoff: Backoff = CAS_BACKOFF,
    stop: threading.Event | None = None,
) -> bool:
    """Upsert one entry of ``status.conditions`` (CAS on resourceVersion); False when already so.

    Skipping identical writes matters: every agent reports the same spec problem, and only the
    first should cause a write. lastTransitionTime moves only when ``status`` flips.
    """
    for _ in range(10):
        obj = retrying(lambda: get_cached_model(api, name), what=f"get {name}", backoff=backoff, stop=stop)
        conditions = list((obj.get("status") or {}).get("conditions") or [])
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        new = {"type": type, "status": status, "reason": reason, "message": message, "lastTransitionTime": now}
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        for i, cond in enumerate(conditions):
            if cond.get("type") == type:
                same = all(cond.get(k) == new.get(k) for k in ("status", "reason", "message", "observedGeneration"))
                if same:
                    return False
                if cond.get("status") == status:
                    new["lastTransitionTime"] = cond.get("lastTransitionTime", now)
                conditions[i] = new
                break
        else:
            conditions.append(new)
        rv = str((obj.get("metadata") or {}).get("resourceVersion"))
        body = {"metadata": {"resourceVersion": rv}, "status": {"conditions": conditions}}
        try:
            retrying(
                lambda b=body: _patch_status(api, name, b),  # type: ignore[misc]
                what=f"condition {name}",
                backoff=backoff,
                stop=stop,
                retry_conflicts=False,
            )
            return True
        except KubeConflictError:
            continue
    raise KubeConflictError(f"condition {name}: still conflicting after 10 attempts")


def node_counts(nodes: Mapping[str, str]) -> tuple[int, int]:
    """(readyNodes, desiredNodes) from ``status.nodes`` (pure)."""
    return sum(1 for v in nodes.values() if v == "ready"), len(nodes)


def set_node_state(
    api: KubeApi,
    name: str,
    node: str,
    state: str | None,
    *,
    backoff: Backoff = CAS_BACKOFF,
    stop: threading.Event | None = None,
) -> bool:
    """Record this node's state for a model in ``status.nodes`` (None removes it) and the two counts.

    Each agent owns one key of the map, so a merge patch never clobbers another node's entry; the
    counts are recomputed from the version we read and written under its resourceVersion (CAS), so
    ``kubectl get cachedmodels`` READY/DESIRED never lag a write by more than one retry.
    Returns False when nothing needed writing (or the CachedModel is gone).
    """
    for _ in range(10):
        try:
            obj = retrying(lambda: get_cached_model(api, name), what=f"get {name}", backoff=backoff, stop=stop)
        except KubeApiError as e:
            if e.status == 404:
                return False
            raise
        status = obj.get("status") or {}
        nodes = {str(k): str(v) for k, v in (status.get("nodes") or {}).items()}
        if nodes.get(node) == state and node_counts(nodes) == (status.get("readyNodes"), status.get("desiredNodes")):
            return False
        if state is None:
            nodes.pop(node, None)
        else:
            nodes[node] = state
        ready, desired = node_counts(nodes)
        rv = str((obj.get("metadata") or {}).get("resourceVersion"))
        body = {"metadata": {"resourceVersion": rv},
                "status": {"nodes": {node: state}, "readyNodes": ready, "desiredNodes": desired}}
        try:
            retrying(lambda b=body: _patch_status(api, name, b),  # type: ignore[misc]
                     what=f"node state {name}", backoff=backoff, stop=stop, retry_conflicts=False)
            return True
        except KubeConflictError:
            continue
    raise KubeConflictError(f"node state {name}: still conflicting after 10 attempts")
