"""The read side of the cache: manifests, model records, refs, and checking files against them.

Nothing here writes. Checks are values (``VerifyReport``): every problem names its file, and a
state file that cannot be parsed is reported (``CorruptStateError``), never taken for "absent".
Costs are per model: a check reads one manifest and stats the files it is asked about.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache.hashing import hash_file
from agent.cache.layout import CacheLayout, blob_link_target, repo_from_folder_name
from agent.cache.manifest import Manifest, load_manifest, load_state
from agent.cache.space import tree_bytes
from agent.core.snapshot import ModelRecord
from agent.errors import CorruptStateError

CONTENT_PROBLEMS = ("xxh3 ", "sha256 ", "git-sha1 ", "size ")  # a mismatch reason that condemns the blob


@dataclass
class VerifyReport:
    """Verification as a value: every problem found, each naming the file."""

    repo: str
    commit: str
    missing: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    bad_refs: list[tuple[str, str]] = field(default_factory=list)
    bad_blobs: list[str] = field(default_factory=list)  # blob names whose content (size or hash) is wrong
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatches or self.extra or self.bad_refs)

    @property
    def damaged_paths(self) -> list[str]:
        return sorted({*self.missing, *(p for p, _ in self.mismatches)})

    def problems(self) -> list[str]:
        out = [f"missing: {p}" for p in self.missing]
        out += [f"mismatch: {p}: {why}" for p, why in self.mismatches]
        out += [f"extra: {p}" for p in self.extra]
        out += [f"ref {r}: {why}" for r, why in self.bad_refs]
        return out


def _unknown_files(top: str, prefix: str, known: Collection[str]) -> Iterator[str]:
    """Relative paths under ``top`` that are not in ``known``, as ``os.walk`` would list files.

    It only stats an entry when the answer depends on it: every snapshot entry is a symlink, and
    ``os.walk`` would stat each one to learn whether it points at a directory.
    """
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:
        return
    subdirs = []
    for e in entries:
        rel = prefix + e.name
        if rel in known and e.is_symlink():
            continue  # a manifest file (its target is checked separately)
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            if rel not in known:
                yield rel
        elif not e.is_symlink():
            subdirs.append(e)
    for e in subdirs:
        yield from _unknown_files(e.path, prefix + e.name + "/", known)


class CacheReader:
    """Read-only access to one cache root (the store adds the writing side)."""

    def __init__(self, root: Path | str) -> None:
        self.layout = CacheLayout(Path(root))

    # -- manifests and records ---------------------------------------------------------------------

    def manifest(self, repo: str, commit: str) -> Manifest | None:
        """None when there is none; raises ``CorruptStateError`` when it cannot be parsed."""
        return load_manifest(self.layout.manifest_path(repo, commit))

    def manifest_repos(self) -> list[str]:
        root = self.layout.manifests_root
        try:
            names = sorted(os.listdir(root))
        except FileNotFoundError:
            return []
        return [r for n in names if (r := repo_from_folder_name(n)) is not None]

    def manifests(self, repo: str | None = None, *, errors: list[CorruptStateError] | None = None) -> list[Manifest]:
        """Every readable manifest (of one repo, or all); corrupt ones go to ``errors`` if given."""
        out: list[Manifest] = []
        for r in [repo] if repo is not None else self.manifest_repos():
            d = self.layout.manifest_dir(r)
            try:
                names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for n in names:
                try:
                    m = load_manifest(d / n)
                except CorruptStateError as e:
                    if errors is not None:
                        errors.append(e)
                    continue
                if m is not None:
                    out.append(m)
        return out

    def record(self, name: str) -> ModelRecord | None:
        """The file set model ``name`` was filled with; None if never; ``CorruptStateError`` if unparsable."""
        return load_state(self.layout.record_path(name), ModelRecord.from_json, "model record")

    def records(self) -> list[ModelRecord]:
        out = []
        try:
            names = sorted(os.listdir(self.layout.records_root))
        except FileNotFoundError:
            return out
        for n in names:
            if n.endswith(".json"):
                try:
                    rec = self.record(n[: -len(".json")])
                except CorruptStateError:
                    continue
                if rec is not None:
                    out.append(rec)
        return out

    def read_ref(self, repo: str, ref: str) -> str | None:
        try:
            return self.layout.ref_path(repo, ref).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- checks ------------------------------------------------------------------------------------

    def check(
        self,
        manifest: Manifest,
        *,
        paths: Iterable[str] | None = None,
        deep: bool = False,
        full: bool = False,
        on_bytes: Callable[[int], None] | None = None,
        deep_blobs: Collection[str] = (),
        extra: bool = True,
    ) -> VerifyReport:
        """Check a snapshot (or just ``paths`` of it) against its manifest.

        Fast (default): symlink targets, blob size, mtime and inode; no file content is read.
        ``deep``: also re-read every blob with xxh3-128. ``full``: recompute the Hub digest too.
        ``deep_blobs``: re-read just these blobs with xxh3 (the watcher saw them change).
        ``extra``: also report files in the snapshot tree that no manifest entry accounts for.

        Paths are joined as strings, not ``Path`` objects: on a restart this runs for every file of
        every model before the first label, and pathlib parsing was most of its CPU (manifest paths
        passed ``safe_relpath`` at fill time, so plain joining gives the same path).
        """
        lay = self.layout
        rep = VerifyReport(manifest.repo, manifest.commit)
        snap = str(lay.snapshot_dir(manifest.repo, manifest.commit))
        blobs = str(lay.blobs_dir(manifest.repo)) + "/"
        by = manifest.by_path()
        wanted = manifest.files if paths is None else []
        if paths is not None:
            for p in paths:
                f = by.get(p)
                if f is None:
                    rep.missing.append(p)  # required by the model, never verified for this snapshot
                else:
                    wanted.append(f)
        for f in wanted:
            link = snap + "/" + f.path
            try:
                target = os.readlink(link)
            except FileNotFoundError:
                rep.missing.append(f.path)
                continue
            except OSError:
                rep.mismatches.append((f.path, "snapshot entry is not a symlink"))
                continue
            if target != blob_link_target(f.path, f.digest):
                rep.mismatches.append((f.path, f"symlink points to {target}"))
                continue
            blob = blobs + f.digest
            try:
                st = os.stat(blob)
            except FileNotFoundError:
                rep.missing.append(f.path)
                continue
            if st.st_size != f.size:
                rep.mismatches.append((f.path, f"size {st.st_size}, expected {f.size}"))
                rep.bad_blobs.append(f.digest)
                continue
            if not (deep or full) and (st.st_mtime_ns != f.mtime_ns or st.st_ino != f.inode):
                rep.mismatches.append((f.path, "blob changed since verified (mtime/inode)"))
                continue
            if deep or full or f.digest in deep_blobs:
                d = hash_file(Path(blob), f.algo, hub_digest=full, size=f.size, on_bytes=on_bytes)
                rep.bytes_read += d.size
                if d.xxh3 != f.xxh3:
                    rep.mismatches.append((f.path, f"xxh3 {d.xxh3}, expected {f.xxh3}"))
                    rep.bad_blobs.append(f.digest)
                elif full and d.digest != f.digest:
                    rep.mismatches.append((f.path, f"{f.algo} {d.digest}, expected {f.digest}"))
                    rep.bad_blobs.append(f.digest)
        if extra:
            rep.extra.extend(_unknown_files(snap, "", by))
        for ref in manifest.refs:
            got = self.read_ref(manifest.repo, ref)
            if got is not None and got != manifest.commit:
                rep.bad_refs.append((ref, f"points to {got}, expected {manifest.commit}"))
        return rep

    def staged_bytes(self, repo: str) -> int:
        """Bytes a fill of ``repo`` left in staging (partial and verified files awaiting a resume)."""
        return tree_bytes(self.layout.staging_dir(repo))
