"""Model specs, label names and revision rules: pure data and validation, no I/O.

A spec arrives from a CachedModel CR, a models file or the ``fill`` command line. Every error
names the field so a user can fix the exact line.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core import selector
from agent.core.schema import (
    COMMIT_PATTERN,
    GLOB_MAX,
    REPO_MAX,
    REPO_PART_PATTERN,
    REVISION_MAX,
    REVISION_PATTERN,
    SPEC_SCHEMA,
    SUBPATH_MAX,
    SUBPATH_PART_PATTERN,
    check,
    unknown_key,
)
from agent.errors import SpecError

# Every pattern is applied with ``fullmatch``: ``$`` alone would accept a trailing newline.
COMMIT_RE = re.compile(COMMIT_PATTERN)
REPO_PART_RE = re.compile(REPO_PART_PATTERN)
REVISION_RE = re.compile(REVISION_PATTERN)
# A DNS-1123 label: what a CachedModel name must be so it can also be a label name.
LABEL_NAME_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
# A DNS-1123 subdomain (at most 253 chars): the label prefix.
LABEL_PREFIX_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
LABEL_PREFIX_MAX = 253
API_GROUP = "modelcache.dev"
KIND = "CachedModel"
OBJECT_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
SUBPATH_PART_RE = re.compile(SUBPATH_PART_PATTERN)


def _show(value: str) -> str:
    """A value for an error message: repr (so \\n, NUL and look-alikes are visible), cut when long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"...' ({len(value)} chars)"


def is_commit(revision: str) -> bool:
    """True for a full 40-hex commit id (the only revision form that needs no resolution)."""
    return bool(COMMIT_RE.fullmatch(revision))


def validate_repo_id(repo: str, field_name: str = "repo") -> str:
    if not isinstance(repo, str):
        raise SpecError(field_name, "must be a string 'org/name'")
    if len(repo) > REPO_MAX:
        raise SpecError(field_name, f"{_show(repo)} is longer than {REPO_MAX} characters")
    parts = repo.split("/")
    if len(parts) != 2:
        raise SpecError(field_name, f"{_show(repo)} must be 'org/name'")
    for part in parts:
        if not REPO_PART_RE.fullmatch(part) or "--" in part or ".." in part:
            raise SpecError(field_name, f"{_show(repo)}: {_show(part)} is not a valid Hub name part "
                                        "(ASCII letters, digits, '-', '_', '.'; no '--' or '..')")
    return repo


def validate_revision(revision: str, field_name: str = "revision") -> str:
    """Accept a 40-hex commit or a branch/tag name the CRD accepts (same pattern, same '.lock' rule)."""
    if not isinstance(revision, str):
        raise SpecError(field_name, "must be a string")
    if not revision:
        raise SpecError(field_name, "must not be empty")
    if len(revision) > REVISION_MAX:
        raise SpecError(field_name, f"{_show(revision)} is longer than {REVISION_MAX} characters")
    if not REVISION_RE.fullmatch(revision) or any(p.endswith(".lock") for p in revision.split("/")):
        raise SpecError(field_name, f"{_show(revision)} is not a valid branch, tag or 40-hex commit")
    return revision


def validate_subpath(value: str, field_name: str = "pvcSubpath") -> str:
    """The model's folder under a PVC root, 'org/name' style: relative, no '.' or '..', at most 1024 chars."""
    if (not isinstance(value, str) or not value or len(value) > SUBPATH_MAX
            or not all(SUBPATH_PART_RE.fullmatch(p) for p in value.split("/"))):
        raise SpecError(field_name, f"{value!r} must be a relative folder path like 'org/name' "
                        "(letters, digits, '_', '-', '.'; no '..', no leading or trailing '/')")
    return value


def validate_model_name(name: str, field_name: str = "metadata.name") -> str:
    if not isinstance(name, str) or not LABEL_NAME_RE.fullmatch(name):
        raise SpecError(
            field_name,
            f"{_show(name) if isinstance(name, str) else repr(name)} must be a DNS-1123 label (lowercase letters, "
            "digits, '-', at most 63 chars) because it becomes the node label name",
        )
    return name


def validate_label_prefix(prefix: str, field_name: str = "--label-prefix") -> str:
    if not isinstance(prefix, str) or len(prefix) > LABEL_PREFIX_MAX or not LABEL_PREFIX_RE.fullmatch(prefix):
        raise SpecError(field_name, f"{_show(str(prefix))} is not a DNS subdomain (lowercase letters, digits, "
                                    f"'-', '.', at most {LABEL_PREFIX_MAX} chars)")
    return prefix


def validate_glob(pattern: str, field_name: str) -> str:
    """A relative glob over repo paths: no control characters, not absolute, not over-long."""
    if not isinstance(pattern, str) or not pattern:
        raise SpecError(field_name, "must be a non-empty glob string")
    if len(pattern) > GLOB_MAX:
        raise SpecError(field_name, f"{_show(pattern)} is longer than {GLOB_MAX} characters")
    if any(ord(c) < 32 or ord(c) == 0x7F for c in pattern):
        raise SpecError(field_name, f"{_show(pattern)} holds a control character")
    if pattern.startswith("/"):
        raise SpecError(field_name, f"{_show(pattern)} is not a relative glob")
    return pattern


