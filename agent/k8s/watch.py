"""One list+watch helper (an informer reduced to what we need) for every resource the agent follows.

CachedModels, this agent's own Node (``fieldSelector=metadata.name=<node>``), the Pods bound to
this node (``spec.nodeName=<node>``), the leader Lease and, on the leader only, every agent Node:
all go through :class:`Reflector`, so resourceVersion handling, bookmarks, 410 relists, paging and
backoff are written (and tested) once.

- list (paged) -> watch from the list's resourceVersion with bookmarks, so a quiet watch still
  advances and a reconnect resumes without a relist;
- a watch session asks the server for ``[timeout, 2*timeout)`` seconds (jittered like client-go,
  so a fleet does not reconnect in step) and gives up on a connection silent for ``idle`` seconds;
- 410 Gone (in the stream or on a paged list) -> relist after a jittered pause (after an API
  server restart every agent gets 410 at once);
- errors -> jittered exponential backoff from a RetryPolicy; a permanent error (403, 404) waits the
  policy's cap and logs what RBAC the call needs, every time, so a missing permission is visible;
- no periodic relist: consumers are level-triggered and keep their own timers (client-go's resync
  is in memory only, and costs one request per agent per period for nothing at 1000 nodes).

Objects are stored as ``parse(raw)`` (a small frozen projection, or None to skip), keyed by
``namespace/name``. ``on_change`` runs on the watch thread after a list and after every event that
changed a stored value; it must be quick (consumers mark themselves dirty and return).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from agent.core.retry import RetryPolicy
from agent.errors import KubeApiError
from agent.k8s.client import KubeApi, call, classify
from agent.k8s.threads import start_daemon

log = structlog.get_logger("agent.k8s.watch")
T = TypeVar("T")


@dataclass(frozen=True)
class WatchSettings:
    timeout: float = 900.0  # a session asks for [timeout, 2*timeout) seconds
    idle: float = 300.0  # no byte at all (event or bookmark) for this long: reconnect
    page: int = 500
    backoff: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=1_000_000, base=0.5, cap=30.0))
    relist_jitter: float = 2.0  # a relist after 410 waits uniform(0, relist_jitter) seconds


@dataclass(frozen=True)
class WatchTarget:
    """What to list and watch: an API list method, its positional args and selectors."""

    what: str  # for logs: "cachedmodels", "node gpu-1", "pods on gpu-1"
    list_fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    field_selector: str | None = None
    label_selector: str | None = None
    need: str = ""  # the RBAC this needs, named in the log on 403: "list, watch pods (cluster-wide)"

    def selectors(self) -> dict[str, str]:
        out = {}
        if self.field_selector:
            out["field_selector"] = self.field_selector
        if self.label_selector:
            out["label_selector"] = self.label_selector
        return out


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name', '')}" if ns else str(meta.get("name", ""))


class _Expired(Exception):
    """410 Gone: our resourceVersion was compacted away; relist."""


class Reflector(Generic[T]):
    """List + watch one target into a dict of parsed objects; see the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        target: WatchTarget,
        parse: Callable[[Mapping[str, Any]], T | None],
        *,
        stop: threading.Event,
        on_change: Callable[[], None] | None = None,
        settings: WatchSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.target = target
        self.parse = parse
        self.stop = stop
        self.on_change = on_change
        self.settings = settings or WatchSettings()
        self.clock = clock
        self.rng = rng or random.Random()
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()
        self._rv: str | None = None
        self._need_list = True
        self._relist_pause = 0.0
        self._resp: Any = None
        self._failures = 0
        self.synced = threading.Event()
        self.stats: Counter[str] = Counter()  # lists, watches, events, bookmarks, expired, failures
        self.last_error: str | None = None

    # ---- reading ---------------------------------------------------------------------------
    def items(self) -> dict[str, T]:
        with self._lock:
            return dict(self._items)

    def get(self, key: str) -> T | None:
        with self._lock:
            return self._items.get(key)

    @property
    def resource_version(self) -> str | None:
        return self._rv

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:  # a consumer's bug must not kill the watch
            log.exception("watch.on_change_failed", what=self.target.what)

    # ---- list ---------------------------------------------------------------------------------
    def _list(self) -> None:
        items: dict[str, T] = {}
        rv: str | None = None
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"limit": self.settings.page, **self.target.selectors()}
            if token:
                kw["_continue"] = token
            body = call(self.target.list_fn, *self.target.args, what=f"list {self.target.what}",
                        timeout=self.api.request_timeout, **kw)
            meta = body.get("metadata") or {}
            if rv is None:
                rv = str(meta.get("resourceVersion") or "") or None
            for raw in body.get("items") or []:
                parsed = self.parse(raw)
                if parsed is not None:
                    items[object_key(raw)] = parsed
            token = meta.get("continue") or None
            if not token:
                break
        with self._lock:
            self._items = items
            self._rv = rv
        self._need_list = False
        self.stats["lists"] += 1
        log.debug("watch.listed", what=self.target.what, count=len(items), resource_version=rv)
        self._changed()
        self.synced.set()

    # ---- watch --------------------------------------------------------------------------------
    def _apply(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        raw = event.get("object") or {}
        if etype == "ERROR":
            code = int(raw.get("code") or 0)
            if code == 410:
                raise _Expired()
            raise KubeApiError(f"watch {self.target.what}: {raw.get('message', 'error event')}", status=code,
                               permanent=not (code == 429 or code >= 500))
        rv = (raw.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            self.stats["bookmarks"] += 1
            if rv:
                self._rv = str(rv)
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            return
        self.stats["events"] += 1
        key = object_key(raw)
        parsed = None if etype == "DELETED" else self.parse(raw)
        with self._lock:
            old = self._items.get(key)
            if parsed is None:
                self._items.pop(key, None)
            else:
                self._items[key] = parsed
            if rv:
                self._rv = str(rv)
        if old != parsed:
            self._changed()

    def _watch(self) -> int:
        """One watch session; returns the number of events read. Raises KubeApiError or _Expired."""
        timeout = int(self.settings.timeout * (1.0 + self.rng.random()))
        what = f"watch {self.target.what}"
        try:
            resp = self.target.list_fn(
                *self.target.args, watch=True, resource_version=self._rv, allow_watch_bookmarks=True,
                timeout_seconds=timeout, _preload_content=False,
                _request_timeout=(self.api.request_timeout, self.settings.idle), **self.target.selectors())
        except Exception as e:
            raise classify(e, what) from e
        self._resp = resp
        self.stats["watches"] += 1
        started = self.clock()
        got = 0
        buf = bytearray()
        try:
            for chunk in resp.stream(amt=None, decode_content=False):
                if self.stop.is_set():
                    break
                buf.extend(chunk)
                while (nl := buf.find(b"\n")) != -1:
                    line, buf = bytes(buf[:nl]), buf[nl + 1:]
                    if line.strip():
                        got += 1
                        self._apply(json.loads(line))
        except (_Expired, KubeApiError):
            raise
        except Exception as e:
            if self.stop.is_set():
                return got
            err = classify(e, what)
            if got or self.clock() - started >= 1.0:
                # A session that worked and was then cut (API server restart, proxy, load balancer idle
                # timeout): resume from our resourceVersion at once; backing off would only lose time.
                self.stats["cut"] += 1
                log.info("watch.cut", what=self.target.what, error=str(err))
                return max(got, 1)
            raise err from e
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()
        return got

    def cut(self) -> None:
        """Abort the open watch session now (shutdown, tests); the next step reconnects."""
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # already closed: nothing to cut
                log.debug("watch.cut_failed", what=self.target.what)

    # ---- driving ------------------------------------------------------------------------------
    def run_once(self) -> None:
        """One step: (re)list if needed, then one watch session until it ends, expires or fails."""
        if self._relist_pause > 0:
            pause, self._relist_pause = self._relist_pause, 0.0
            if self.stop.wait(pause):
                return
        if self._need_list or self._rv is None:
            self._list()
        started = self.clock()
        try:
            got = self._watch()
        except _Expired:
            self.stats["expired"] += 1
            log.info("watch.expired", what=self.target.what, resource_version=self._rv)
            self._need_list = True
            self._relist_pause = self.rng.uniform(0, self.settings.relist_jitter)
            return
        if not got and self.clock() - started < 1.0 and not self.stop.is_set():
            # A watch closed at once with nothing in it: treat like an error so we back off, not spin.
            raise KubeApiError(f"watch {self.target.what}: closed immediately", permanent=False)

    def run(self) -> None:
        """Until ``stop``: run_once, with jittered backoff after failures; never raises."""
        while not self.stop.is_set():
            try:
                self.run_once()
                self._failures = 0
                self.last_error = None
            except KubeApiError as e:
                self._failures += 1
                self.stats["failures"] += 1
                self.last_error = str(e)
                if e.status == 410:
                    self._need_list = True
                policy = self.settings.backoff
                delay = policy.delay(min(self._failures, 30), self.rng)
                if e.retry_after is not None:  # 429/503 with Retry-After: the server said when
                    delay = max(delay, min(e.retry_after, policy.max_retry_after))
                if e.permanent:
                    delay = max(delay, policy.cap)
                    log.warning("watch.forbidden" if e.status == 403 else "watch.failed", what=self.target.what,
                                error=str(e), need=self.target.need, retry_in=round(delay, 3))
                else:
                    log.warning("watch.failed", what=self.target.what, error=str(e), attempt=self._failures,
                                retry_in=round(delay, 3))
                self.stop.wait(delay)
            except Exception:  # a bug here must not end the watch for good
                self._failures += 1
                log.exception("watch.crashed", what=self.target.what)
                self.stop.wait(self.settings.backoff.cap)

    def start(self, name: str | None = None) -> threading.Thread:
        """Run in a daemon thread; the open watch is cut as soon as ``stop`` is set."""
        return start_daemon(self.run, name or f"watch {self.target.what}", self.stop, self.cut)
