"""Who is warm, read from Node labels and CachedModels: the data behind ``model-cache-agent coverage``.

Labels are the contract workers schedule on, so readiness is read from them (not from agents' own
reports): what this shows is exactly what a ``nodeSelector`` would see. The denominator of each
model is the nodes its CachedModel's ``spec.nodeSelector`` selects, evaluated with the agent's own
selector code, so a model meant for 2 GPU nodes of a 50-node cluster is 2/2, not 2/50.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core import selector
from agent.core.retry import RetryPolicy
from agent.errors import KubeApiError, SpecError
from agent.k8s.client import KubeApi, request
from agent.k8s.crd import GROUP, PLURAL, VERSION, parse_cached_model

ONE_TRY = RetryPolicy(attempts=1)  # a person is waiting: say what is wrong at once instead of retrying
WIDE_MAX = 12  # more nodes than this: list the missing ones instead of a column per node


@dataclass(frozen=True)
class ModelCoverage:
    name: str
    ready: tuple[str, ...]  # selected nodes carrying the ready label
    missing: tuple[str, ...]  # selected nodes without it
    stray: tuple[str, ...] = ()  # labelled ready although the nodeSelector does not select them
    note: str = ""  # 'no CachedModel', 'invalid spec: ...'

    @property
    def desired(self) -> int:
        return len(self.ready) + len(self.missing)


@dataclass(frozen=True)
class Coverage:
    nodes: tuple[str, ...]
    models: tuple[ModelCoverage, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def compute(nodes: Sequence[tuple[str, Mapping[str, str]]], models: Mapping[str, Mapping[str, Any] | None] | None,
            prefix: str) -> Coverage:
    """Pure: per model, the ready and missing nodes among those its selector picks.

    ``models`` maps CachedModel name -> nodeSelector (None: the spec is invalid). ``models=None``
    means CachedModels could not be read: every node counts, as for a model without one.
    """
    states = {name: selector.model_states(labels, prefix) for name, labels in nodes}
    names = sorted({m for s in states.values() for m in s} | set(models or {}))
    out = []
    for m in names:
        ready_on = {n for n, s in states.items() if s.get(m) == selector.READY}
        note = ""
        if models is not None and m not in models:
            note = "no CachedModel: counted over every node"
        sel = (models or {}).get(m)
        if models is not None and m in models and sel is None:
            note = "invalid CachedModel spec: counted over every node"
        try:
            chosen = [n for n, labels in nodes if selector.matches(sel, labels)]
        except SpecError as e:
            chosen, note = [n for n, _ in nodes], f"invalid nodeSelector ({e}): counted over every node"
        out.append(ModelCoverage(
            m, tuple(sorted(n for n in chosen if n in ready_on)), tuple(sorted(n for n in chosen if n not in ready_on)),
            tuple(sorted(ready_on - set(chosen))), note))
    notes = () if models is not None else ("CachedModels not readable: each model counted over every node",)
    return Coverage(tuple(sorted(n for n, _ in nodes)), tuple(out), notes)


def _list_all(api: KubeApi, fn: Any, what: str, page: int, **kw: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {**kw, "limit": page}
        if token:
            kwargs["_continue"] = token
        body = request(api, fn, what=what, policy=ONE_TRY, **kwargs)
        items += body.get("items") or []
        token = (body.get("metadata") or {}).get("continue") or None
        if not token:
            return items


def _root_cause(e: BaseException) -> str:
    """'Connection refused' rather than urllib3's MaxRetryError(NewConnectionError(...)) nest."""
    inner: BaseException = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    reason = getattr(inner, "reason", None)
    if isinstance(reason, BaseException):
        inner = reason
    text = str(inner)
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return text.rsplit("] ", 1)[-1] if "[Errno" in text else text


def read_coverage(api: KubeApi, prefix: str = "modelcache.dev", *, page: int = 500) -> Coverage:
    """Nodes (paged) and CachedModels from the API, then ``compute``. Raises KubeApiError (one try)."""
    try:
        node_items = _list_all(api, api.core.list_node, "list nodes", page)
    except KubeApiError as e:
        host = api.api_client.configuration.host
        if e.status == 0:
            raise KubeApiError(f"cannot reach the Kubernetes API at {host}: {_root_cause(e)}") from e
        raise KubeApiError(f"Kubernetes API at {host}: {e}", status=e.status) from e
    nodes = [(str((i.get("metadata") or {}).get("name", "")), (i.get("metadata") or {}).get("labels") or {})
             for i in node_items]
    models: dict[str, Mapping[str, Any] | None] | None
    try:
        objs = _list_all(api, api.custom.list_cluster_custom_object, "list cachedmodels", page,
                         group=GROUP, version=VERSION, plural=PLURAL)
    except KubeApiError as e:
        if e.status not in (403, 404):
            raise
        models = None  # CRD not installed, or no RBAC to read it: labels alone still tell who is warm
    else:
        models = {}
        for o in objs:
            cm = parse_cached_model(o)
            if cm.name:
                models[cm.name] = cm.spec.node_selector if cm.spec is not None else None
    return compute(nodes, models, prefix)


def coverage_json(cov: Coverage) -> dict[str, Any]:
    return {
        "nodes": list(cov.nodes),
        "models": {m.name: {"ready": len(m.ready), "desired": m.desired, "readyNodes": list(m.ready),
                            "missingNodes": list(m.missing), "strayNodes": list(m.stray),
                            **({"note": m.note} if m.note else {})}
                   for m in cov.models},
        **({"notes": list(cov.notes)} if cov.notes else {}),
    }


def format_coverage(cov: Coverage) -> str:
    """READY n/m per model; a column per node when few ('ready', '-' missing, '.' not selected)."""
    if not cov.models:
        return f"no models: no CachedModel exists and none of the {len(cov.nodes)} nodes carries a model label"
    wide = len(cov.nodes) <= WIDE_MAX
    head = ["MODEL", "READY", *(cov.nodes if wide else ["NOT-READY"])]
    rows = []
    for m in cov.models:
        cells = [m.name, f"{len(m.ready)}/{m.desired}"]
        if wide:
            cells += ["ready" if n in m.ready else "-" if n in m.missing else "." for n in cov.nodes]
        else:
            cells.append(",".join(m.missing[:5]) + (f",+{len(m.missing) - 5}" if len(m.missing) > 5 else "") or "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    if wide and any(m.desired < len(cov.nodes) for m in cov.models):
        lines.append("('.': the model's nodeSelector does not select that node)")
    for m in cov.models:
        if m.note:
            lines.append(f"{m.name}: {m.note}")
        if m.stray:
            lines.append(f"{m.name}: labelled ready on {', '.join(m.stray)}, which its nodeSelector does not select")
    lines += list(cov.notes)
    return "\n".join(lines)
