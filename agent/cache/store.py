"""The crash-safe cache store: stage, verify, publish, remove, lock.

Publishing order is blobs -> manifest -> snapshot tree -> refs (removal is the reverse), and every
step is a rename inside one filesystem, so a crash at any instant leaves either the old state or
the new one visible under ``hub/``. Partial files only ever live in ``.agent/staging``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache.fsutil import (
    FILE_MODE,
    fsync_dir,
    make_dirs,
    replace_dir,
    rmtree_quiet,
    write_text_atomic,
)
from agent.cache.hashing import Digests, DigestWriter, WriteFn, hash_file
from agent.cache.layout import CacheLayout, blob_link_target, repo_from_folder_name, safe_relpath
from agent.cache.manifest import Manifest, ManifestFile, load_manifest, write_json_atomic
from agent.core.plan import FileEntry, ModelPlan
from agent.errors import Cancelled, DiskFullError, IntegrityError, LockedError

PARTIAL_MAX_AGE = 24 * 3600.0


@dataclass
class VerifyReport:
    """Verification as a value: every problem found, each naming the file."""

    repo: str
    commit: str
    missing: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, str]] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    bad_refs: list[tuple[str, str]] = field(default_factory=list)
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

    Same answer as walking with ``os.walk`` + ``relpath``, in the same order (a directory's files,
    then its subdirectories; a symlink to a directory is neither listed nor followed; unreadable
    directories are skipped), but it only stats an entry when the answer depends on it: every
    snapshot entry is a symlink, and ``os.walk`` stats each one to learn whether it points at a
    directory.
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
            continue  # a manifest file (its target was checked above); os.walk lists it as a file
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


class Store:
    """One cache root. Constructor arguments are the seams tests use (fsync, write faults, clock)."""

    def __init__(
        self,
        root: Path | str,
        *,
        fsync: bool = True,
        reserve_bytes: int = 0,
        write_fn: WriteFn = os.write,
        clock: Callable[[], float] = time.time,
        budget_bytes: int = 0,
    ) -> None:
        self.layout = CacheLayout(Path(root))
        self.fsync = fsync
        self.reserve_bytes = reserve_bytes
        self.budget_bytes = budget_bytes  # 0: no budget beyond the filesystem's free space
        self.write_fn = write_fn
        self.clock = clock

    # -- setup and locks -------------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        for d in (self.layout.hub, self.layout.staging_root, self.layout.manifests_root, self.layout.locks_root):
            make_dirs(d)

    @contextmanager
    def lock(self, repo: str, *, timeout: float | None = None) -> Iterator[None]:
        """Exclusive per-repo lock across processes (flock on local disk; the cache root must be local)."""
        self.ensure_dirs()
        path = self.layout.lock_path(repo)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockedError(f"{repo} is being filled by another process ({path})") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def sweep_staging(self, repo: str, *, max_partial_age: float = PARTIAL_MAX_AGE) -> None:
        """Remove what a crashed fill left in staging (call under the repo lock).

        Snapshot trees and temp files go at once; resumable partial files are kept for
        ``max_partial_age`` so a restarted fill continues from them.
        """
        d = self.layout.staging_dir(repo)
        if not d.is_dir():
            return
        now = self.clock()
        for child in d.iterdir():
            if child.name.startswith(("tree-", "trash-", ".")):
                rmtree_quiet(child) if child.is_dir() else child.unlink(missing_ok=True)
            elif child.is_dir():
                try:
                    newest = max((p.stat().st_mtime for p in child.rglob("*")), default=child.stat().st_mtime)
                except FileNotFoundError:
                    continue
                if now - newest > max_partial_age:
                    rmtree_quiet(child)

    def sweep_all(self) -> None:
        """Sweep staging of every repo not currently locked by a live fill."""
        root = self.layout.staging_root
        if not root.is_dir():
            return
        for child in root.iterdir():
            repo = repo_from_folder_name(child.name)
            if repo is None:
                rmtree_quiet(child)
                continue
            try:
                with self.lock(repo, timeout=0):
                    self.sweep_staging(repo)
            except LockedError:
                continue

    # -- reading state ---------------------------------------------------------------------------

    def manifest(self, repo: str, commit: str) -> Manifest | None:
        return load_manifest(self.layout.manifest_path(repo, commit))

    def manifests(self) -> list[Manifest]:
        out: list[Manifest] = []
        root = self.layout.manifests_root
        if not root.is_dir():
            return out
        for repo_dir in sorted(root.iterdir()):
            if not repo_dir.is_dir():
                continue
            for p in sorted(repo_dir.glob("*.json")):
                m = load_manifest(p)
                if m is not None:
                    out.append(m)
        return out

    def read_ref(self, repo: str, ref: str) -> str | None:
        try:
            return self.layout.ref_path(repo, ref).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def find_manifest(self, repo: str, revision: str) -> Manifest | None:
        """The manifest for a commit, or for the commit a local ref points at."""
        commit = revision if len(revision) == 40 else self.read_ref(repo, revision)
        return self.manifest(repo, commit) if commit else None

    def check(self, manifest: Manifest, *, deep: bool = False, full: bool = False,
              on_bytes: Callable[[int], None] | None = None, deep_blobs: Collection[str] = ()) -> VerifyReport:
        """Check a snapshot against its manifest.

        Fast (default): symlink targets, blob size, mtime and inode; no file content is read.
        ``deep``: also re-read every blob with xxh3-128. ``full``: recompute the Hub digest too.
        ``deep_blobs``: re-read just these blobs with xxh3 (the watcher saw them change).

        Paths are joined as strings, not ``Path`` objects: on a restart this runs for every file of
        every model before the first label, and pathlib parsing was most of its CPU (manifest paths
        passed ``safe_relpath`` at fill time, so plain joining gives the same path).
        """
        lay = self.layout
        rep = VerifyReport(manifest.repo, manifest.commit)
        snap = str(lay.snapshot_dir(manifest.repo, manifest.commit))
        blobs = str(lay.blobs_dir(manifest.repo)) + "/"
        for f in manifest.files:
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
                continue
            if not (deep or full) and (st.st_mtime_ns != f.mtime_ns or st.st_ino != f.inode):
                rep.mismatches.append((f.path, "blob changed since verified (mtime/inode)"))
                continue
            if deep or full or f.digest in deep_blobs:
                d = hash_file(Path(blob), f.algo, hub_digest=full, size=f.size, on_bytes=on_bytes)
                rep.bytes_read += d.size
                if d.xxh3 != f.xxh3:
                    rep.mismatches.append((f.path, f"xxh3 {d.xxh3}, expected {f.xxh3}"))
                elif full and d.digest != f.digest:
                    rep.mismatches.append((f.path, f"{f.algo} {d.digest}, expected {f.digest}"))
        known = {f.path for f in manifest.files}
        rep.extra.extend(_unknown_files(snap, "", known))
        for ref in manifest.refs:
            got = self.read_ref(manifest.repo, ref)
            if got is not None and got != manifest.commit:
                rep.bad_refs.append((ref, f"points to {got}, expected {manifest.commit}"))
        return rep

    def quarantine(self, manifest: Manifest, report: VerifyReport) -> list[str]:
        """Delete blobs whose *content* failed verification, so a repair cannot trust them by stat.

        Size, mtime and inode can all survive bit rot; once a content hash disagreed, the blob is
        garbage. Returns the blob names removed (the snapshot is already unlabelled by the caller).
        """
        by = manifest.by_path()
        removed = []
        for path, why in report.mismatches:
            f = by.get(path)
            if f is None or not why.startswith(("xxh3 ", "sha256 ", "git-sha1 ", "size ")):
                continue
            try:
                self.layout.blob_path(manifest.repo, f.digest).unlink()
                removed.append(f.digest)
            except FileNotFoundError:
                pass
        return removed

    # -- filling ---------------------------------------------------------------------------------

    def begin(self, plan: ModelPlan, *, stop: threading.Event | None = None) -> Fill:
        """Start a fill (call under ``lock(plan.repo)``); ``stop`` cancels it between chunks."""
        self.ensure_dirs()
        return Fill(self, plan, stop=stop)

    # -- removal ---------------------------------------------------------------------------------

    def remove_snapshot(self, repo: str, commit: str) -> int:
        """Evict one snapshot: refs, snapshot tree, manifest, then blobs no other snapshot uses.

        Returns bytes freed. Reverse of publish order, so a crash leaves no ref to a missing tree.
        """
        lay = self.layout
        m = self.manifest(repo, commit)
        refs_dir = lay.refs_dir(repo)
        if refs_dir.is_dir():
            for p in refs_dir.rglob("*"):
                if p.is_file() and p.read_text().strip() == commit:
                    p.unlink()
        snap = lay.snapshot_dir(repo, commit)
        if snap.exists():
            trash = lay.staging_dir(repo) / f"trash-{os.getpid()}-{os.urandom(4).hex()}"
            make_dirs(trash.parent)
            os.rename(snap, trash)
            rmtree_quiet(trash)
        lay.manifest_path(repo, commit).unlink(missing_ok=True)
        lay.trees_path(repo, commit).unlink(missing_ok=True)
        still_used = {f.digest for other in self.manifests() if other.repo == repo for f in other.files}
        freed = 0
        for f in (m.files if m else []):
            if f.digest in still_used:
                continue
            blob = lay.blob_path(repo, f.digest)
            try:
                freed += blob.stat().st_size
                blob.unlink()
            except FileNotFoundError:
                pass
        if not any(o.repo == repo for o in self.manifests()):
            rmtree_quiet(lay.repo_dir(repo))
        return freed

    def used_bytes(self) -> int:
        """Bytes of published blobs plus staging: what counts against the disk budget."""
        total = 0
        for top in (self.layout.hub, self.layout.staging_root):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def free_bytes(self) -> int:
        """Free space for new blobs: the filesystem's, capped by what the budget still allows."""
        free = shutil.disk_usage(self.layout.root).free
        if self.budget_bytes > 0:
            free = min(free, self.budget_bytes - self.used_bytes())
        return free


