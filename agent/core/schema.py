"""The CachedModel ``spec`` schema: one source of truth for the CRD and the models file (pure).

``manifests/crd.yaml`` carries this dict verbatim between its ``BEGIN``/``END spec schema`` markers
(``python -m agent.crdgen`` writes it; a test fails when the two differ), and ``check`` applies it to
a models-file entry the way the API server applies it to a CachedModel: wrong types, unknown keys,
values out of range or off-pattern are errors naming the field. The CEL rules (``x-kubernetes-
validations``) are enforced by ``agent.core.spec``, which has a Python twin for each.

``check`` implements the subset of OpenAPI v3 this schema uses, with the API server's semantics
where they differ from JSON Schema: a ``pattern`` must match the whole value (Go's ``$`` never
matches before a trailing newline, Python's ``re.search`` with ``$`` does), an object without
``additionalProperties`` rejects unknown keys (kubectl's strict field validation), a ``null``
value counts as absent (the API server prunes it), and a ``set`` list may not repeat an item.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

# Source kinds this build implements. The one list: the source factory imports
# ``agent.sources.<kind>`` for each, the spec parser and the CRD enum accept exactly these.
SOURCE_KINDS: tuple[str, ...] = ("modelexpress", "pvc", "hub", "peers")

# A Hub name part: letters, digits, '-', '_', '.', at most 96 chars, alphanumeric at both ends.
REPO_PART_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_PATTERN = rf"^{REPO_PART_PATTERN}/{REPO_PART_PATTERN}$"
REPO_MAX = 193
COMMIT_PATTERN = r"[0-9a-f]{40}"
# A 40-hex commit, or '/'-separated ref parts that start with [A-Za-z0-9_-] (the first one not with
# '-'), never hold '..' and never end with '.' or '/'. ASCII only, so no look-alike letters.
REVISION_PATTERN = (
    rf"^({COMMIT_PATTERN}|[A-Za-z0-9_](\.?[A-Za-z0-9_-])*(/[A-Za-z0-9_-](\.?[A-Za-z0-9_-])*)*)$"
)
REVISION_MAX = 255
# A pvcSubpath part: letters, digits, '_', '-', '.', never '.' or '..'.
SUBPATH_PART_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.\.[A-Za-z0-9_.-]+"
SUBPATH_PATTERN = rf"^({SUBPATH_PART_PATTERN})(/({SUBPATH_PART_PATTERN}))*$"
SUBPATH_MAX = 1024
GLOB_MAX = 1024
GLOBS_MAX = 256
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000

# CEL rules, as the CRD states them (the spec parser enforces each one).
RULE_REPO = "!self.contains('..') && !self.contains('--')"
RULE_REVISION_LOCK = "!self.matches('[.]lock(/|$)')"


def _globs(what: str) -> dict[str, Any]:
    return {"type": "array", "description": what, "maxItems": GLOBS_MAX,
            "items": {"type": "string", "minLength": 1, "maxLength": GLOB_MAX}}


SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["repo"],
    "properties": {
        "repo": {
            "type": "string",
            "description": "Hugging Face repo id, org/name.",
            "maxLength": REPO_MAX,
            "pattern": REPO_PATTERN,
            "x-kubernetes-validations": [
                {"rule": RULE_REPO, "message": "repo must not contain '..' or '--' (they break the cache folder name)"},
            ],
        },
        "revision": {
            "type": "string",
            "description": "Branch, tag or 40-hex commit. The agent resolves it once into status.resolvedRevision.",
            "default": "main",
            "maxLength": REVISION_MAX,
            "pattern": REVISION_PATTERN,
            "x-kubernetes-validations": [
                {"rule": RULE_REVISION_LOCK, "message": "revision parts must not end with '.lock'"},
            ],
        },
        "nodeSelector": {
            "type": "object",
            "description": "Label selector for the nodes that keep this model. Empty: every node running an agent.",
            "x-kubernetes-map-type": "atomic",
            "properties": {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                "matchExpressions": {
                    "type": "array",
                    "x-kubernetes-list-type": "atomic",
                    "items": {
                        "type": "object",
                        "required": ["key", "operator"],
                        "properties": {
                            "key": {"type": "string"},
                            "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                            "values": {"type": "array", "x-kubernetes-list-type": "atomic",
                                       "items": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "files": {
            "type": "object",
            "description": "Globs over repo paths: allow (empty = everything), then ignore.",
            "properties": {"allow": _globs("Only files matching one of these."),
                           "ignore": _globs("Then drop files matching one of these.")},
        },
        "sources": {
            "type": "array",
            "description": "Preference order; empty: the agent's configured order.",
            "maxItems": len(SOURCE_KINDS),
            "x-kubernetes-list-type": "set",
            "items": {"type": "string", "enum": list(SOURCE_KINDS)},
        },
        "pvcSubpath": {
            "type": "string",
            "description": "The model's folder under a pvc source's root (a local-dir download or a plain folder). "
                           "Empty: <root>/<repo>.",
            "maxLength": SUBPATH_MAX,
            "pattern": SUBPATH_PATTERN,
        },
        "priority": {
            "type": "integer",
            "format": "int32",
            "description": "Higher is evicted last when the disk budget is hit.",
            "default": 100,
            "minimum": PRIORITY_MIN,
            "maximum": PRIORITY_MAX,
        },
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (Mapping,), "array": (list, tuple), "string": (str,), "integer": (int,), "boolean": (bool,),
    "number": (int, float),
}


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _type_ok(kind: str, value: Any) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[kind])


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check(schema: Mapping[str, Any], value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every (field path, problem) of ``value`` against ``schema``; empty when it conforms."""
    kind = schema.get("type")
    if kind and not _type_ok(kind, value):
        return [(path, f"must be of type {kind}, got {type(value).__name__} {value!r:.60}")]
    out: list[tuple[str, str]] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append((path, f"{value!r:.60} is not one of {list(schema['enum'])}"))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append((path, f"is {len(value)} characters long, at most {schema['maxLength']} allowed"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append((path, f"must be at least {schema['minLength']} characters long"))
        if "pattern" in schema and not _compiled(schema["pattern"]).fullmatch(value):
            out.append((path, f"{value!r:.80} does not match {schema['pattern']}"))
    if _type_ok("number", value):
        if "minimum" in schema and value < schema["minimum"]:
            out.append((path, f"{value} is below the minimum {schema['minimum']}"))
        if "maximum" in schema and value > schema["maximum"]:
            out.append((path, f"{value} is above the maximum {schema['maximum']}"))
    if isinstance(value, list | tuple):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append((path, f"has {len(value)} items, at most {schema['maxItems']} allowed"))
        if schema.get("x-kubernetes-list-type") == "set":
            seen: list[Any] = []
            for item in value:
                if item in seen:
                    out.append((path, f"{item!r:.60} is listed twice"))
                seen.append(item)
        if "items" in schema:
            for i, item in enumerate(value):
                out += check(schema["items"], item, f"{path}[{i}]")
    if isinstance(value, Mapping):
        out += _check_object(schema, value, path)
    return out


def _check_object(schema: Mapping[str, Any], value: Mapping[Any, Any], path: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    for key in schema.get("required", ()):
        if value.get(key) is None:
            out.append((_join(path, key), "is required"))
    for key, item in value.items():
        if not isinstance(key, str):
            out.append((path, f"key {key!r} must be a string"))
        elif item is None:
            continue  # the API server prunes nulls: same as absent
        elif key in props:
            out += check(props[key], item, _join(path, key))
        elif isinstance(extra, Mapping):
            out += check(extra, item, _join(path, key))
        elif props:
            out.append((_join(path, key), unknown_key(key, props)))
    return out


def unknown_key(key: str, known: Any) -> str:
    """'unknown key (did you mean 'revision'?)', or the list of known keys when nothing is close."""
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (known: {', '.join(names)})"
