"""Verified manifests: what the agent knows to be true about one snapshot.

One JSON file per (repo, commit) in ``.agent/manifests``. It records, per file, the size, the Hub
digest (which is also the blob name), xxh3-128, and the blob's mtime and inode at publish time, so a
restarted agent can trust a snapshot after a stat (no hashing) and a scrub can re-read with xxh3.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.plan import HashAlgo, VerificationLevel

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    algo: HashAlgo
    digest: str  # the blob name
    xxh3: str
    mtime_ns: int
    inode: int
    verified: bool  # digest came from a trusted source and matched (else: computed by us)


@dataclass
class Manifest:
    repo: str
    commit: str
    files: list[ManifestFile]
    refs: list[str] = field(default_factory=list)
    source: str = ""
    verified_at: float = 0.0

    @property
    def level(self) -> VerificationLevel:
        return "verified" if all(f.verified for f in self.files) else "computed"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def by_path(self) -> dict[str, ManifestFile]:
        return {f.path: f for f in self.files}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = MANIFEST_VERSION
        d["level"] = self.level
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {d.get('version')!r}")
        files = [ManifestFile(**f) for f in d["files"]]
        return cls(d["repo"], d["commit"], files, list(d.get("refs", [])), d.get("source", ""),
                   float(d.get("verified_at", 0.0)))


def write_json_atomic(path: Path, data: Any, *, fsync: bool = True) -> None:
    """Write JSON next to ``path`` under a unique name, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"), sort_keys=True)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_manifest(path: Path) -> Manifest | None:
    """Return the manifest, or None if missing or unreadable (an unreadable one is treated as absent)."""
    try:
        with open(path) as f:
            return Manifest.from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None
