"""Verified manifests: what the agent knows to be true about one snapshot.

One JSON file per (repo, commit) in ``.agent/manifests``. It records, per file, the size, the Hub
digest (which is also the blob name), xxh3-128, and the blob's mtime and inode at publish time, so a
restarted agent can trust a snapshot after a stat (no hashing) and a scrub can re-read with xxh3.

A publish writes ``<commit>.json.pending`` first, swaps the snapshot tree in, then renames the
pending file over ``<commit>.json``; a crash in between leaves a pending file that the next start
rolls forward (the tree is there) or drops (it is not), so a manifest never names files that were
never published.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.core.plan import HashAlgo, VerificationLevel
from agent.errors import CorruptStateError

MANIFEST_VERSION = 1
T = TypeVar("T")


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


def manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), separators=(",", ":"), sort_keys=True).encode()


def load_state(path: Path, parse: Callable[[Any], T], what: str) -> T | None:
    """One of the agent's own JSON state files; None if absent. Raises ``CorruptStateError`` naming the
    file when it exists but cannot be read or parsed: that is damage to report, not an empty cache."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptStateError(str(path), f"unreadable ({e.strerror})") from e
    try:
        return parse(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptStateError(str(path), f"not a valid {what} ({type(e).__name__}: {e})") from e


def load_manifest(path: Path) -> Manifest | None:
    return load_state(path, Manifest.from_json, "manifest")
