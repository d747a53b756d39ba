"""A small Kubernetes API server on 127.0.0.1 for tests, with faults as features.

Why our own and not ``kmock.KubernetesEmulator``: kmock 0.8 serves lists with a fixed
``resourceVersion: '...'``, replays every object as ADDED on each watch whatever the requested
resourceVersion, has no bookmarks, no 410 Gone, no optimistic concurrency (409 on a stale
``metadata.resourceVersion``) and no status subresource: exactly the behaviours the agent's
Kubernetes layer must be tested against.

What this one does, over plain HTTP, for the official ``kubernetes`` client:

- core ``nodes``, ``pods`` and ``events`` (namespaced), ``events.k8s.io/v1`` events,
  ``coordination.k8s.io/v1`` leases, and the cluster-scoped ``modelcache.dev/v1alpha1``
  ``cachedmodels`` with a ``status`` subresource (more via ``add_resource``);
- list / get / create / replace / delete / patch (merge-patch; strategic-merge is treated as a merge
  patch, which is exact for the labels/annotations/status maps the agent touches);
- ``fieldSelector`` (``a.b=c``, ``a.b!=c``) and ``labelSelector`` (``k=v``, ``k!=v``, ``k``, ``!k``,
  ``k in (a,b)``, ``k notin (a,b)``) on list and watch; a watched object that stops (starts) matching
  arrives as DELETED (ADDED), as the API server's watch cache does; ``limit``/``continue`` paging;
- one etcd-like global resourceVersion; ``metadata.generation`` bumped on spec changes;
- 409 Conflict when a write carries a stale ``metadata.resourceVersion``;
- watch from a resourceVersion (history replay), ``allowWatchBookmarks``, ``timeoutSeconds``,
  and a 410 Expired ERROR event when the version has been compacted away (bounded history);
- RBAC, when given rules (``rbac=``, ``rules_from_manifest``): a request the rules do not grant is a
  403 whose message names verb, resource and group, as the API server's is;
- a per-client (User-Agent), per-verb, per-resource request counter and a count of watch events
  delivered, for scale measurements (``counts``, ``watch_events``);
- faults: ``fail_next`` (N requests matching method + path regex [+ client] -> any status, optional
  Retry-After), ``fail_for`` (every matching request for T seconds: 429 storms, one client cut off),
  ``partition``, ``drop_watches`` (optionally one client's), ``drop_watches_every`` (a watch dropped
  every few seconds), ``outage`` (connection refused or 503 for T seconds), ``compact`` (410 Gone),
  ``delete`` of any object;
- a request log and per-node label history for assertions.

The server runs its own asyncio loop in a daemon thread; every public method is thread-safe and
synchronous, so tests and the agent's sync client code need no asyncio.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

Key = tuple[str, str]  # (api group, plural)
ObjKey = tuple[str, str, str | None, str]  # (group, plural, namespace, name)

CORE_PATH = re.compile(
    r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?(?P<plural>[a-z0-9]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$"
)
GROUP_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?:namespaces/(?P<ns>[^/]+)/)?"
    r"(?P<plural>[a-z0-9]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$"
)
_CLIENT_IN_UA = re.compile(r"\(([^()]*)\)\s*$")


@dataclass
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class RequestRecord:
    """One request as the server saw it, for assertions (``body`` is parsed JSON when it was JSON).

    ``verb`` is the RBAC verb (get, list, watch, create, update, patch, delete), ``resource`` the plural
    with ``/status`` for the subresource, ``client`` the caller (see ``client_of``).
    """

    at: float
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    status: int = 0
    verb: str = ""
    resource: str = ""
    client: str = ""
    namespace: str | None = None
    name: str | None = None


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    remaining: int | None  # None: every match until ``until``
    retry_after: str | None
    message: str
    client: re.Pattern[str] | None = None
    until: float | None = None
    every: int = 1  # fail one in ``every`` matching requests
    seen: int = 0


@dataclass
class _Watcher:
    key: Key
    namespace: str | None
    fields: list[tuple[str, str, str]]
    labels: list[tuple[str, str, tuple[str, ...]]]
    client: str
    resource: str
    queue: asyncio.Queue[bytes | None]
    transport: Any = None


@dataclass
class _History:
    # (resourceVersion, event type, object, previous object for MODIFIED)
    events: deque[tuple[int, str, dict[str, Any], dict[str, Any] | None]] = field(default_factory=deque)
    compacted: int = 0  # highest resourceVersion no longer replayable


@dataclass(frozen=True)
class Rule:
    """One RBAC PolicyRule as the emulator enforces it; ``namespace`` None is cluster-wide (ClusterRole)."""

    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    namespace: str | None = None

    def allows(self, group: str, resource: str, verb: str, namespace: str | None) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        return (
            (group in self.groups or "*" in self.groups)
            and (resource in self.resources or "*" in self.resources)
            and (verb in self.verbs or "*" in self.verbs)
        )


def rules_from_manifest(docs: Iterable[Mapping[str, Any]], namespace: str = "model-cache") -> list[Rule]:
    """The rules of every ClusterRole and Role in ``docs`` (a parsed rbac.yaml), Roles bound to their namespace."""
    rules: list[Rule] = []
    for doc in docs:
        if doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        ns = None if doc["kind"] == "ClusterRole" else (doc.get("metadata", {}).get("namespace") or namespace)
        for r in doc.get("rules") or []:
            rules.append(Rule(frozenset(r.get("apiGroups") or []), frozenset(r.get("resources") or []),
                              frozenset(r.get("verbs") or []), ns))
    return rules


def client_of(user_agent: str) -> str:
    """The caller's name: what the User-Agent carries in its last parentheses (the agent puts its node
    name there), else the whole User-Agent."""
    m = _CLIENT_IN_UA.search(user_agent or "")
    return m.group(1) if m else (user_agent or "")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (None deletes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.headers = code, reason, message, headers or {}


def _without_rv(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# ---- selectors (pure) --------------------------------------------------------------------------------


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """'metadata.name=x,status.phase!=Failed' -> [(path, op, value)]; op is '=' or '!='."""
    out: list[tuple[str, str, str]] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(!=|==|=)\s*(.*)$", part)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        out.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return out


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """A label selector string -> [(key, op, values)] with op in =, !=, in, notin, exists, !exists."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for part in _split_top(text or ""):
        m = re.match(r"^([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)$", part)
        if m:
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append((m.group(1), m.group(2), values))
            continue
        m = re.match(r"^([A-Za-z0-9_./-]+)\s*(!=|==|=)\s*([A-Za-z0-9_.-]*)$", part)
        if m:
            out.append((m.group(1), "!=" if m.group(2) == "!=" else "=", (m.group(3),)))
            continue
        m = re.match(r"^(!?)([A-Za-z0-9_./-]+)$", part)
        if m:
            out.append((m.group(2), "!exists" if m.group(1) else "exists", ()))
            continue
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return out


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return "" if cur is None else str(cur)


