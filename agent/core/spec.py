"""Model specs, label names and revision rules: pure data and validation, no I/O.

A spec arrives from a CachedModel CR, a models file or the ``fill`` command line. Every error
names the field so a user can fix the exact line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import SpecError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# org/name as the Hub accepts it: letters, digits, '-', '_', '.'; no '--' or '..' (they break the cache folder name)
REPO_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# A DNS-1123 label: what a CachedModel name must be so it can also be a label name.
LABEL_NAME_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_PREFIX_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
SOURCE_TYPES = ("modelexpress", "pvc", "hub", "peers")
# a pvcSubpath part: letters, digits, '_', '-', '.', never '.' or '..' (same pattern as manifests/crd.yaml)
SUBPATH_PART_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.[A-Za-z0-9_-][A-Za-z0-9_.-]*|\.\.[A-Za-z0-9_.-]+")
BAD_REF_CHARS = set(" ~^:?*[\\\x7f")


def is_commit(revision: str) -> bool:
    """True for a full 40-hex commit id (the only revision form that needs no resolution)."""
    return bool(COMMIT_RE.match(revision))


def validate_repo_id(repo: str, field_name: str = "repo") -> str:
    parts = repo.split("/")
    if len(parts) != 2:
        raise SpecError(field_name, f"{repo!r} must be 'org/name'")
    for part in parts:
        if not REPO_PART_RE.match(part) or "--" in part or ".." in part:
            raise SpecError(field_name, f"{repo!r}: {part!r} is not a valid Hub name part")
    return repo


def validate_revision(revision: str, field_name: str = "revision") -> str:
    """Accept a 40-hex commit or a git branch/tag name (git check-ref-format rules that matter here)."""
    if not revision:
        raise SpecError(field_name, "must not be empty")
    if is_commit(revision):
        return revision
    if (
        len(revision) > 255
        or revision.startswith(("/", "-", "."))
        or revision.endswith(("/", ".", ".lock"))
        or ".." in revision
        or "//" in revision
        or "@{" in revision
        or any(c in BAD_REF_CHARS or ord(c) < 32 for c in revision)
    ):
        raise SpecError(field_name, f"{revision!r} is not a valid branch, tag or 40-hex commit")
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        raise SpecError(field_name, f"{revision!r} is not a valid branch, tag or 40-hex commit")
    return revision


def validate_subpath(value: str, field_name: str = "pvcSubpath") -> str:
    """The model's folder under a PVC root, 'org/name' style: relative, no '.' or '..', at most 1024 chars."""
    if not value or len(value) > 1024 or not all(SUBPATH_PART_RE.fullmatch(p) for p in value.split("/")):
        raise SpecError(field_name, f"{value!r} must be a relative folder path like 'org/name' "
                        "(letters, digits, '_', '-', '.'; no '..', no leading or trailing '/')")
    return value


def validate_model_name(name: str, field_name: str = "metadata.name") -> str:
    if not LABEL_NAME_RE.match(name):
        raise SpecError(
            field_name,
            f"{name!r} must be a DNS-1123 label (lowercase letters, digits, '-', at most 63 chars) "
            "because it becomes the node label name",
        )
    return name


def name_from_repo(repo: str) -> str:
    """Derive a CachedModel-style name from a repo id: 'Qwen/Qwen3-0.6B' -> 'qwen3-0-6b'."""
    base = re.sub(r"[^a-z0-9]+", "-", repo.split("/")[-1].lower()).strip("-") or "model"
    if len(base) > 63:
        digest = hashlib.sha256(repo.encode()).hexdigest()[:8]
        base = base[:54].rstrip("-") + "-" + digest
    return base


def label_key(prefix: str, name: str) -> str:
    """The node label key for a model: '<prefix>/<name>'."""
    return f"{prefix}/{name}"


def _glob_list(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(field_name, "must be a list of non-empty glob strings")
    for pattern in value:
        if "\x00" in pattern or pattern.startswith("/"):
            raise SpecError(field_name, f"{pattern!r} is not a relative glob")
    return tuple(value)


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

    ``where`` prefixes field names (e.g. 'models.yaml[2].') so errors point at the exact entry.
    """
    if not isinstance(obj, Mapping):
        raise SpecError(where or "spec", "must be a mapping")
    if "spec" in obj or "metadata" in obj:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
            raise SpecError(f"{where}metadata", "metadata and spec must be mappings")
        name = meta.get("name")
        name_field, p = f"{where}metadata.name", f"{where}spec."
    else:
        spec, name = obj, obj.get("name")
        name_field, p = f"{where}name", where
    if not isinstance(name, str) or not name:
        raise SpecError(name_field, "is required")
    validate_model_name(name, name_field)
    repo = spec.get("repo")
    if not isinstance(repo, str):
        raise SpecError(f"{p}repo", "is required and must be 'org/name'")
    validate_repo_id(repo, f"{p}repo")
    revision = spec.get("revision", "main")
    if not isinstance(revision, str):
        raise SpecError(f"{p}revision", "must be a string")
    validate_revision(revision, f"{p}revision")
    files = spec.get("files") or {}
    if not isinstance(files, Mapping):
        raise SpecError(f"{p}files", "must be a mapping with allow/ignore lists")
    unknown = set(files) - {"allow", "ignore"}
    if unknown:
        raise SpecError(f"{p}files", f"unknown keys {sorted(unknown)}")
    flt = FileFilter(
        _glob_list(files.get("allow"), f"{p}files.allow"), _glob_list(files.get("ignore"), f"{p}files.ignore")
    )
    sources = spec.get("sources") or []
    if not isinstance(sources, list) or any(s not in SOURCE_TYPES for s in sources):
        raise SpecError(f"{p}sources", f"must be a list drawn from {list(SOURCE_TYPES)}, got {sources!r}")
    priority = spec.get("priority", 100)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise SpecError(f"{p}priority", "must be an integer")
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping):
        raise SpecError(f"{p}nodeSelector", "must be a label selector mapping")
    subpath = spec.get("pvcSubpath")
    if subpath is not None and not isinstance(subpath, str):
        raise SpecError(f"{p}pvcSubpath", "must be a string")
    if subpath is not None:
        validate_subpath(subpath, f"{p}pvcSubpath")
    return ModelSpec(name, repo, revision, flt, tuple(sources), priority, dict(selector), subpath)
