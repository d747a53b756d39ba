"""One fill in progress: staged files, verification, and the crash-safe publish.

    .agent/staging/<repo-folder>/<commit>/
      files/<id>.part     resumable partial file per (commit, path)
      blobs/<digest>      verified, fsynced, waiting for publish (never visible to workers)
      done.jsonl          one line per verified staged file: lets a resumed fill skip re-hashing it

Publish order: blobs into hub/ -> ``<commit>.json.pending`` -> the snapshot tree (built in staging,
swapped in whole) -> rename pending over ``<commit>.json`` -> trees/<commit>.json -> refs. A kill at
any instant leaves the old state or the new one; the next sweep rolls a pending manifest forward
(its tree is in place) or drops it (it is not).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.cache.fsutil import (
    FILE_MODE,
    disk_full_as_error,
    fsync_dir,
    make_dirs,
    replace_dir,
    rmtree_quiet,
    write_atomic,
)
from agent.cache.hashing import Digests, DigestWriter, hash_file
from agent.cache.layout import blob_link_target, safe_relpath
from agent.cache.manifest import Manifest, ManifestFile, manifest_bytes
from agent.core.plan import FileEntry, ModelPlan
from agent.errors import Cancelled, CorruptStateError, IntegrityError

if TYPE_CHECKING:
    from agent.cache.store import Store

log = structlog.get_logger("agent.cache.staging")


class Fill:
    """Resumable partial files in staging, verified blobs, then publish. Safe to call from several threads.

    Sources call ``open`` (stream bytes through a DigestWriter) or ``adopt`` (a file an external
    downloader wrote at ``part_path``), then ``complete``; they call ``check_stop`` between chunks.
    ``on_complete`` hooks see each verified staged blob at once (the peers source shares it while the
    rest of the model is still arriving), ``on_published`` the manifest once those blobs moved into hub/;
    a failing hook is logged and never fails the fill.
    """

    def __init__(self, store: Store, plan: ModelPlan, *, stop: threading.Event | None = None) -> None:
        self.store = store
        self.plan = plan
        self.stop = stop or threading.Event()
        self.dir = store.layout.staging_dir(plan.repo) / plan.commit
        self.files_dir = self.dir / "files"
        with disk_full_as_error(f"creating {self.files_dir}"):
            make_dirs(self.files_dir)
        self._done: dict[str, ManifestFile] = {}
        self._staged_done = self._load_done_list()
        self._mu = threading.Lock()
        self.on_complete: list[Callable[[FileEntry, ManifestFile, Path], None]] = []
        self.on_published: list[Callable[[Manifest], None]] = []  # staged blobs have moved into hub/
        self.on_dropped: list[Callable[[], None]] = []  # staging is about to be deleted (abort without partials)
        self.bytes_from: dict[str, int] = {}  # verified bytes by where they came from, when not the fill's source

    def fetched_from(self, kind: str, nbytes: int) -> None:
        """Count bytes of this fill that another source delivered (a slot holder's stripes from peers)."""
        with self._mu:
            self.bytes_from[kind] = self.bytes_from.get(kind, 0) + nbytes

    def check_stop(self) -> None:
        """Raise ``Cancelled`` once the fill was asked to stop; sources call it between chunks."""
        if self.stop.is_set():
            raise Cancelled(f"{self.plan.repo}@{self.plan.commit[:12]}: fill stopped; staged bytes kept")

    # -- which files need bytes ----------------------------------------------------------------------

    def done_paths(self) -> set[str]:
        with self._mu:
            return set(self._done)

    def needed(self) -> list[FileEntry]:
        """Entries without a usable verified blob already on disk (revisions and re-fills share blobs)."""
        reusable: dict[str, ManifestFile] = {}
        for m in self.store.manifests(self.plan.repo):
            for f in m.files:
                reusable.setdefault(f.digest, f)
        this_commit = self._this_commit()
        out: list[FileEntry] = []
        for e in self.plan.files:
            mf = self._reuse(e, reusable, this_commit)
            if mf is not None:
                self._done[e.path] = mf
            else:
                out.append(e)
        return out

    def needed_bytes(self, entries: list[FileEntry]) -> int:
        """Bytes still to write for ``entries`` (a partial file left by an earlier attempt counts as written)."""
        return sum(max(0, e.size - self._staged_size(e)) for e in entries)

    def _this_commit(self) -> Manifest | None:
        try:
            return self.store.manifest(self.plan.repo, self.plan.commit)
        except CorruptStateError:
            return None  # re-verified from content below; the publish replaces the broken file

    def _reuse(self, e: FileEntry, reusable: dict[str, ManifestFile], this_commit: Manifest | None
               ) -> ManifestFile | None:
        lay = self.store.layout
        if e.digest is None:
            # Unknown digest: only this node's own record of this very commit (or of this staging) vouches.
            old = this_commit.by_path().get(e.path) if this_commit else None
            if old is None:
                old = self._staged_done.get(e.path)
            if old is None or old.size != e.size:
                return None
            e = e.with_digest(old.digest)
        assert e.digest is not None
        blob = lay.blob_path(self.plan.repo, e.digest)
        for candidate in (blob, self.staged_blob(e.digest)):
            try:
                st = os.stat(candidate)
            except FileNotFoundError:
                continue
            if st.st_size != e.size:
                continue
            known = reusable.get(e.digest) if candidate == blob else self._staged_done.get(e.path)
            if known and known.digest == e.digest and known.size == e.size and known.mtime_ns == st.st_mtime_ns \
                    and known.inode == st.st_ino:
                return ManifestFile(e.path, e.size, e.algo, e.digest, known.xxh3, st.st_mtime_ns, st.st_ino,
                                    known.verified and self._trusted(e))
            d = hash_file(candidate, e.algo, size=e.size)  # no record of this blob: trust only its content
            if d.digest != e.digest:
                continue
            return ManifestFile(e.path, e.size, e.algo, e.digest, d.xxh3, st.st_mtime_ns, st.st_ino,
                                self._trusted(e))
        return None

    def _trusted(self, e: FileEntry) -> bool:
        return self.plan.entry(e.path).trusted

    # -- writing one file ----------------------------------------------------------------------------

    def part_path(self, entry: FileEntry) -> Path:
        """Stable per (commit, path), so a later process can resume the same partial file."""
        safe_relpath(entry.path)
        return self.files_dir / (hashlib.sha256(entry.path.encode()).hexdigest()[:32] + ".part")

    def staged_blob(self, digest: str) -> Path:
        """A verified file waiting for publish (kept across restarts, never visible to workers)."""
        return self.dir / "blobs" / digest

    def _staged_size(self, entry: FileEntry) -> int:
        try:
            return self.part_path(entry).stat().st_size
        except FileNotFoundError:
            return 0

    def open(self, entry: FileEntry, *, resume: bool = False) -> DigestWriter:
        """A writer for ``entry``; with ``resume`` it appends to (and first re-hashes) any partial file."""
        part = self.part_path(entry)
        with disk_full_as_error(f"creating {part}"):
            if resume and part.exists() and part.stat().st_size > entry.size:
                part.unlink()
            return DigestWriter(part, entry.algo, entry.size, append=resume, write_fn=self.store.write_fn,
                                fsync=self.store.fsync)

    def write_bytes(self, entry: FileEntry, data: bytes) -> ManifestFile:
        """A whole small file in one call (an empty file, which no peer shares): write, hash, ``complete``."""
        writer = self.open(entry)
        try:
            writer.write(data)
            digests = writer.finish()
        finally:
            writer.close()
        return self.complete(entry, digests)

    def resume_offset(self, entry: FileEntry) -> int:
        size = self._staged_size(entry)
        return size if size <= entry.size else 0

    def adopt(self, entry: FileEntry) -> ManifestFile:
        """Complete a file written at ``part_path`` by someone else (e.g. hf_transfer): hash, then publish."""
        part = self.part_path(entry)
        d = hash_file(part, entry.algo, size=entry.size)
        if self.store.fsync:
            fd = os.open(part, os.O_RDONLY)
            try:
                with disk_full_as_error(f"syncing {part}"):
                    os.fsync(fd)
            finally:
                os.close(fd)
        return self.complete(entry, d)

    def complete(self, entry: FileEntry, d: Digests) -> ManifestFile:
        """Check size and digest, then move the staged file among the verified blobs. Raises IntegrityError."""
        part = self.part_path(entry)
        try:
            if d.size != entry.size:
                raise IntegrityError(entry.path, f"size {d.size}, expected {entry.size}")
            if entry.digest is not None and d.digest != entry.digest:
                raise IntegrityError(entry.path, f"{entry.algo} {d.digest}, expected {entry.digest}")
        except IntegrityError:
            part.unlink(missing_ok=True)
            raise
        blob = self.staged_blob(d.digest)
        with disk_full_as_error(f"staging {blob}"):
            make_dirs(blob.parent)
            with self._mu:
                if blob.exists():  # same content under two paths: keep the first inode (manifests record it)
                    part.unlink()
                else:
                    os.chmod(part, FILE_MODE)
                    os.replace(part, blob)
                st = os.stat(blob)
        mf = ManifestFile(entry.path, entry.size, entry.algo, d.digest, d.xxh3, st.st_mtime_ns, st.st_ino,
                          entry.trusted)
        with self._mu:
            self._done[entry.path] = mf
            self._append_done(mf)
        for hook in list(self.on_complete):
            try:
                hook(entry, mf, blob)
            except Exception as e:  # sharing early is an optimisation: the fill goes on without it
                log.warning("fill.on_complete_failed", file=entry.path, error=str(e))
        return mf

    def _append_done(self, mf: ManifestFile) -> None:
        """Remember a verified staged file so a resumed fill (after Ctrl-C, a crash) skips re-hashing it."""
        with contextlib.suppress(OSError), open(self.dir / "done.jsonl", "a") as f:
            f.write(json.dumps(asdict(mf), sort_keys=True) + "\n")

    def _load_done_list(self) -> dict[str, ManifestFile]:
        out: dict[str, ManifestFile] = {}
        try:
            with open(self.dir / "done.jsonl") as f:
                for line in f:
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        mf = ManifestFile(**json.loads(line))
                        out[mf.path] = mf
        except OSError:
            pass
        return out

    # -- publishing the snapshot ---------------------------------------------------------------------

    def publish(self) -> Manifest:
        """Blobs, pending manifest, tree (swapped in whole), manifest, trees json, ref. Every file must be done."""
        with disk_full_as_error(f"publishing {self.plan.repo}@{self.plan.commit[:12]}"):
            manifest = self._publish()
        for hook in list(self.on_published):
            try:
                hook(manifest)
            except Exception as e:
                log.warning("fill.on_published_failed", error=str(e))
        return manifest

    def _publish(self) -> Manifest:
        store, lay, plan = self.store, self.store.layout, self.plan
        missing = [e.path for e in plan.files if e.path not in self._done]
        if missing:
            raise IntegrityError(missing[0], f"not filled ({len(missing)} files missing)")
        self._publish_blobs()
        old = self._this_commit()
        files = dict(self._done)
        refs = set(old.refs if old else [])
        if old is not None:  # keep what earlier fills of this commit verified (a sibling model's files)
            damaged = set(store.check(old, extra=False).damaged_paths)
            for f in old.files:
                if f.path not in files and f.path not in damaged:
                    files[f.path] = f
        if plan.ref:
            refs.add(plan.ref)
        manifest = Manifest(plan.repo, plan.commit, sorted(files.values(), key=lambda f: f.path),
                            sorted(refs), plan.source, store.clock())
        pending = lay.pending_manifest_path(plan.repo, plan.commit)
        write_atomic(pending, manifest_bytes(manifest), tmp_dir=lay.staging_dir(plan.repo), fsync=store.fsync)

        tree = lay.staging_dir(plan.repo) / f"tree-{os.getpid()}-{os.urandom(4).hex()}"
        make_dirs(tree)
        for f in manifest.files:
            link = tree / f.path
            make_dirs(link.parent)
            os.symlink(blob_link_target(f.path, f.digest), link)
        if store.fsync:
            for dirpath, _dirs, _files in os.walk(tree):
                fsync_dir(Path(dirpath))
        dest = lay.snapshot_dir(plan.repo, plan.commit)
        make_dirs(dest.parent)
        trash = lay.staging_dir(plan.repo) / f"trash-{os.getpid()}-{os.urandom(4).hex()}"
        replace_dir(tree, dest, trash)
        rmtree_quiet(trash)
        if store.fsync:
            fsync_dir(dest.parent)
        os.replace(pending, lay.manifest_path(plan.repo, plan.commit))
        if store.fsync:
            fsync_dir(pending.parent)
        trees_json = plan.extras.get("trees_json")
        if isinstance(trees_json, str):  # hub source: lets huggingface_hub 2.x treat the snapshot as complete
            write_atomic(lay.trees_path(plan.repo, plan.commit), trees_json, tmp_dir=lay.staging_dir(plan.repo),
                         fsync=store.fsync)
        if plan.ref:
            write_atomic(lay.ref_path(plan.repo, plan.ref), plan.commit, tmp_dir=lay.staging_dir(plan.repo),
                         fsync=store.fsync)
            store.drop_ref_from_others(plan.repo, plan.ref, plan.commit)
        self._drop_staging()
        return manifest

    def _drop_staging(self) -> None:
        """Remove this fill's staging, and the repo's staging folder once empty (a space check walks staging)."""
        rmtree_quiet(self.dir)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()

    def _publish_blobs(self) -> None:
        """Step 1 of publish: move verified blobs from staging into hub/ blobs (mtime, inode kept)."""
        blobs = self.store.layout.blobs_dir(self.plan.repo)
        make_dirs(blobs)
        staged = self.dir / "blobs"
        added = 0
        if staged.is_dir():
            if self.store.fsync:
                fsync_dir(staged)
            for b in staged.iterdir():
                dest = blobs / b.name
                if not dest.exists():
                    added += b.stat().st_size
                os.replace(b, dest)
        if self.store.fsync:
            fsync_dir(blobs)
        self.store.space.published_changed(added)

    def abort(self, *, keep_partials: bool = False) -> None:
        """Drop staging for this fill; partial and verified staged files may be kept for a later resume."""
        if not keep_partials:
            for hook in list(self.on_dropped):
                try:
                    hook()
                except Exception as e:
                    log.warning("fill.on_dropped_failed", error=str(e))
            self._drop_staging()

    @contextlib.contextmanager
    def reserve(self, entries: list[FileEntry]) -> Iterator[int]:
        """Hold the disk space ``entries`` still need (budget and filesystem) for the whole fill.

        Raises ``DiskFullError`` naming bytes needed and free, with ``shortfall`` for eviction.
        """
        need = self.needed_bytes(entries)
        with self.store.space.reserve(self.plan.repo, self.plan.commit, need, self.dir) as n:
            yield n

