"""What one scan found on disk, as frozen values the pure plan reads (no I/O here).

The loop's promise is "ready means the whole desired file set, verified". So the file set a model
was filled with is itself persisted (``ModelRecord``, one per model name in ``.agent/models``), and
readiness is: a record that satisfies the current spec, and every file of that record verified on
disk now. A spec changed while the agent was down, a sibling model's refill of the same commit, or
a file deleted by hand all show up here as a mismatch or a problem, never as "ready".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.plan import FileEntry
from agent.core.spec import FileFilter, ModelSpec, is_commit


def listing_digest(entries: Iterable[FileEntry]) -> str:
    """A stable id of a resolved file list (path, size, digest): what the record was planned from."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.size}\0{e.digest or ''}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelRecord:
    """The file set one model was filled with, and for which spec (repo, revision, file filter)."""

    name: str
    repo: str
    revision: str  # as the spec gave it: branch, tag or 40-hex commit
    commit: str
    files: FileFilter
    paths: tuple[str, ...]  # sorted: every file "ready" promises
    listing: str  # listing_digest of the plan it was filled from
    source: str = ""
    filled_at: float = 0.0
    pvc_subpath: str | None = None  # the folder a plain/local-dir PVC model was read from (part of its identity)

    def mismatch(self, spec: ModelSpec, pin: str | None) -> str | None:
        """None when this record is what ``spec`` asks for now; else a short reason (the spec changed)."""
        if self.repo != spec.repo:
            return f"repo changed ({self.repo} -> {spec.repo})"
        if self.files != spec.files:
            return "file filter changed since the last fill"
        if self.pvc_subpath != spec.pvc_subpath:
            return f"pvcSubpath changed ({self.pvc_subpath} -> {spec.pvc_subpath})"
        if is_commit(spec.revision):
            return None if self.commit == spec.revision else f"revision changed to {spec.revision[:12]}"
        if self.revision != spec.revision:
            return f"revision changed ({self.revision} -> {spec.revision})"
        if pin is not None and pin != self.commit:
            return f"{spec.revision} is pinned to {pin[:12]}, filled at {self.commit[:12]}"
        return None

    def same_commit(self, spec: ModelSpec, pin: str | None) -> bool:
        """Does ``spec`` still want this record's commit (a refill, e.g. for a widened filter, reuses it)?"""
        if self.repo != spec.repo or self.pvc_subpath != spec.pvc_subpath:
            return False
        if is_commit(spec.revision):
            return self.commit == spec.revision
        return self.revision == spec.revision and (pin is None or pin == self.commit)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "name": self.name, "repo": self.repo, "revision": self.revision,
                "commit": self.commit, "files": self.files.to_dict(), "paths": list(self.paths),
                "listing": self.listing, "source": self.source, "filled_at": self.filled_at,
                "pvc_subpath": self.pvc_subpath}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelRecord:
        if d.get("version") != 1:
            raise ValueError(f"unsupported record version {d.get('version')!r}")
        files = d["files"]
        paths = d["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of strings")
        return cls(str(d["name"]), str(d["repo"]), str(d["revision"]), str(d["commit"]),
                   FileFilter(tuple(files.get("allow") or ()), tuple(files.get("ignore") or ())),
                   tuple(paths), str(d["listing"]), str(d.get("source", "")), float(d.get("filled_at", 0.0)),
                   d.get("pvc_subpath") or None)


@dataclass(frozen=True)
class ModelDisk:
    """One desired model as a scan found it. ``problems`` empty and a record present: all files verified."""

    name: str
    record: ModelRecord | None
    problems: tuple[str, ...] = ()
    damaged_blobs: tuple[str, ...] = ()  # blobs whose content failed a hash or size check: quarantine them
    level: str = ""
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.record is not None and not self.problems


@dataclass(frozen=True)
class SnapshotOnDisk:
    """One (repo, commit) the cache holds: what eviction may remove and what it would free."""

    repo: str
    commit: str
    blobs: frozenset[tuple[str, int]]  # (digest, size)
    verified_at: float

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.blobs)


@dataclass(frozen=True)
class DiskUse:
    """What the watermarks compare: bytes used (incl. reservations of fills in flight) of a capacity."""

    used: int = 0
    capacity: int = 0  # the budget when one is set, else the cache filesystem's size (0: unknown)


@dataclass(frozen=True)
class NodeSnapshot:
    """Everything one pass of the loop decides from. Immutable: the plan cannot change the world."""

    models: Mapping[str, ModelDisk] = field(default_factory=dict)
    snapshots: tuple[SnapshotOnDisk, ...] = ()
    taken_at: float = 0.0
    records: Mapping[str, ModelRecord] = field(default_factory=dict)  # every model record, desired or not
    disk: DiskUse = field(default_factory=DiskUse)
