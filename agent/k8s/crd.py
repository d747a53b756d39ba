"""CachedModel custom resources: our frozen view of one, and the status writes.

Reading is the generic watch (``agent.k8s.watch.Reflector`` with :func:`parse_cached_model`);
this module holds what is specific to CachedModels:

- :func:`parse_cached_model`: a raw object -> :class:`CachedModelObj` (a spec the agent cannot use
  is kept, with ``error`` naming the field, so it can be reported and the agent keeps running);
- :func:`write_status`: the leader's status write, a merge patch guarded by the resourceVersion it
  computed from (a stale leader's late write becomes a 409, never a lost update);
- :func:`pin_revision`: an agent pins ``status.resolvedRevision`` itself only when no leader did
  within ``pin_wait`` (no Lease permission, leader gone): compare-and-swap, the first writer wins
  and every other agent adopts its commit.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.core import selector
from agent.core.aggregate import pin_applies
from agent.core.retry import RetryPolicy, is_transient, retry_call
from agent.core.spec import ModelSpec, parse_model_spec
from agent.errors import KubeApiError, SpecError
from agent.k8s.client import MERGE_PATCH, KubeApi, call, request

log = structlog.get_logger("agent.k8s.crd")

GROUP = "modelcache.dev"
VERSION = "v1alpha1"
PLURAL = "cachedmodels"
KIND = "CachedModel"
API_VERSION = f"{GROUP}/{VERSION}"


def rfc3339(wall: float | None = None) -> str:
    when = datetime.now(UTC) if wall is None else datetime.fromtimestamp(wall, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CachedModelObj:
    """One CachedModel as the agent sees it: a parsed spec or the reason it could not be parsed."""

    name: str
    spec: ModelSpec | None
    error: SpecError | None
    resource_version: str
    resolved_revision: str | None  # status.resolvedRevision, when it pins the current spec.revision
    generation: int
    uid: str = ""
    status: Mapping[str, Any] = field(default_factory=dict)
    revision: str | None = None  # spec.revision as written (also when the spec is otherwise invalid)

    @property
    def ok(self) -> bool:
        return self.spec is not None


def parse_cached_model(obj: Mapping[str, Any]) -> CachedModelObj:
    """Turn a raw CachedModel dict into our frozen type; spec problems become ``error``, never raise."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if not isinstance(status, Mapping):
        status = {}
    spec: ModelSpec | None = None
    error: SpecError | None = None
    try:
        spec = parse_model_spec(obj)
        selector.validate(spec.node_selector, "spec.nodeSelector")
    except SpecError as e:
        spec, error = None, e
    resolved = status.get("resolvedRevision")
    if spec is not None and not pin_applies(status, spec.revision):
        resolved = None  # pinned for an older spec.revision: the pin no longer applies
    raw_rev = (obj.get("spec") or {}).get("revision", "main") if isinstance(obj.get("spec"), Mapping) else None
    return CachedModelObj(
        name=str(meta.get("name", "")),
        spec=spec,
        error=error,
        resource_version=str(meta.get("resourceVersion", "")),
        resolved_revision=resolved if isinstance(resolved, str) and resolved else None,
        generation=int(meta.get("generation") or 0),
        uid=str(meta.get("uid", "")),
        status=dict(status),
        revision=raw_rev if isinstance(raw_rev, str) else None,
    )


def get_cached_model(api: KubeApi, name: str, *, stop: threading.Event | None = None) -> dict[str, Any]:
    return request(api, api.custom.get_cluster_custom_object, GROUP, VERSION, PLURAL, name,
                   what=f"get cachedmodel {name}", stop=stop)


def _patch_status(api: KubeApi, name: str, body: dict[str, Any], *,
                  timeout: float | tuple[float, float] | None = None) -> dict[str, Any]:
    return call(api.custom.patch_cluster_custom_object_status, GROUP, VERSION, PLURAL, name, body,
                what=f"patch cachedmodel {name} status", timeout=api.request_timeout if timeout is None else timeout,
                _content_type=MERGE_PATCH)


def write_status(api: KubeApi, name: str, resource_version: str, patch: Mapping[str, Any], *,
                 timeout: float | None = None) -> dict[str, Any]:
    """One status merge patch guarded by ``resource_version``; raises KubeConflictError when it moved on.

    A single try: the leader re-computes from fresh state on its next pass instead of resending.
    """
    body = {"metadata": {"resourceVersion": resource_version}, "status": dict(patch)}
    return _patch_status(api, name, body, timeout=timeout)


def pin_revision(
    api: KubeApi,
    name: str,
    resolved_commit: str,
    expected_resource_version: str | None = None,
    *,
    revision: str,
    policy: RetryPolicy | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Pin ``status.resolvedRevision`` once for the whole cluster; return the commit everyone must fill.

    The write carries ``metadata.resourceVersion`` so it only lands on the version we read. On 409
    ``retry_call`` tries again: a fresh read shows either someone's pin for the same ``revision``
    (theirs wins and is returned) or only some other change (we write again on the new version).
    """
    rv = [expected_resource_version]

    def attempt() -> str:
        if rv[0] is None:
            current = call(api.custom.get_cluster_custom_object, GROUP, VERSION, PLURAL, name,
                           what=f"get cachedmodel {name}", timeout=api.request_timeout)
            status = current.get("status") or {}
            if pin_applies(status, revision):
                log.info("crd.pin_lost", model=name, ours=resolved_commit, theirs=status["resolvedRevision"])
                return str(status["resolvedRevision"])
            rv[0] = str((current.get("metadata") or {}).get("resourceVersion"))
        body = {"metadata": {"resourceVersion": rv[0]},
                "status": {"resolvedRevision": resolved_commit, "resolvedFrom": revision, "resolvedAt": rfc3339()}}
        try:
            obj = _patch_status(api, name, body)
        except KubeApiError:
            rv[0] = None  # re-read before the next try, whatever went wrong
            raise
        pinned = str((obj.get("status") or {}).get("resolvedRevision") or resolved_commit)
        log.info("crd.pinned", model=name, commit=pinned)
        return pinned

    return retry_call(attempt, policy=policy or api.retry, what=f"pin {name}", retryable=is_transient, stop=stop)