class Fill:
    """One fill in progress: resumable partial files in staging, verified blobs, then publish.

    Sources call ``open`` (stream bytes through a DigestWriter) or ``adopt`` (a file an external
    downloader wrote at ``part_path``), then ``complete``. Safe to call from several threads.
    """

    def __init__(self, store: Store, plan: ModelPlan, *, stop: threading.Event | None = None) -> None:
        self.store = store
        self.plan = plan
        self.stop = stop or threading.Event()  # sources call ``check_stop`` between chunks
        self.dir = store.layout.staging_dir(plan.repo) / plan.commit
        self.files_dir = self.dir / "files"
        make_dirs(self.files_dir)
        self._done: dict[str, ManifestFile] = {}
        self._mu = threading.Lock()

    def check_stop(self) -> None:
        """Raise ``Cancelled`` once the fill was asked to stop; sources call it between chunks."""
        if self.stop.is_set():
            raise Cancelled(f"{self.plan.repo}@{self.plan.commit[:12]}: fill stopped; staged bytes kept")

    # which files need bytes

    def done_paths(self) -> set[str]:
        with self._mu:
            return set(self._done)

    def needed(self) -> list[FileEntry]:
        """Entries without a usable blob already on disk (revisions and re-fills share blobs)."""
        reusable = self._reusable_blobs()
        out: list[FileEntry] = []
        for e in self.plan.files:
            mf = self._reuse(e, reusable)
            if mf is not None:
                self._done[e.path] = mf
            else:
                out.append(e)
        return out

    def check_space(self, entries: list[FileEntry]) -> None:
        need = sum(e.size for e in entries) - sum(self._staged_size(e) for e in entries)
        free = self.store.free_bytes()
        if need + self.store.reserve_bytes > free:
            budget = f" (budget {self.store.budget_bytes})" if self.store.budget_bytes else ""
            raise DiskFullError(
                f"{self.plan.repo}@{self.plan.commit[:12]} needs {need} bytes for {len(entries)} files "
                f"plus {self.store.reserve_bytes} reserve; only {free} free under {self.store.layout.root}{budget}",
                shortfall=need + self.store.reserve_bytes - free,
            )

    def _reusable_blobs(self) -> dict[str, ManifestFile]:
        by_digest: dict[str, ManifestFile] = {}
        for m in self.store.manifests():
            if m.repo == self.plan.repo:
                for f in m.files:
                    by_digest.setdefault(f.digest, f)
        return by_digest

    def _reuse(self, e: FileEntry, reusable: dict[str, ManifestFile]) -> ManifestFile | None:
        lay = self.store.layout
        if e.digest is None:
            # Unknown digest: only a manifest of this very commit can vouch for the file.
            m = self.store.manifest(self.plan.repo, self.plan.commit)
            old = m.by_path().get(e.path) if m else None
            if old is None or old.size != e.size:
                return None
            e = e.with_digest(old.digest)
        blob = lay.blob_path(self.plan.repo, e.digest)
        staged = self.staged_blob(e.digest)
        for candidate in (blob, staged):
            try:
                st = os.stat(candidate)
            except FileNotFoundError:
                continue
            if st.st_size != e.size:
                continue
            known = reusable.get(e.digest)
            if (candidate == blob and known and known.size == e.size and known.mtime_ns == st.st_mtime_ns
                    and known.inode == st.st_ino):
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

    # writing one file

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
        if resume and part.exists() and part.stat().st_size > entry.size:
            part.unlink()
        return DigestWriter(part, entry.algo, entry.size, append=resume, write_fn=self.store.write_fn,
                            fsync=self.store.fsync)

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
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.complete(entry, d)

    def complete(self, entry: FileEntry, d: Digests) -> ManifestFile:
        """Check size and digest, then move the staged file into ``blobs/``. Raises IntegrityError."""
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
        return mf

    def write_stream(
        self, entry: FileEntry, chunks: Iterator[bytes], *, on_bytes: Callable[[int], None] | None = None
    ) -> ManifestFile:
        """Convenience for sources with a chunk iterator: write, fsync, verify, publish the blob."""
        w = self.open(entry)
        try:
            for c in chunks:
                w.write(c)
                if on_bytes is not None:
                    on_bytes(len(c))
            d = w.finish()
        except BaseException:
            w.close()
            self.part_path(entry).unlink(missing_ok=True)
            raise
        return self.complete(entry, d)

    # publishing the snapshot

    def publish(self) -> Manifest:
        """Manifest, then the snapshot tree (swapped in whole), then the ref. Needs every file complete."""
        lay = self.store.layout
        plan = self.plan
        missing = [e.path for e in plan.files if e.path not in self._done]
        if missing:
            raise IntegrityError(missing[0], f"not filled ({len(missing)} files missing)")
        self._publish_blobs()
        old = self.store.manifest(plan.repo, plan.commit)
        files = dict(self._done)
        refs = set(old.refs if old else [])
        if old is not None:
            keep = self.store.check(old)
            damaged = set(keep.damaged_paths)
            for f in old.files:
                if f.path not in files and f.path not in damaged:
                    files[f.path] = f
        if plan.ref:
            refs.add(plan.ref)
        manifest = Manifest(plan.repo, plan.commit, sorted(files.values(), key=lambda f: f.path),
                            sorted(refs), plan.source, self.store.clock())
        write_json_atomic(lay.manifest_path(plan.repo, plan.commit), manifest.to_json(), fsync=self.store.fsync)

        tree = lay.staging_dir(plan.repo) / f"tree-{os.getpid()}-{os.urandom(4).hex()}"
        make_dirs(tree)
        for f in manifest.files:
            link = tree / f.path
            make_dirs(link.parent)
            os.symlink(blob_link_target(f.path, f.digest), link)
        if self.store.fsync:
            for dirpath, _dirs, _files in os.walk(tree):
                fsync_dir(Path(dirpath))
        dest = lay.snapshot_dir(plan.repo, plan.commit)
        make_dirs(dest.parent)
        trash = lay.staging_dir(plan.repo) / f"trash-{os.getpid()}-{os.urandom(4).hex()}"
        replace_dir(tree, dest, trash)
        rmtree_quiet(trash)
        if self.store.fsync:
            fsync_dir(dest.parent)
        trees_json = plan.extras.get("trees_json")
        if isinstance(trees_json, str):  # hub source: lets huggingface_hub 2.x treat the snapshot as complete
            write_text_atomic(lay.trees_path(plan.repo, plan.commit), trees_json, lay.staging_dir(plan.repo),
                              fsync=self.store.fsync)
        if plan.ref:
            write_text_atomic(lay.ref_path(plan.repo, plan.ref), plan.commit, lay.staging_dir(plan.repo),
                              fsync=self.store.fsync)
        rmtree_quiet(self.dir)
        return manifest

    def _publish_blobs(self) -> None:
        """Step 1 of publish: move verified blobs from staging into hub/ blobs (mtime, inode kept)."""
        blobs = self.store.layout.blobs_dir(self.plan.repo)
        make_dirs(blobs)
        staged = self.dir / "blobs"
        if staged.is_dir():
            if self.store.fsync:
                fsync_dir(staged)
            for b in staged.iterdir():
                os.replace(b, blobs / b.name)
        if self.store.fsync:
            fsync_dir(blobs)

    def abort(self, *, keep_partials: bool = False) -> None:
        """Drop staging for this fill; partial files may be kept for a later resume."""
        if not keep_partials:
            rmtree_quiet(self.dir)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
