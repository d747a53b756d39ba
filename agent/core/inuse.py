"""Which models the pods on this node are using: the rules that protect a model from eviction (pure).

A model ``m`` (label key ``<prefix>/m``) is *in use* on a node when a pod bound to that node, in
any phase but Succeeded or Failed (a Pending pod bound to the node is about to start and counts),
does any of:

1. its ``spec.nodeSelector`` has the key ``<prefix>/m`` (whatever the value: a pod that selects
   on the model's label came here for it);
2. a term of its required node affinity
   (``requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[].matchExpressions[]``)
   names the key ``<prefix>/m`` with operator ``In`` or ``Exists`` (``NotIn``/``DoesNotExist``
   select nodes *without* the model, so they do not count; preferred affinity does not count:
   such a pod may well run without the model);
3. it carries the annotation ``<prefix>/models: a,b`` (comma-separated model names; for pods that
   reach their node some other way, e.g. soft affinity or a fixed nodeName).

The watch adapter (``agent.k8s.pods``) reduces each Pod to a :class:`PodView` and hands the set of
pods to :func:`models_in_use`; :func:`track` keeps, per model, the last time a pod was seen using
it, for least-recently-used eviction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DONE_PHASES = frozenset({"Succeeded", "Failed"})
POSITIVE_OPERATORS = frozenset({"In", "Exists"})
MODELS_ANNOTATION = "models"  # <prefix>/models


@dataclass(frozen=True)
class PodView:
    """The few fields of a Pod the in-use rules read."""

    namespace: str
    name: str
    phase: str = ""
    node_selector_keys: frozenset[str] = frozenset()
    affinity_keys: frozenset[str] = frozenset()  # keys required with In/Exists, any term
    models_annotation: str = ""


def pod_view(obj: Mapping[str, Any], prefix: str) -> PodView:
    """Reduce a raw Pod dict to a PodView (tolerant: a malformed field just adds nothing)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    selector = spec.get("nodeSelector") or {}
    keys = frozenset(k for k in selector if isinstance(k, str)) if isinstance(selector, Mapping) else frozenset()
    affinity: set[str] = set()
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") if isinstance(required, Mapping) else None
    for term in terms if isinstance(terms, list) else []:
        exprs = term.get("matchExpressions") if isinstance(term, Mapping) else None
        for expr in exprs if isinstance(exprs, list) else []:
            if isinstance(expr, Mapping) and expr.get("operator") in POSITIVE_OPERATORS \
                    and isinstance(expr.get("key"), str):
                affinity.add(expr["key"])
    annotations = meta.get("annotations") or {}
    ann = annotations.get(f"{prefix}/{MODELS_ANNOTATION}", "") if isinstance(annotations, Mapping) else ""
    return PodView(str(meta.get("namespace", "")), str(meta.get("name", "")), str(status.get("phase") or ""),
                   keys, frozenset(affinity), ann if isinstance(ann, str) else "")


def models_of_pod(pod: PodView, prefix: str) -> frozenset[str]:
    """The models one pod uses by the three rules (empty once it has finished)."""
    if pod.phase in DONE_PHASES:
        return frozenset()
    head = prefix + "/"
    status_key = f"{prefix}/status"
    names = {k[len(head):] for k in pod.node_selector_keys | pod.affinity_keys
             if k.startswith(head) and k != status_key}
    names |= {n.strip() for n in pod.models_annotation.split(",") if n.strip()}
    return frozenset(n for n in names if n)


def models_in_use(pods: Iterable[PodView], prefix: str) -> frozenset[str]:
    out: set[str] = set()
    for pod in pods:
        out |= models_of_pod(pod, prefix)
    return frozenset(out)


@dataclass(frozen=True)
class InUse:
    """What the loop gets: models in use now, and per model the last time (seconds since the epoch) a
    pod was seen using it: now for models in use, the moment the last user went for the others."""

    models: frozenset[str] = frozenset()
    last_used: Mapping[str, float] = field(default_factory=dict)
    synced: bool = False  # False until the pod list was read once: before that, assume everything is in use


def track(prev: InUse, now_models: frozenset[str], now: float) -> InUse:
    """Fold the current set into the history (pure): models in use get ``now``, others keep their time."""
    last = dict(prev.last_used)
    for m in now_models | prev.models:
        last[m] = now
    return InUse(now_models, last, True)
