"""What a fill will do, as plain data: the pinned commit and every file with its expected digest.

Sources produce a ``ModelPlan``; the store executes it. Keeping the plan pure means the rules
(which files are LFS, which digests we trust, what is already on disk) are testable without I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

HashAlgo = Literal["sha256", "git-sha1"]
VerificationLevel = Literal["verified", "computed"]

# Files the Hub would store with LFS even when small; mirrors the default .gitattributes of Hub repos.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
    ".model", ".pkl", ".tflite", ".ot", ".arrow", ".parquet", ".zip", ".tar", ".gz", ".zst",
)
LFS_MIN_SIZE = 10 * 1024 * 1024


def is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


def algo_for_blob_name(name: str) -> HashAlgo | None:
    """A Hub blob name is a sha256 (LFS, 64 hex) or a git blob sha1 (40 hex); anything else is unknown."""
    if is_hex(name, 64):
        return "sha256"
    if is_hex(name, 40):
        return "git-sha1"
    return None


def guess_algo(path: str, size: int) -> HashAlgo:
    """The documented rule when no source tells us: weights and files over 10 MiB are LFS (sha256)."""
    if size > LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES):
        return "sha256"
    return "git-sha1"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot. ``digest`` is the expected hex digest in ``algo``, or None if unknown.

    ``digest`` is also the blob name (Hub etag) once known: sha256 for LFS files, git sha1 otherwise.
    """

    path: str
    size: int
    algo: HashAlgo
    digest: str | None = None

    @property
    def trusted(self) -> bool:
        return self.digest is not None

    def with_digest(self, digest: str) -> FileEntry:
        return replace(self, digest=digest)


@dataclass(frozen=True)
class ModelPlan:
    """A fill pinned to one commit. ``ref`` is the branch/tag to point at it (None for a commit)."""

    repo: str
    commit: str
    files: tuple[FileEntry, ...]
    ref: str | None = None
    source: str = ""
    extras: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def level(self) -> VerificationLevel:
        return "verified" if all(f.trusted for f in self.files) else "computed"

    def entry(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


def file_folder_conflict(paths: Iterable[str]) -> tuple[str, str] | None:
    """(file, a path under it) when one listed path is also a folder of another: ``conf`` and ``conf/x.json``.

    No filesystem can hold both, so such a listing can never become a snapshot; sources refuse it
    when they plan, before a byte is written.
    """
    files = set(paths)
    for p in sorted(files):
        parts = p.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                return prefix, p
    return None