def selected(obj: Mapping[str, Any] | None, fields: list[tuple[str, str, str]],
             labels: list[tuple[str, str, tuple[str, ...]]]) -> bool:
    if obj is None:
        return False
    for path, op, value in fields:
        if (_field_value(obj, path) == value) != (op == "="):
            return False
    have = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in labels:
        v = have.get(key)
        ok = {
            "=": v == values[0] if values else False,
            "!=": v != values[0] if values else True,
            "in": v in values,
            "notin": v not in values,
            "exists": key in have,
            "!exists": key not in have,
        }[op]
        if not ok:
            return False
    return True


def verb_of(method: str, name: str | None, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if name else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


class KubeEmulator:
    """Start with ``KubeEmulator().start()`` (or as a context manager); ``url`` is the API host."""

    def __init__(self, *, history: int = 200, bookmark_interval: float = 1.0, port: int = 0,
                 rbac: list[Rule] | None = None, sa_user: str = "system:serviceaccount:model-cache:model-cache-agent"
                 ) -> None:
        self.history_limit = history
        self.bookmark_interval = bookmark_interval
        self._port = port
        self._lock = threading.RLock()
        self._rv = 0
        self._objects: dict[ObjKey, dict[str, Any]] = {}
        self._history: dict[Key, _History] = {}
        self._watchers: list[_Watcher] = []
        self._faults: list[_Fault] = []
        self._outage_until = 0.0
        self._outage_mode = "503"
        self._dropper: asyncio.Task[None] | None = None
        self.rbac = list(rbac) if rbac is not None else None
        self.rbac_exempt: re.Pattern[str] | None = None  # clients RBAC does not apply to (tests acting as admin)
        self.sa_user = sa_user
        self.requests: list[RequestRecord] = []
        self.label_history: dict[str, list[tuple[float, dict[str, str]]]] = {}
        self.watch_events: Counter[tuple[str, str, str]] = Counter()  # (client, resource, type) delivered
        self.resources: dict[Key, Resource] = {}
        for res in (
            Resource("", "v1", "nodes", "Node", False, True),
            Resource("", "v1", "pods", "Pod", True, True),
            Resource("", "v1", "events", "Event", True),
            Resource("events.k8s.io", "v1", "events", "Event", True),
            Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
            Resource("modelcache.dev", "v1alpha1", "cachedmodels", "CachedModel", False, True),
        ):
            self.add_resource(res)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def add_resource(self, res: Resource) -> None:
        self.resources[(res.group, res.plural)] = res
        self._history.setdefault((res.group, res.plural), _History())

    def start(self) -> KubeEmulator:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._astart())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
            loop.close()

        self._thread = threading.Thread(target=run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("kube emulator did not start")
        return self

    async def _astart(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True, backlog=1024)
        await self._site.start()
        if not self._port:
            server = self._site._server
            assert server is not None
            self._port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _astop(self) -> None:
        if self._dropper is not None:
            self._dropper.cancel()
        self._close_watchers(abrupt=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop and wait (for operations that touch aiohttp objects)."""
        assert self._loop is not None

        async def wrap() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(10)

    # ---- faults ------------------------------------------------------------------------------
    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        count: int = 1,
        *,
        retry_after: float | str | None = None,
        message: str = "injected fault",
        client: str | None = None,
    ) -> None:
        """The next ``count`` requests whose method and path (regex, ``search``) [and client] match get ``status``."""
        ra = None if retry_after is None else str(retry_after)
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path), status, count, ra, message,
                                       re.compile(client) if client else None))

    def fail_for(
        self,
        seconds: float,
        method: str = "*",
        path: str = ".",
        status: int = 429,
        *,
        retry_after: float | str | None = None,
        message: str = "injected fault",
        client: str | None = None,
        every: int = 1,
    ) -> None:
        """Every ``every``-th matching request for ``seconds`` gets ``status`` (a 429 storm, one client cut off)."""
        ra = None if retry_after is None else str(retry_after)
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path), status, None, ra, message,
                                       re.compile(client) if client else None, time.monotonic() + seconds,
                                       max(1, every)))

    def partition(self, client: str, seconds: float) -> None:
        """Cut one client off (every request 503, its open watches closed) for ``seconds``."""
        self.fail_for(seconds, "*", ".", 503, client=client, message="injected partition")
        self.drop_watches(client=client)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._outage_until = 0.0

    def drop_watches(self, *, abrupt: bool = True, client: str | None = None, resource: str | None = None) -> int:
        """Cut open watches (all, or one client's / one resource's): abrupt closes the TCP connection
        mid-stream, else ends the stream cleanly."""
        return int(self._call(lambda: self._close_watchers(abrupt=abrupt, client=client, resource=resource)))

    def drop_watches_every(self, interval: float, *, abrupt: bool = True, jitter: float = 0.0) -> None:
        """Keep cutting every open watch each ``interval`` (+- jitter) seconds until ``stop_dropping``."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(max(0.01, interval + random.uniform(-jitter, jitter)))
                self._close_watchers(abrupt=abrupt)

        def begin() -> None:
            if self._dropper is not None:
                self._dropper.cancel()
            self._dropper = asyncio.ensure_future(loop())

        self._call(begin)

    def stop_dropping(self) -> None:
        def end() -> None:
            if self._dropper is not None:
                self._dropper.cancel()
                self._dropper = None

        self._call(end)

    def _close_watchers(self, *, abrupt: bool, client: str | None = None, resource: str | None = None) -> int:
        rx = re.compile(client) if client else None
        keep, cut = [], []
        with self._lock:
            for w in self._watchers:
                hit = (rx is None or rx.search(w.client)) and (resource is None or w.resource == resource)
                (cut if hit else keep).append(w)
            self._watchers = keep
        for w in cut:
            if abrupt and w.transport is not None:
                w.transport.close()
            w.queue.put_nowait(None)
        return len(cut)

    def outage(self, seconds: float, *, mode: str = "refuse") -> None:
        """Make the API unreachable for ``seconds``: 'refuse' closes the port, '503' answers every request 503.

        Open watches are cut either way, as when an API server restarts.
        """
        if mode not in ("refuse", "503"):
            raise ValueError(mode)
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_mode = mode

        async def begin() -> None:
            self._close_watchers(abrupt=True)
            if mode == "refuse" and self._site is not None:
                await self._site.stop()
                self._site = None
                if self._runner is not None and self._runner.server is not None:
                    for conn in self._runner.server.connections:  # keep-alive sockets die with the server
                        conn.force_close()
                assert self._loop is not None
                self._loop.call_later(seconds, lambda: asyncio.ensure_future(self._listen()))

        self._call(begin)

    def in_outage(self) -> bool:
        with self._lock:
            return time.monotonic() < self._outage_until

    def compact(self) -> int:
        """Forget all watch history (like etcd compaction): watches from older versions now get 410."""
        with self._lock:
            for hist in self._history.values():
                hist.events.clear()
                hist.compacted = self._rv
            return self._rv

    # ---- RBAC ------------------------------------------------------------------------------------
    def grant(self, group: str, resource: str, verbs: Iterable[str], namespace: str | None = None) -> None:
        with self._lock:
            self.rbac = [*(self.rbac or []), Rule(frozenset([group]), frozenset([resource]), frozenset(verbs),
                                                  namespace)]

    def revoke(self, group: str, resource: str, verb: str) -> None:
        """Remove one verb on one resource from every rule that grants it."""
        with self._lock:
            if self.rbac is None:
                return
            out = []
            for r in self.rbac:
                if group in r.groups and resource in r.resources and verb in r.verbs:
                    r = Rule(r.groups, r.resources, r.verbs - {verb}, r.namespace)
                out.append(r)
            self.rbac = out

    def _authorize(self, rec: RequestRecord, res: Resource) -> None:
        with self._lock:
            rules = self.rbac
            exempt = self.rbac_exempt
        if rules is None or (exempt is not None and exempt.search(rec.client)):
            return
        ns = rec.namespace if res.namespaced else None
        if any(r.allows(res.group, rec.resource, rec.verb, ns) for r in rules):
            return
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        what = f'{rec.resource} "{rec.name}"' if rec.name else rec.resource
        raise ApiError(403, "Forbidden", f'{what} is forbidden: User "{self.sa_user}" cannot {rec.verb} resource '
                                         f'"{rec.resource}" in API group "{res.group}" {scope}')

    # ---- direct state access for tests (thread-safe) ------------------------------------------
    def create(self, plural: str, obj: dict[str, Any], *, group: str = "", namespace: str | None = None) -> dict:
        return self._create(self.resources[(group, plural)], namespace, copy.deepcopy(obj))

    def get(self, plural: str, name: str, *, group: str = "", namespace: str | None = None) -> dict | None:
        with self._lock:
            obj = self._objects.get((group, plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, *, group: str = "", namespace: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o)
                for (g, p, ns, _), o in sorted(self._objects.items(), key=lambda kv: str(kv[0]))
                if g == group and p == plural and (namespace is None or ns == namespace)
            ]

    def patch(
        self,
        plural: str,
        name: str,
        patch: dict[str, Any],
        *,
        group: str = "",
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict:
        """Merge-patch an object as another client would (bumps resourceVersion, notifies watches).

        With a status subresource, ``status`` only changes through ``subresource="status"``.
        """
        res = self.resources[(group, plural)]
        return self._update(res, namespace, name, lambda cur: merge_patch(cur, patch), sub=subresource)

    def delete(self, plural: str, name: str, *, group: str = "", namespace: str | None = None) -> None:
        self._delete(self.resources[(group, plural)], namespace, name)

    def create_node(self, name: str, labels: dict[str, str] | None = None, annotations: dict | None = None) -> dict:
        return self.create(
            "nodes", {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}
        )

    def create_pod(self, name: str, node: str, *, namespace: str = "default", phase: str = "Running",
                   node_selector: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                   affinity: dict[str, Any] | None = None) -> dict:
        """A Pod bound to ``node`` (as after scheduling), in ``phase``."""
        spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": "worker"}]}
        if node_selector:
            spec["nodeSelector"] = node_selector
        if affinity:
            spec["affinity"] = affinity
        return self.create("pods", {"metadata": {"name": name, "namespace": namespace,
                                                 "annotations": annotations or {}},
                                    "spec": spec, "status": {"phase": phase}}, namespace=namespace)

    def node_labels(self, name: str) -> dict[str, str]:
        node = self.get("nodes", name) or {}
        return dict(node.get("metadata", {}).get("labels") or {})

    def node_annotations(self, name: str) -> dict[str, str]:
        node = self.get("nodes", name) or {}
        return dict(node.get("metadata", {}).get("annotations") or {})

    def labels_over_time(self, name: str) -> list[tuple[float, dict[str, str]]]:
        """Every distinct label set the node had, with the monotonic time it started."""
        with self._lock:
            return list(self.label_history.get(name, []))

    def requests_matching(self, method: str, path: str, *, client: str | None = None) -> list[RequestRecord]:
        rx = re.compile(path)
        crx = re.compile(client) if client else None
        with self._lock:
            return [r for r in self.requests if (method == "*" or r.method == method.upper()) and rx.search(r.path)
                    and (crx is None or crx.search(r.client))]

    def counts(self, *, client: str | None = None, since: float = 0.0,
               status: Callable[[int], bool] | None = None) -> Counter[tuple[str, str]]:
        """Requests per (verb, resource), optionally for clients matching ``client`` (regex) and after ``since``."""
        crx = re.compile(client) if client else None
        with self._lock:
            recs = [r for r in self.requests if r.at >= since]
        return Counter((r.verb, r.resource) for r in recs
                       if (crx is None or crx.search(r.client)) and (status is None or status(r.status)))

    def events_delivered(self, *, client: str | None = None, bookmarks: bool = False) -> Counter[str]:
        """Watch events written to clients' streams, per resource (bookmarks only if asked)."""
        crx = re.compile(client) if client else None
        with self._lock:
            items = list(self.watch_events.items())
        out: Counter[str] = Counter()
        for (c, res, etype), n in items:
            if (crx is None or crx.search(c)) and ((etype == "BOOKMARK") == bookmarks):
                out[res] += n
        return out

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.watch_events.clear()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
        """Poll ``predicate`` until true (for tests that wait on another thread's effect)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return predicate()

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    def watchers(self) -> list[tuple[str, str, str]]:
        """(client, resource, selector summary) of every open watch."""
        with self._lock:
            return [(w.client, w.resource, ",".join(f"{p}{o}{v}" for p, o, v in w.fields)) for w in self._watchers]

    # ---- state machine -----------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, res: Resource, etype: str, obj: dict[str, Any], prev: dict[str, Any] | None = None) -> None:
        key = (res.group, res.plural)
        rv = int(obj["metadata"]["resourceVersion"])
        hist = self._history[key]
        snap = copy.deepcopy(obj)
        hist.events.append((rv, etype, snap, prev))
        while len(hist.events) > self.history_limit:
            old_rv, *_ = hist.events.popleft()
            hist.compacted = max(hist.compacted, old_rv)
        if res.plural == "nodes" and res.group == "":
            labels = dict(obj["metadata"].get("labels") or {})
            hist_l = self.label_history.setdefault(obj["metadata"]["name"], [])
            if etype != "DELETED" and (not hist_l or hist_l[-1][1] != labels):
                hist_l.append((time.monotonic(), labels))
        loop = self._loop
        if loop is None:
            return
        cache: dict[str, bytes] = {}
        for w in list(self._watchers):
            if w.key != key:
                continue
            line = self._event_for(w, etype, snap, prev, cache)
            if line is not None:
                loop.call_soon_threadsafe(w.queue.put_nowait, line)

    @staticmethod
    def _event_for(w: _Watcher, etype: str, obj: dict[str, Any], prev: dict[str, Any] | None,
                   cache: dict[str, bytes]) -> bytes | None:
        """The line this watcher gets for one change (None: not in its selection), serialised once per type."""
        ns = obj["metadata"].get("namespace")
        if w.namespace is not None and w.namespace != ns:
            return None
        now_in = selected(obj, w.fields, w.labels)
        if etype == "MODIFIED" and (w.fields or w.labels):
            was_in = selected(prev, w.fields, w.labels)
            if not now_in and not was_in:
                return None
            etype = "MODIFIED" if now_in and was_in else ("ADDED" if now_in else "DELETED")
        elif not now_in:
            return None
        if etype not in cache:
            cache[etype] = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
        return cache[etype]

    def _create(self, res: Resource, namespace: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
            meta["name"] = name
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        ns = namespace or meta.get("namespace") if res.namespaced else None
        if res.namespaced and not ns:
            raise ApiError(422, "Invalid", "metadata.namespace: Required value")
        with self._lock:
            key = (res.group, res.plural, ns, name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{res.plural} "{name}" already exists')
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            if ns:
                meta["namespace"] = ns
            meta.pop("resourceVersion", None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
            meta["resourceVersion"] = self._next_rv()
            if res.status_subresource and res.group:
                obj.pop("status", None)  # status is ignored on create when the subresource is enabled
            self._objects[key] = obj
            self._record(res, "ADDED", obj)
            return copy.deepcopy(obj)

    def _update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        sub: str | None,
    ) -> dict[str, Any]:
        with self._lock:
            key = (res.group, res.plural, namespace if res.namespaced else None, name)
            cur = self._objects.get(key)
            if cur is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            new = change(copy.deepcopy(cur))
            new_meta = new.setdefault("metadata", {})
            want_rv = new_meta.get("resourceVersion")
            if want_rv and want_rv != cur["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                )
            if sub == "status":
                result = copy.deepcopy(cur)
                result["status"] = new.get("status")
                if result["status"] is None:
                    result.pop("status")
            else:
                result = new
                if res.status_subresource and res.group:
                    if "status" in cur:
                        result["status"] = cur["status"]
                    else:
                        result.pop("status", None)
                for immutable in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                    if immutable in cur["metadata"]:
                        result["metadata"][immutable] = cur["metadata"][immutable]
                if result.get("spec") != cur.get("spec"):
                    result["metadata"]["generation"] = cur["metadata"].get("generation", 1) + 1
            result["apiVersion"], result["kind"] = res.api_version, res.kind
            if _without_rv(result) == _without_rv(cur):
                return copy.deepcopy(cur)  # no-op writes keep the resourceVersion, as the API server does
            result["metadata"]["resourceVersion"] = self._next_rv()
            self._objects[key] = result
            self._record(res, "MODIFIED", result, copy.deepcopy(cur))
            return copy.deepcopy(result)

    def _delete(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        with self._lock:
            key = (res.group, res.plural, namespace if res.namespaced else None, name)
            cur = self._objects.pop(key, None)
            if cur is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            cur["metadata"]["resourceVersion"] = self._next_rv()
            self._record(res, "DELETED", cur)
            return copy.deepcopy(cur)

    # ---- HTTP --------------------------------------------------------------------------------
    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str | None]:
        m = CORE_PATH.match(path)
        group = ""
        if m is None:
            m = GROUP_PATH.match(path)
            if m is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            group = m.group("group")
        res = self.resources.get((group, m.group("plural")))
        if res is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        sub = m.group("sub")
        if sub is not None and not (sub == "status" and res.status_subresource):
            raise ApiError(404, "NotFound", f"subresource {sub!r} not found")
        return res, m.group("ns"), m.group("name"), sub

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        rec = RequestRecord(time.monotonic(), request.method, request.path, dict(request.query), ctype, body,
                            client=client_of(request.headers.get("User-Agent", "")))
        routed: tuple[Resource, str | None, str | None, str | None] | None = None
        with suppress(ApiError):
            routed = self._route(request.path)
        if routed is not None:
            res, ns, name, sub = routed
            rec.verb = verb_of(request.method, name, request.query.get("watch") in ("true", "True", "1"))
            rec.resource = res.plural + (f"/{sub}" if sub else "")
            rec.namespace, rec.name = ns, name
        with self._lock:
            self.requests.append(rec)
        try:
            self._check_faults(request.method, request.path, rec.client)
            if routed is not None:
                self._authorize(rec, routed[0])
            resp = await self._dispatch(request, rec, ctype, body)
        except ApiError as e:
            rec.status = e.code
            return web.json_response(_status(e.code, e.reason, e.message), status=e.code, headers=e.headers)
        rec.status = resp.status
        return resp

    def _check_faults(self, method: str, path: str, client: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._outage_until:
                raise ApiError(503, "ServiceUnavailable", "injected outage")
            self._faults = [f for f in self._faults if (f.remaining is None or f.remaining > 0)
                            and (f.until is None or now < f.until)]
            for f in self._faults:
                if f.method not in (method, "*") or not f.path.search(path):
                    continue
                if f.client is not None and not f.client.search(client):
                    continue
                f.seen += 1
                if (f.seen - 1) % f.every:
                    continue
                if f.remaining is not None:
                    f.remaining -= 1
                headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
                reason = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                          503: "ServiceUnavailable"}.get(f.status, "Error")
                raise ApiError(f.status, reason, f.message, headers)

    async def _dispatch(self, request: web.Request, rec: RequestRecord, ctype: str, body: Any) -> web.StreamResponse:
        if request.path in ("/version", "/api", "/apis", "/healthz", "/readyz"):
            return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-emulator"})
        res, ns, name, sub = self._route(request.path)
        method = request.method
        q = request.query
        if method == "GET" and name is None:
            if q.get("watch") in ("true", "True", "1"):
                return await self._watch(request, rec, res, ns)
            return web.json_response(self._list(res, ns, q))
        if method == "GET":
            obj = self.get(res.plural, name, group=res.group, namespace=ns if res.namespaced else None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            return web.json_response(obj)
        if method == "POST" and name is None:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "body must be a JSON object")
            return web.json_response(self._create(res, ns, body), status=201)
        if method == "DELETE" and name is not None:
            return web.json_response(self._delete(res, ns, name))
        if method == "PUT" and name is not None:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "body must be a JSON object")
            new = copy.deepcopy(body)
            return web.json_response(self._update(res, ns, name, lambda cur: new, sub))
        if method == "PATCH" and name is not None:
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                raise ApiError(415, "UnsupportedMediaType", f"the emulator does not support {ctype!r}")
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "merge patch body must be a JSON object")
            return web.json_response(self._update(res, ns, name, lambda cur: merge_patch(cur, body), sub))
        raise ApiError(405, "MethodNotAllowed", f"{method} not allowed on {request.path}")

    def _list(self, res: Resource, ns: str | None, q: Mapping[str, str]) -> dict[str, Any]:
        fields = parse_field_selector(q.get("fieldSelector"))
        labels = parse_label_selector(q.get("labelSelector"))
        limit = int(q.get("limit") or 0)
        start, list_rv = 0, None
        if q.get("continue"):
            try:
                list_rv, start = (int(x) for x in q["continue"].split(":", 1))
            except ValueError as e:
                raise ApiError(400, "BadRequest", "invalid continue token") from e
            with self._lock:
                if list_rv < self._history[(res.group, res.plural)].compacted:
                    raise ApiError(410, "Expired", "the provided continue parameter is too old")
        with self._lock:
            items = [o for o in self.list(res.plural, group=res.group, namespace=ns) if selected(o, fields, labels)]
            rv = list_rv if list_rv is not None else self._rv
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and start + limit < len(items):
            meta["continue"] = f"{rv}:{start + limit}"
            items = items[start:start + limit]
        else:
            items = items[start:]
        return {"apiVersion": res.api_version, "kind": res.kind + "List", "metadata": meta, "items": items}

    async def _watch(self, request: web.Request, rec: RequestRecord, res: Resource, ns: str | None
                     ) -> web.StreamResponse:
        q = request.query
        key = (res.group, res.plural)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "True", "1")
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        rv_param = q.get("resourceVersion") or ""
        watcher = _Watcher(key, ns, parse_field_selector(q.get("fieldSelector")),
                           parse_label_selector(q.get("labelSelector")), rec.client, res.plural, asyncio.Queue())
        initial: list[bytes] = []
        expired = False
        with self._lock:
            hist = self._history[key]
            if rv_param in ("", "0"):
                initial = [json.dumps({"type": "ADDED", "object": o}).encode() + b"\n"
                           for o in self.list(res.plural, group=res.group, namespace=ns)
                           if selected(o, watcher.fields, watcher.labels)]
            else:
                try:
                    since = int(rv_param)
                except ValueError as e:
                    raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from e
                if since < hist.compacted:
                    expired = True
                    err = _status(410, "Expired", f"too old resource version: {since} ({hist.compacted})")
                    initial = [json.dumps({"type": "ERROR", "object": err}).encode() + b"\n"]
                else:
                    cache: dict[str, bytes] = {}
                    for rv, etype, obj, prev in hist.events:
                        if rv > since:
                            cache.clear()
                            line = self._event_for(watcher, etype, obj, prev, cache)
                            if line is not None:
                                initial.append(line)
            if not expired:
                self._watchers.append(watcher)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        watcher.transport = request.transport
        deadline = time.monotonic() + timeout if timeout else None
        counter = self.watch_events
        try:
            for line in initial:
                await resp.write(line)
                with self._lock:
                    counter[(rec.client, res.plural, "ERROR" if expired else "EVENT")] += 1
            if expired:
                return resp
            while True:
                wait = self.bookmark_interval if bookmarks else 3600.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                try:
                    line = await asyncio.wait_for(watcher.queue.get(), wait)
                    kind = "EVENT"
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    with self._lock:
                        rv = str(self._rv)
                    line = json.dumps({
                        "type": "BOOKMARK",
                        "object": {"apiVersion": res.api_version, "kind": res.kind,
                                   "metadata": {"resourceVersion": rv}},
                    }).encode() + b"\n"
                    kind = "BOOKMARK"
                if line is None:
                    break
                await resp.write(line)
                with self._lock:
                    counter[(rec.client, res.plural, kind)] += 1
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
        with suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp


@contextmanager
def running(**kwargs: Any) -> Iterator[KubeEmulator]:
    """``with running() as kube:`` for tests that are not pytest fixtures."""
    emu = KubeEmulator(**kwargs).start()
    try:
        yield emu
    finally:
        emu.stop()


def main(argv: list[str] | None = None) -> None:
    """Run standalone (``python -m tests.peers.kube_emulator --port 8080 --node gpu-1``) for manual tries
    or agents started as processes; prints the URL, serves until interrupted."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--node", action="append", default=[], help="create a Node (repeatable)")
    args = ap.parse_args(argv)
    emu = KubeEmulator(port=args.port).start()
    for name in args.node:
        emu.create_node(name, {"kubernetes.io/hostname": name})
    print(emu.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
