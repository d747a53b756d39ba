"""Label selectors and node-label diffs: pure data, no I/O.

The Kubernetes adapter (``agent.k8s``) feeds these functions plain dicts, so the loop and the
``coverage`` command decide with the same rules the API server would, and tests need no cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.errors import SpecError

READY = "ready"
STATUS_SUFFIX = "status"
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str], field: str) -> bool:
    if not isinstance(expr, Mapping):
        raise SpecError(field, "must be a mapping with key, operator and values")
    key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
    if not isinstance(key, str) or not key:
        raise SpecError(f"{field}.key", "is required")
    if op not in _OPERATORS:
        raise SpecError(f"{field}.operator", f"{op!r} is not one of {list(_OPERATORS)}")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SpecError(f"{field}.values", "must be a list of strings")
    # Same validation as apimachinery: In/NotIn need values, Exists/DoesNotExist must have none.
    if op in ("In", "NotIn") and not values:
        raise SpecError(f"{field}.values", f"must be non-empty for operator {op}")
    if op in ("Exists", "DoesNotExist") and values:
        raise SpecError(f"{field}.values", f"must be empty for operator {op}")
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    return key not in labels


def validate(selector: Mapping[str, Any] | None, field: str = "spec.nodeSelector") -> None:
    """Raise SpecError naming the field if the selector is malformed (checked even where it would not match)."""
    matches(selector, {}, field=field, check_all=True)


def matches(
    selector: Mapping[str, Any] | None,
    labels: Mapping[str, str],
    *,
    field: str = "spec.nodeSelector",
    check_all: bool = True,
) -> bool:
    """Whether a LabelSelector (matchLabels + matchExpressions) selects ``labels``.

    An empty or missing selector matches every node, as in a DaemonSet-style "everywhere" model.
    Every expression is validated even after a mismatch (``check_all``) so a bad spec is reported
    on every node, not only on those where earlier terms happened to match.
    """
    if not selector:
        return True
    if not isinstance(selector, Mapping):
        raise SpecError(field, "must be a label selector mapping")
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SpecError(field, f"unknown keys {sorted(unknown)}")
    ok = True
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise SpecError(f"{field}.matchLabels", "must be a mapping of label to value")
    for key, value in match_labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError(f"{field}.matchLabels", f"{key!r}: keys and values must be strings")
        if labels.get(key) != value:
            ok = False
            if not check_all:
                return False
    exprs = selector.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise SpecError(f"{field}.matchExpressions", "must be a list")
    for i, expr in enumerate(exprs):
        if not _expression_matches(expr, labels, f"{field}.matchExpressions[{i}]"):
            ok = False
            if not check_all:
                return False
    return ok


def status_key(prefix: str) -> str:
    """The per-node status annotation key, '<prefix>/status' (never a label)."""
    return f"{prefix}/{STATUS_SUFFIX}"


def owned(key: str, prefix: str) -> bool:
    """True for a label key this agent manages: under '<prefix>/' and not the status annotation key."""
    return key.startswith(prefix + "/") and key != status_key(prefix)


def label_patch(current: Mapping[str, str], desired: Mapping[str, str], prefix: str) -> dict[str, str | None]:
    """The merge-patch ``metadata.labels`` body turning ``current`` into ``desired`` under ``prefix``.

    Only keys under '<prefix>/' are ever set or removed (None = delete), so labels owned by kubelet,
    GPU operators or users are never touched, and a stale '<prefix>/x' left by an earlier run is
    removed. Desired keys outside the prefix are a caller bug and are ignored, not applied.
    """
    patch: dict[str, str | None] = {}
    for key, value in desired.items():
        if owned(key, prefix) and current.get(key) != value:
            patch[key] = value
    for key in current:
        if owned(key, prefix) and key not in desired:
            patch[key] = None
    return patch


def model_states(labels: Mapping[str, str], prefix: str) -> dict[str, str]:
    """{model name: label value} for every label under the prefix."""
    cut = len(prefix) + 1
    return {key[cut:]: value for key, value in labels.items() if owned(key, prefix)}

