"""The one place that builds a Kubernetes client and turns its errors into ours.

Every call goes through :func:`call`, which returns plain JSON dicts (``_preload_content=False``)
so the rest of the agent never sees ``V1Node`` or other generated models, and raises only
:class:`agent.errors.KubeApiError`. :func:`retrying` adds the bounded, classified retries: 429,
5xx, 409 and connection errors are transient, other 4xx permanent, Retry-After honoured.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from agent.errors import ConfigError, KubeApiError, KubeConflictError

log = structlog.get_logger("agent.k8s")
T = TypeVar("T")
MAX_RETRY_AFTER = 120.0
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter around the nominal delay (so 500 agents do not retry in step)."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.2  # +-20 %
    attempts: int = 8  # per call; loops that must converge eventually call again

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        r = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + r))

    def delays(self) -> Iterator[float]:
        for attempt in range(1, self.attempts):
            yield self.delay(attempt)


# Frozen defaults (module-level so signatures do not build objects): one per kind of call.
WATCH_BACKOFF = Backoff(initial=0.5, maximum=30.0)
WRITE_BACKOFF = Backoff(initial=0.5, maximum=15.0, attempts=4)
CAS_BACKOFF = Backoff(initial=0.2, maximum=5.0, attempts=6)
READ_BACKOFF = Backoff(attempts=4)


@dataclass
class KubeApi:
    """The typed API objects the adapters use, sharing one connection pool."""

    api_client: k8s_client.ApiClient
    request_timeout: float = 10.0

    @property
    def core(self) -> k8s_client.CoreV1Api:
        return k8s_client.CoreV1Api(self.api_client)

    @property
    def custom(self) -> k8s_client.CustomObjectsApi:
        return k8s_client.CustomObjectsApi(self.api_client)

    @property
    def events(self) -> k8s_client.EventsV1Api:
        return k8s_client.EventsV1Api(self.api_client)

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
) -> KubeApi:
    """Build a client: an explicit ``host`` (tests, proxies), in-cluster config, or a kubeconfig.

    ``in_cluster=None`` tries the ServiceAccount first and falls back to kubeconfig, as kubectl does.
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
    return KubeApi(k8s_client.ApiClient(cfg), request_timeout)


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


def call(fn: Callable[..., Any], *args: Any, what: str, timeout: float = 10.0, **kwargs: Any) -> dict[str, Any]:
    """One API call returning the JSON body as a dict; any failure becomes a KubeApiError."""
    try:
        resp = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        data = resp.data
        return json.loads(data) if data else {}
    except Exception as e:
        raise classify(e, what) from e


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    backoff: Backoff,
    stop: threading.Event | None = None,
    retry_conflicts: bool = True,
) -> T:
    """Run ``fn`` with bounded retries on transient errors; permanent ones (and the last try) raise.

    The wait is the server's Retry-After when it sent one, else the jittered backoff. ``stop`` cuts
    the wait short so shutdown is never delayed by a sleeping retry. Compare-and-swap callers pass
    ``retry_conflicts=False``: resending a write guarded by a stale resourceVersion cannot succeed.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except KubeApiError as e:
            if isinstance(e, KubeConflictError) and not retry_conflicts:
                raise
            if e.permanent or attempt >= backoff.attempts or (stop is not None and stop.is_set()):
                raise
            wait = e.retry_after if e.retry_after is not None else backoff.delay(attempt)
            log.warning(
                "k8s.retry", what=what, attempt=f"{attempt}/{backoff.attempts}", wait=round(wait, 3), error=str(e)
            )
            if stop is not None:
                if stop.wait(wait):
                    raise
            else:
                time.sleep(wait)
