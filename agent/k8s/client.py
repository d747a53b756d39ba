"""The one place that builds a Kubernetes client and turns its errors into ours.

Every call goes through :func:`call`, which returns plain JSON dicts (``_preload_content=False``)
so the rest of the agent never sees ``V1Node`` or other generated models, and raises only
:class:`agent.errors.KubeApiError`. :func:`request` adds the bounded, classified retries of
``agent.core.retry``: 429, 5xx and connection errors are transient, other 4xx permanent,
Retry-After honoured; a 409 is never resent blindly (a write guarded by a stale resourceVersion
cannot succeed; compare-and-swap callers re-read and decide).

Politeness like client-go's: every HTTP request, watches included, first takes a token from one
token bucket per client (``qps`` per second, ``burst`` banked), and is counted per verb and
resource (``RequestStats``) for metrics and the scale bench. The User-Agent names the node, so an
API server's audit log (and the test emulator) can tell the agents apart.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import structlog
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from agent.core.retry import RetryPolicy, is_transient, retry_call
from agent.errors import ConfigError, KubeApiError, KubeConflictError

log = structlog.get_logger("agent.k8s")
T = TypeVar("T")
MAX_RETRY_AFTER = 120.0
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "model-cache-agent/0.1"

# Default policy for single API calls; settings carry the real one (KubeSettings.retry).
API_RETRY = RetryPolicy(attempts=4, base=0.5, cap=15.0)
# Transitional: runtime/agent.py's read_node_until_reachable paces its start-up retries with this
# (``.delay(attempt)``); wiring.wait_for_api replaces it.
WATCH_BACKOFF = RetryPolicy(attempts=1_000_000, base=0.5, cap=30.0)


class TokenBucket:
    """client-go's flowcontrol limiter: ``qps`` tokens a second, at most ``burst`` banked; qps <= 0: no limit.

    ``reserve`` takes a token now and says how long the caller must wait for it (a reservation, so
    concurrent callers queue in order instead of all waking at once).
    """

    def __init__(self, qps: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self.clock = clock
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()
        self.waited = 0.0  # total seconds callers were asked to wait (metrics, bench)

    def reserve(self) -> float:
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.qps
            self.waited += wait
            return wait

    def acquire(self, stop: threading.Event | None = None) -> None:
        wait = self.reserve()
        if wait > 0:
            (stop.wait if stop is not None else time.sleep)(wait)


def request_kind(method: str, path: str, query: dict[str, list[str]]) -> tuple[str, str]:
    """(RBAC verb, resource) of a request path: ('watch', 'pods'), ('patch', 'cachedmodels/status')..."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return method.lower(), "/".join(parts)
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource += "/" + rest[2]
    watch = query.get("watch", [""])[0] in ("true", "True", "1")
    if method == "GET":
        verb = "watch" if watch else ("get" if name else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
    return verb, resource


@dataclass
class RequestStats:
    """Requests sent, per (verb, resource): what the bench and metrics report."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, verb: str, resource: str) -> None:
        with self.lock:
            self.counts[(verb, resource)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.counts)


class PoliteApiClient(k8s_client.ApiClient):
    """An ApiClient whose every request waits for the token bucket and is counted."""

    def __init__(self, configuration: k8s_client.Configuration, limiter: TokenBucket, stats: RequestStats) -> None:
        super().__init__(configuration)
        self.limiter = limiter
        self.stats = stats
        self.closing = threading.Event()  # set by close(): a request waiting for a token goes at once

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        self.stats.add(*request_kind(method.upper(), parts.path, parse_qs(parts.query)))
        self.limiter.acquire(self.closing)
        return super().call_api(method, url, *args, **kwargs)

    def close(self) -> None:
        self.closing.set()
        super().close()


@dataclass
class KubeApi:
    """The typed API objects the adapters use, sharing one connection pool, limiter and counter."""

    api_client: k8s_client.ApiClient
    request_timeout: float = 10.0
    retry: RetryPolicy = API_RETRY

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api_client)

    @property
    def custom(self) -> k8s_client.CustomObjectsApi:
        return k8s_client.CustomObjectsApi(self.api_client)

    @property
    def events(self) -> k8s_client.EventsV1Api:
        return k8s_client.EventsV1Api(self.api_client)

    @property
    def coordination(self) -> k8s_client.CoordinationV1Api:
        return k8s_client.CoordinationV1Api(self.api_client)

    @property
    def stats(self) -> RequestStats:
        return getattr(self.api_client, "stats", None) or RequestStats()

    def fork(self, *, qps: float = 2.0, burst: int = 5) -> KubeApi:
        """A client with its own connection pool and token bucket, counted with this one.

        The leader's Lease renewals use one: a burst of status writes queued in the shared bucket
        must never delay a renewal past its deadline (and cost the cluster a failover).
        """
        c = self.api_client
        limiter = TokenBucket(qps, burst)
        stats = getattr(c, "stats", None) or RequestStats()
        forked = PoliteApiClient(c.configuration, limiter, stats)
        forked.user_agent = c.user_agent
        return KubeApi(forked, self.request_timeout, self.retry)

    def close(self) -> None:
        self.api_client.close()


def make_api(
    host: str | None = None,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    in_cluster: bool | None = None,
    request_timeout: float = 10.0,
    token: str | None = None,
    qps: float = 5.0,
    burst: int = 10,
    user_agent: str | None = None,
    retry: RetryPolicy = API_RETRY,
) -> KubeApi:
    """Build a client: an explicit ``host`` (tests, proxies), in-cluster config, or a kubeconfig.

    ``in_cluster=None`` tries the ServiceAccount first and falls back to kubeconfig, as kubectl does.
    ``user_agent`` is appended in parentheses (the agent passes its node name).
    """
    cfg = k8s_client.Configuration()
    if host:
        cfg.host = host
        if token:
            cfg.api_key = {"BearerToken": token}
            cfg.api_key_prefix = {"BearerToken": "Bearer"}
    else:
        errors: list[str] = []
        if in_cluster in (None, True):
            try:
                k8s_config.load_incluster_config(client_configuration=cfg)
            except k8s_config.ConfigException as e:
                errors.append(f"in-cluster: {e}")
                if in_cluster:
                    raise ConfigError(f"in-cluster Kubernetes config unavailable: {e}") from e
            else:
                errors = []
                in_cluster = True
        if in_cluster is not True:
            try:
                k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
            except (k8s_config.ConfigException, OSError) as e:
                errors.append(f"kubeconfig: {e}")
                raise ConfigError("no Kubernetes config: " + "; ".join(errors)) from e
    # urllib3 would otherwise retry GETs on 429/503 by itself, sleeping Retry-After unlogged and deaf to
    # the stop event. Keep only immediate reconnects; every other retry is ours (classified, logged).
    cfg.retries = urllib3.Retry(
        total=2,
        connect=2,
        read=0,
        status=0,
        other=0,
        redirect=0,
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    api_client = PoliteApiClient(cfg, TokenBucket(qps, burst), RequestStats())
    api_client.user_agent = f"{USER_AGENT} ({user_agent})" if user_agent else USER_AGENT
    return KubeApi(api_client, request_timeout, retry)


def name_client(api: KubeApi, name: str) -> None:
    """Put ``name`` (the node) into the User-Agent, unless the client was built with one."""
    if api.api_client.user_agent == USER_AGENT:
        api.api_client.user_agent = f"{USER_AGENT} ({name})"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    return min(MAX_RETRY_AFTER, max(0.0, secs))


def classify(exc: BaseException, what: str) -> KubeApiError:
    """Map a client/transport exception to our tree; 409 gets its own class for compare-and-swap callers."""
    if isinstance(exc, KubeApiError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        headers = exc.headers or {}
        retry_after = parse_retry_after(headers.get("Retry-After") if hasattr(headers, "get") else None)
        detail = _status_message(exc.body) or str(exc.reason or "")
        msg = f"{what}: HTTP {status} {detail}".rstrip()
        if status == 409:
            return KubeConflictError(msg, retry_after=retry_after)
        transient = status == 429 or status >= 500 or status == 0
        return KubeApiError(msg, status=status, permanent=not transient, retry_after=retry_after)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError | TimeoutError):
        return KubeApiError(f"{what}: {type(exc).__name__}: {exc}", status=0, permanent=False)
    return KubeApiError(f"{what}: {type(exc).__name__}: {exc}", status=0, permanent=True)


def _status_message(body: Any) -> str:
    if not body:
        return ""
    try:
        obj = json.loads(body)
    except (TypeError, ValueError):
        return str(body)[:200]
    return str(obj.get("message", ""))[:200] if isinstance(obj, dict) else ""


def call(fn: Callable[..., Any], *args: Any, what: str, timeout: float | tuple[float, float] = 10.0,
         **kwargs: Any) -> dict[str, Any]:
    """One API call returning the JSON body as a dict; any failure becomes a KubeApiError."""
    try:
        resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        data = resp.data
        return json.loads(data) if data else {}
    except Exception as e:
        raise classify(e, what) from e


def retryable(err: BaseException) -> bool:
    """Transient and not a conflict: a 409 means 're-read and decide', never 'send the same again'."""
    return is_transient(err) and not isinstance(err, KubeConflictError)


def request(api: KubeApi, fn: Callable[..., Any], *args: Any, what: str, stop: threading.Event | None = None,
            policy: RetryPolicy | None = None, timeout: float | tuple[float, float] | None = None,
            retry_conflicts: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``call`` under the API retry policy (``api.retry`` unless given): the one way adapters make a call.

    ``retry_conflicts`` is for writes without a resourceVersion precondition (a merge patch of our own
    label keys), where a 409 can only be the server's own transient conflict and resending is right.
    """
    return retry_call(
        lambda: call(fn, *args, what=what, timeout=api.request_timeout if timeout is None else timeout, **kwargs),
        policy=policy or api.retry, what=what, retryable=is_transient if retry_conflicts else retryable, stop=stop,
    )
