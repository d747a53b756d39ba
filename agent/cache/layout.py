"""Path math for the cache root (pure: no file is touched here).

    <root>/                           default /var/lib/model-cache
      hub/                            byte-exact Hugging Face hub cache, mounted read-only by workers
        models--org--name/
          blobs/<etag>                sha256 (LFS) or git blob sha1, the file content
          snapshots/<commit>/<path>   relative symlink -> ../../blobs/<etag> (deeper for nested paths)
          refs/<revision>             the commit a branch or tag points at
          trees/<commit>.json         file listing as huggingface_hub 2.x writes it (hub source)
      .agent/                         ours, same filesystem so renames are atomic
        staging/<repo-folder>/<id>/   files and snapshot trees being built
        manifests/<repo-folder>/<commit>.json           verified files of one snapshot (union of its fills)
        manifests/<repo-folder>/<commit>.json.pending   written before the tree swap, renamed after it
        models/<name>.json            the file set each model was filled with (what "ready" means)
        locks/<repo-folder>.lock
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UnsafePathError


def repo_folder_name(repo: str, repo_type: str = "model") -> str:
    """'org/name' -> 'models--org--name', as huggingface_hub names cache folders."""
    return f"{repo_type}s--" + repo.replace("/", "--")


def repo_from_folder_name(folder: str) -> str | None:
    prefix = "models--"
    if not folder.startswith(prefix):
        return None
    parts = folder[len(prefix):].split("--")
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def safe_relpath(path: str) -> str:
    """Validate a repo-relative path from a source before anything is written with it.

    Rejects absolute paths, '..', '.', empty components, NUL, backslashes and control characters,
    so a hostile source can never name a file outside the snapshot folder.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"unsafe path {path!r}: empty")
    if "\x00" in path or "\\" in path or any(ord(c) < 32 for c in path):
        raise UnsafePathError(f"unsafe path {path!r}: NUL, backslash or control character")
    if path.startswith("/"):
        raise UnsafePathError(f"unsafe path {path!r}: absolute")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"unsafe path {path!r}: empty, '.' or '..' component")
    if len(path.encode()) > 4096 or any(len(p.encode()) > 255 for p in parts):
        raise UnsafePathError(f"unsafe path {path!r}: too long")
    return path


def blob_link_target(relpath: str, etag: str) -> str:
    """The relative symlink target for snapshots/<commit>/<relpath>, as huggingface_hub writes it."""
    depth = relpath.count("/")
    return posixpath.join(*([".."] * (depth + 2)), "blobs", etag)


@dataclass(frozen=True)
class CacheLayout:
    """Every path the agent reads or writes under one root."""

    root: Path

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def agent_dir(self) -> Path:
        return self.root / ".agent"

    @property
    def staging_root(self) -> Path:
        return self.agent_dir / "staging"

    @property
    def manifests_root(self) -> Path:
        return self.agent_dir / "manifests"

    @property
    def locks_root(self) -> Path:
        return self.agent_dir / "locks"

    @property
    def records_root(self) -> Path:
        return self.agent_dir / "models"

    def record_path(self, name: str) -> Path:
        return self.records_root / f"{name}.json"

    def repo_dir(self, repo: str) -> Path:
        return self.hub / repo_folder_name(repo)

    def blobs_dir(self, repo: str) -> Path:
        return self.repo_dir(repo) / "blobs"

    def blob_path(self, repo: str, etag: str) -> Path:
        return self.blobs_dir(repo) / etag

    def snapshots_dir(self, repo: str) -> Path:
        return self.repo_dir(repo) / "snapshots"

    def snapshot_dir(self, repo: str, commit: str) -> Path:
        return self.snapshots_dir(repo) / commit

    def snapshot_file(self, repo: str, commit: str, relpath: str) -> Path:
        return self.snapshot_dir(repo, commit) / safe_relpath(relpath)

    def refs_dir(self, repo: str) -> Path:
        return self.repo_dir(repo) / "refs"

    def ref_path(self, repo: str, ref: str) -> Path:
        return self.refs_dir(repo) / safe_relpath(ref)

    def trees_path(self, repo: str, commit: str) -> Path:
        return self.repo_dir(repo) / "trees" / f"{commit}.json"

    def staging_dir(self, repo: str) -> Path:
        return self.staging_root / repo_folder_name(repo)

    def manifest_dir(self, repo: str) -> Path:
        return self.manifests_root / repo_folder_name(repo)

    def manifest_path(self, repo: str, commit: str) -> Path:
        return self.manifest_dir(repo) / f"{commit}.json"

    def pending_manifest_path(self, repo: str, commit: str) -> Path:
        return self.manifest_dir(repo) / f"{commit}.json.pending"

    def lock_path(self, repo: str) -> Path:
        return self.locks_root / f"{repo_folder_name(repo)}.lock"