def _glob_list(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise SpecError(field_name, "must be a list of non-empty glob strings")
    return tuple(validate_glob(v, f"{field_name}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class FileFilter:
    """allow/ignore globs with huggingface_hub's semantics (a trailing '/' means the whole folder)."""

    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @staticmethod
    def _expand(pattern: str) -> str:
        return pattern + "*" if pattern.endswith("/") else pattern

    def matches(self, path: str) -> bool:
        if self.allow and not any(fnmatch.fnmatchcase(path, self._expand(p)) for p in self.allow):
            return False
        return not any(fnmatch.fnmatchcase(path, self._expand(p)) for p in self.ignore)

    def select(self, paths: Iterable[str]) -> list[str]:
        return [p for p in paths if self.matches(p)]

    def to_dict(self) -> dict[str, list[str]]:
        return {"allow": list(self.allow), "ignore": list(self.ignore)}


@dataclass(frozen=True)
class ModelSpec:
    """What one CachedModel asks for. ``sources`` empty means the agent's configured order."""

    name: str
    repo: str
    revision: str = "main"
    files: FileFilter = field(default_factory=FileFilter)
    sources: tuple[str, ...] = ()
    priority: int = 100
    node_selector: Mapping[str, Any] = field(default_factory=dict)
    pvc_subpath: str | None = None  # the model's folder under a pvc source's root (else <root>/org/name)

    @property
    def key(self) -> str:
        return self.name


def parse_model_spec(obj: Mapping[str, Any], *, where: str = "") -> ModelSpec:
    """Parse a CachedModel object ({metadata, spec}) or a bare spec with a ``name``.

    The spec is checked against the CRD's schema first (types, unknown keys, limits), then against
    the CRD's CEL rules and the agent's own rules. ``where`` prefixes field names (e.g.
    "models.yaml: model 'tiny': ") so errors point at the exact entry.
    """
    if not isinstance(obj, Mapping):
        raise SpecError(where.rstrip(": .") or "spec", "must be a mapping")
    if "spec" in obj or "metadata" in obj or "kind" in obj or "apiVersion" in obj:
        _check_object_header(obj, where)
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
            raise SpecError(f"{where}metadata", "metadata and spec must be mappings")
        name = meta.get("name")
        name_field, p = f"{where}metadata.name", f"{where}spec."
    else:
        name = obj.get("name")
        spec = {k: v for k, v in obj.items() if k != "name"}
        name_field, p = f"{where}name", where
    if not isinstance(name, str) or not name:
        raise SpecError(name_field, "is required")
    validate_model_name(name, name_field)
    # the dedicated validators first: their messages say more than "does not match <pattern>"
    if isinstance(spec.get("repo"), str):
        validate_repo_id(spec["repo"], f"{p}repo")
    if isinstance(spec.get("revision"), str):
        validate_revision(spec["revision"], f"{p}revision")
    if isinstance(spec.get("pvcSubpath"), str):
        validate_subpath(spec["pvcSubpath"], f"{p}pvcSubpath")
    problems = check(SPEC_SCHEMA, spec)
    if problems:
        (first_field, first), *rest = problems
        more = "".join(f"; {p[len(where):]}{f}: {m}" for f, m in rest)
        raise SpecError(f"{p}{first_field}", first + more)
    repo = validate_repo_id(spec["repo"], f"{p}repo")
    revision = validate_revision(spec.get("revision") or "main", f"{p}revision")
    files = spec.get("files") or {}
    flt = FileFilter(_glob_list(files.get("allow"), f"{p}files.allow"),
                     _glob_list(files.get("ignore"), f"{p}files.ignore"))
    sources = tuple(spec.get("sources") or ())
    priority = spec.get("priority")
    selector_value = dict(spec.get("nodeSelector") or {})
    selector.validate(selector_value, f"{p}nodeSelector")
    subpath = spec.get("pvcSubpath")
    return ModelSpec(name, repo, revision, flt, sources, 100 if priority is None else priority, selector_value,
                     subpath or None)


def _check_object_header(obj: Mapping[str, Any], where: str) -> None:
    """A CachedModel object: only the keys ``kubectl get -o yaml`` writes, and the right kind."""
    for key in obj:
        if key not in OBJECT_KEYS:
            raise SpecError(f"{where}{key}", unknown_key(str(key), OBJECT_KEYS))
    kind = obj.get("kind")
    if kind is not None and kind != KIND:
        raise SpecError(f"{where}kind", f"{kind!r} is not {KIND}")
    api_version = obj.get("apiVersion")
    if api_version is not None and (not isinstance(api_version, str) or not api_version.startswith(API_GROUP + "/")):
        raise SpecError(f"{where}apiVersion", f"{api_version!r} is not in the {API_GROUP} API group")
