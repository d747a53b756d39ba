"""The crash-safe cache store, writing side: locks, staging sweep, fills, records, quarantine, eviction.

Publishing (``agent.cache.staging.Fill.publish``) is blobs -> pending manifest -> snapshot tree ->
manifest -> refs; removal is the reverse. Every step is a rename inside one filesystem, so a crash
at any instant leaves either the old state or the new one visible under ``hub/``. Partial files
only ever live in ``.agent/staging``. The read side (manifests, records, checks) is ``CacheReader``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.cache.fsutil import disk_full_as_error, fsync_dir, make_dirs, rmtree_quiet, write_atomic
from agent.cache.hashing import WriteFn, hash_file
from agent.cache.inspect import CacheReader
from agent.cache.layout import blob_link_target, repo_from_folder_name
from agent.cache.manifest import Manifest, load_manifest, manifest_bytes
from agent.cache.space import SpaceLedger
from agent.cache.staging import Fill
from agent.core.plan import ModelPlan
from agent.core.snapshot import ModelRecord
from agent.errors import CorruptStateError, LockedError

PARTIAL_MAX_AGE = 24 * 3600.0


class Store(CacheReader):
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
        super().__init__(root)
        self.fsync = fsync
        self.write_fn = write_fn
        self.clock = clock
        self.space = SpaceLedger(self.layout, budget=budget_bytes, reserve=reserve_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.space.budget

    # -- setup and locks -------------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        lay = self.layout
        with disk_full_as_error(f"creating the folders of {lay.root}"):
            for d in (lay.hub, lay.staging_root, lay.manifests_root, lay.locks_root, lay.records_root):
                make_dirs(d)

    @contextmanager
    def lock(self, repo: str, *, timeout: float | None = None,
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Exclusive per-repo lock across processes (flock on local disk; the cache root must be local).

        The holder writes its pid and command into the lock file, so a waiter can say whom it waits
        for (``on_wait(holder)`` is called once, when the lock is busy).
        """
        self.ensure_dirs()
        path = self.layout.lock_path(repo)
        with disk_full_as_error(f"creating {path}"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _lock_holder(fd)
                    if on_wait is not None and not told:
                        on_wait(holder)
                        told = True
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockedError(f"{repo} is being filled by another process ({holder}; {path})") from None
                    time.sleep(0.05)
            _write_holder(fd)
            yield
        finally:
            os.close(fd)

    def sweep_staging(self, repo: str, *, max_partial_age: float = PARTIAL_MAX_AGE) -> None:
        """Finish or undo what a crashed fill left (call under the repo lock).

        A pending manifest is rolled forward when its snapshot tree is in place, else dropped. Snapshot
        trees and temp files in staging go at once; resumable partial files are kept for
        ``max_partial_age`` so a restarted fill continues from them.
        """
        self._settle_pending(repo)
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
        with contextlib.suppress(OSError):
            d.rmdir()  # nothing left to resume: an empty folder only slows every space check down

    def _settle_pending(self, repo: str) -> None:
        d = self.layout.manifest_dir(repo)
        try:
            pendings = [n for n in os.listdir(d) if n.endswith(".json.pending")]
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in pendings:
            path = d / name
            try:
                m = load_manifest(path)
            except CorruptStateError:
                m = None
            if m is not None and self._tree_matches(m):
                os.replace(path, self.layout.manifest_path(m.repo, m.commit))  # the tree swap happened
                if self.fsync:
                    fsync_dir(d)
            else:
                path.unlink(missing_ok=True)  # killed before the tree swap: the old manifest still holds

    def _tree_matches(self, m: Manifest) -> bool:
        snap = str(self.layout.snapshot_dir(m.repo, m.commit))
        for f in m.files:
            try:
                if os.readlink(snap + "/" + f.path) != blob_link_target(f.path, f.digest):
                    return False
            except OSError:
                return False
        return True

    def sweep_all(self) -> None:
        """Sweep staging and pending manifests of every repo not currently locked by a live fill."""
        repos: set[str] = set(self.manifest_repos())
        root = self.layout.staging_root
        if root.is_dir():
            for child in root.iterdir():
                repo = repo_from_folder_name(child.name)
                if repo is None:
                    rmtree_quiet(child) if child.is_dir() else child.unlink(missing_ok=True)
                else:
                    repos.add(repo)
        for repo in sorted(repos):
            try:
                with self.lock(repo, timeout=0):
                    self.sweep_staging(repo)
            except LockedError:
                continue

    # -- filling ---------------------------------------------------------------------------------

    def begin(self, plan: ModelPlan, *, stop: threading.Event | None = None) -> Fill:
        """Start a fill (call under ``lock(plan.repo)``); ``stop`` cancels it between chunks."""
        self.ensure_dirs()
        return Fill(self, plan, stop=stop)

    def write_record(self, record: ModelRecord) -> None:
        """Persist the file set a model was filled with (after its publish, under the repo lock)."""
        data = json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"))
        with disk_full_as_error(f"recording model {record.name}"):
            write_atomic(self.layout.record_path(record.name), data, tmp_dir=self.layout.staging_root,
                         fsync=self.fsync)

    def remove_record(self, name: str) -> None:
        self.layout.record_path(name).unlink(missing_ok=True)

    def drop_ref_from_others(self, repo: str, ref: str, commit: str) -> None:
        """``ref`` now names ``commit``: other snapshots of the repo no longer claim it (else they look damaged)."""
        for m in self.manifests(repo):
            if m.commit != commit and ref in m.refs:
                m.refs = [r for r in m.refs if r != ref]
                write_atomic(self.layout.manifest_path(repo, m.commit), manifest_bytes(m),
                             tmp_dir=self.layout.staging_dir(repo), fsync=self.fsync)

    # -- repair and removal ------------------------------------------------------------------------

    def quarantine(self, repo: str, commit: str, blobs: Collection[str]) -> list[str]:
        """Delete blobs whose *content* is wrong, so a repair cannot trust them by stat (under the repo lock).

        Each is re-checked first (size, then xxh3 against the manifest): a blob a fill replaced since
        the scan saw it is left alone. Returns the blob names removed.
        """
        try:
            m = self.manifest(repo, commit)
        except CorruptStateError:
            m = None
        by_digest = {f.digest: f for f in m.files} if m else {}
        removed = []
        for digest in blobs:
            path = self.layout.blob_path(repo, digest)
            f = by_digest.get(digest)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if f is not None and size == f.size and hash_file(path, f.algo, hub_digest=False, size=size).xxh3 == f.xxh3:
                continue  # repaired since the scan: keep it
            path.unlink(missing_ok=True)
            self.space.published_changed(-size)
            removed.append(digest)
        return removed

    def remove_snapshot(self, repo: str, commit: str) -> int:
        """Evict one snapshot (under the repo lock): refs, tree, manifest, records, then unshared blobs.

        Returns bytes freed. Reverse of publish order, so a crash leaves no ref to a missing tree.
        """
        lay = self.layout
        try:
            m = self.manifest(repo, commit)
        except CorruptStateError:
            m = None
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
        for rec in self.records():
            if rec.repo == repo and rec.commit == commit:
                self.remove_record(rec.name)
        unreadable: list[CorruptStateError] = []
        others = self.manifests(repo, errors=unreadable)
        still_used = {f.digest for other in others for f in other.files}
        freed = 0
        for f in (m.files if m else []):
            if f.digest in still_used:
                continue
            blob = lay.blob_path(repo, f.digest)
            try:
                size = blob.stat().st_size
                blob.unlink()
                freed += size
            except FileNotFoundError:
                pass
        if not others and not unreadable:  # a sibling we cannot read may still own blobs: keep the folder
            rmtree_quiet(lay.repo_dir(repo))
        self.space.published_changed(-freed)
        return freed

    def used_bytes(self) -> int:
        """Bytes that count against the disk budget (published blobs, staging, reservations)."""
        return self.space.used()

    def free_bytes(self) -> int:
        """Free space for a new fill: the filesystem's minus reservations, capped by the budget."""
        return self.space.free()


def _lock_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        raw = ""
    return raw or "unknown holder"


def _write_holder(fd: int) -> None:
    """Name ourselves in the lock file (best effort: the flock is the lock, this is only for humans)."""
    try:
        cmd = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    text = f"pid {os.getpid()} {cmd}"[:500].encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
    except OSError:
        pass
