"""One model's download from the swarm: a torrent per file, added as peers list it, verified as it lands.

    every poll_interval, while files wait: ask the known peers which of the snapshot's files they list,
        fetch and check each new file's info dict, add its torrent (into staging/p2p/<n>.part)
    a torrent finished -> (verify pool) flush, remove, hash against the trusted digest, Fill.complete,
        which shares the file from this node's staging at once (PeerService.share_fill)
    no bytes for stall_timeout while torrents run, or nobody lists a file for holder_wait while a slot
        holder fills (ten index polls when none does) -> TransientSourceError: the next source

A slot holder lists each file the moment it has verified it, so the rest of the cluster follows the
origin fill one file behind instead of one whole model behind.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libtorrent as lt
import structlog

from agent.cache.hashing import hash_file
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.torrent import FileTorrent, piece_priorities
from agent.errors import Cancelled, DiskFullError, IntegrityError, TransientSourceError, UnsafePathError
from agent.sources.base import Progress
from agent.sources.peers.settings import PeerAddr

if TYPE_CHECKING:
    from agent.sources.peers.service import PeerService, Swarm, TorrentRef, _Transfer

log = structlog.get_logger("agent.sources.peers")
RECONNECT_EVERY = 2.0
FLUSH_TIMEOUT = 60.0
VERIFY_THREADS = min(8, max(2, os.cpu_count() or 2))  # files finishing together are hashed in parallel
ALIVE_EVERY = 5.0  # seconds between asks whether a slot holder still fills (a Lease read in a cluster)
# Files downloading at once. 4 measured 1.39/1.94/2.20x the limit in the swarm lab (N = 2/4/8) against
# 1.17/1.57/1.84x with every listed file at once: more files in flight is more sources for each node.
MAX_ACTIVE = 64
BUSY_POLL = 2.0  # seconds between index polls while two or more files download
NO_HOLDER_POLLS = 10  # with no holder filling, files nobody lists are given up after this many index polls


@dataclass
class _Active:
    """One file's torrent while it downloads and until it is verified."""

    ft: FileTorrent
    entry: FileEntry
    ref: TorrentRef
    handle: Any
    t: _Transfer
    target: Path
    peers: list[PeerAddr]
    done: int = 0
    last_connect: float = 0.0
    removed: bool = False


class SwarmDownload:
    def __init__(self, svc: PeerService, swarm: Swarm, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill,
                 progress: Progress, alive: Callable[[], bool]) -> None:
        self.svc, self.swarm, self.plan, self.entries = svc, swarm, plan, entries
        self.fill, self.progress, self.alive = fill, progress, alive
        self.changed = threading.Event()
        self.log = log.bind(repo=plan.repo, commit=plan.commit[:12])
        self.hash_failures = 0
        self.banned: set[str] = set()
        self.peers_seen = 0
        self._mu = threading.Lock()  # the counters above, from the verify threads

    def run(self) -> None:
        svc, fill = self.svc, self.fill
        wanted = {e.path: e for e in self.entries if e.size > 0}
        for e in self.entries:
            if e.size == 0:  # nothing to share: no torrent, written here
                fill.write_bytes(e, b"")
        if not wanted:
            return
        by_path = {ft.entry.path: ft for ft in self.swarm.files}
        missing = sorted(set(wanted) - set(by_path))
        if missing:
            raise UnsafePathError(f"peers: {missing[0]} is not a file of {self.plan.repo}@{self.plan.commit[:12]}")
        work = fill.dir / "p2p"
        _ensure_inside(work, fill.store.layout.staging_root)
        work.mkdir(parents=True, exist_ok=True)
        pending = {p: by_path[p] for p in sorted(wanted)}
        active: dict[str, _Active] = {}
        finishing: dict[Future[None], _Active] = {}
        started: list[_Active] = []
        pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="p2p-verify")
        ps = svc.settings
        now = svc.clock()
        last_look, last_progress, last_new, next_alive, holder_alive = -math.inf, now, now, now, True
        found: dict[str, list[PeerAddr]] = {}  # file key -> peers listing it, at the last index poll
        self.log.info("peers.download_start", files=len(wanted), bytes=sum(e.size for e in wanted.values()))
        try:
            while pending or active or finishing:
                self.changed.wait(0.25)
                self.changed.clear()
                fill.check_stop()
                if svc.closing.is_set():
                    raise Cancelled("peers: the p2p service is stopping")
                now = svc.clock()
                # With two files downloading the next one is not urgent: ask the holders' indexes less often
                # (at 1000 nodes every follower polls the same one or two slot holders).
                every = ps.poll_interval if len(active) < 2 else max(ps.poll_interval, BUSY_POLL)
                if pending and len(active) < MAX_ACTIVE and now - last_look >= every:
                    last_look = now
                    found = svc.find_files(self.swarm)
                for path, ft in list(pending.items()):  # start listed files as room frees up, without a new poll
                    if len(active) >= MAX_ACTIVE:
                        break
                    if found.get(ft.key):
                        ref = svc.fetch_torrent(ft, found[ft.key])
                        if ref is None:
                            del found[ft.key]  # look again at the next poll
                            continue
                        a = self._start(ref, ft, wanted[path], work / f"{len(started)}.part")
                        started.append(a)
                        active[ref.info_hash] = a
                        del pending[path]
                        last_new = now
                for ih, a in list(active.items()):
                    _raise_storage_error(a.t, fill)
                    st = a.handle.status()
                    self.peers_seen = max(self.peers_seen, st.num_peers)
                    if st.total_wanted_done > a.done:
                        self.progress.advance(st.total_wanted_done - a.done)
                        a.done = st.total_wanted_done
                        last_progress = now
                    elif st.state in (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data):
                        last_progress = now
                    # Only verified pieces count: total_wanted_done can include a piece still waiting for
                    # its hash check (a one-piece file "completed" with a corrupt peer's bytes).
                    if a.t.finished.is_set() or st.state in (lt.torrent_status.finished, lt.torrent_status.seeding):
                        del active[ih]
                        finishing[pool.submit(self._finish, a)] = a
                    elif now - a.last_connect > RECONNECT_EVERY and st.num_peers < len(a.peers):
                        # A peer refused while it had no such torrent yet; libtorrent gives a refused peer up.
                        svc._connect(a.handle, a.peers)
                        a.last_connect = now
                for fut in [f for f in finishing if f.done()]:
                    del finishing[fut]
                    fut.result()
                    last_progress = now
                if active and now - last_progress > ps.stall_timeout:
                    raise TransientSourceError(
                        f"peers: no progress for {ps.stall_timeout:g}s ({len(active)} files downloading, "
                        f"{self.peers_seen} peers seen, {len(self.banned)} banned, {self.hash_failures} bad pieces)")
                if pending and not active and not finishing:
                    if now >= next_alive:
                        holder_alive = self.alive()
                        next_alive = now + ALIVE_EVERY
                    limit = (ps.holder_wait if holder_alive
                             else min(ps.stall_timeout, NO_HOLDER_POLLS * ps.poll_interval))
                    if now - max(last_new, last_progress) > limit:
                        first = next(iter(pending))
                        raise TransientSourceError(
                            f"peers: no peer lists {first} (and {len(pending) - 1} more files of "
                            f"{self.plan.repo}@{self.plan.commit[:12]}) after {limit:g}s"
                            + ("" if holder_alive else "; no origin slot holder is filling it"))
            self.log.info("peers.download_done", files=len(wanted), hash_failures=self.hash_failures,
                          banned=sorted(self.banned), peers=self.peers_seen)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._drop(a for a in started if not a.removed)
            for a in started:
                self._forget(a)
            shutil.rmtree(work, ignore_errors=True)

    def _drop(self, failed: Iterable[_Active]) -> None:
        """Failed or cancelled: truncate the partial files (so writes parked on a full disk end), remove every
        torrent with its files, then wait for all of them under one deadline."""
        from agent.sources.peers.service import REMOVE_TIMEOUT

        svc, gone = self.svc, list(failed)
        for a in gone:
            with contextlib.suppress(OSError):
                os.truncate(a.target, 0)
            with svc._mu:
                if svc._ses is not None:
                    with contextlib.suppress(RuntimeError):
                        svc._ses.remove_torrent(a.handle, lt.session.delete_files)
            a.removed = True
        deadline = svc.clock() + REMOVE_TIMEOUT
        for a in gone:
            if not svc._wait_removed(a.t, max(0.0, deadline - svc.clock())):
                break

    def _start(self, ref: TorrentRef, ft: FileTorrent, entry: FileEntry, target: Path) -> _Active:
        from agent.sources.peers.service import _add_params, _Transfer

        svc = self.svc
        stale = svc._seed_by_hash(ref.info_hash)
        if stale is not None:  # shared from the staging of an earlier, failed fill of this commit
            svc._drop_seed(stale, wait=True)
        atp = _add_params(ref.info, save_path=target.parent, renamed={0: str(target)},
                          flags=lt.torrent_flags.duplicate_is_error)
        atp.piece_priorities = piece_priorities(ft.layout, {ft.entry.path}, share=svc._share())
        t = _Transfer(changed=self.changed)
        with svc._mu:
            if svc._ses is None:
                raise TransientSourceError("peers: the p2p service is stopped")
            if ref.info_hash in svc._transfers:
                raise TransientSourceError(f"peers: {ft.entry.path} is already being downloaded here")
            try:
                handle = svc._ses.add_torrent(atp)
            except RuntimeError as e:
                raise TransientSourceError(f"peers: cannot add the torrent of {ft.entry.path}: {e}") from e
            svc._transfers[ref.info_hash] = t
        peers = list(dict.fromkeys([*ref.holders, *self.swarm.holders, *svc.settings.peers]))  # ref: who lists it
        svc._connect(handle, peers)
        return _Active(ft, entry, ref, handle, t, target, peers, last_connect=svc.clock())

    def _finish(self, a: _Active) -> None:
        """Flush, remove the torrent (libtorrent lets go of the file), hash, hand the file to the store."""
        from agent.sources.peers.service import _write_info_cache

        svc, fill, t, e = self.svc, self.fill, a.t, a.entry
        before = t.flushes
        a.handle.flush_cache()
        deadline = svc.clock() + FLUSH_TIMEOUT
        while t.flushes <= before and t.error is None and svc.clock() < deadline and not svc.closing.is_set():
            t.flushed.wait(0.05)
            t.flushed.clear()
        let_go = svc._remove(a.handle, t)
        a.removed = True
        self._forget(a)  # alerts for this info-hash now belong to the seed shared below
        with self._mu:
            self.hash_failures += t.hash_failures
            self.banned.update(t.banned)
        if not let_go:  # libtorrent may still write to it: never hash (or keep) a file it holds
            if svc.closing.is_set():
                raise Cancelled("peers: the p2p service is stopping")
            raise TransientSourceError(f"peers: libtorrent did not let go of {e.path}")
        _raise_storage_error(t, fill)  # a write that failed after its piece passed (pread writes later)
        _check_written(a.target, e, fill)
        d = hash_file(a.target, e.algo, size=e.size)
        if fill.store.fsync:
            fd = os.open(a.target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(a.target, fill.part_path(e))
        if d.size == e.size and e.digest is not None and d.digest == e.digest:
            # Only for bytes that match the trusted digest (a crash must not leave a liar's piece hashes here,
            # to seed real bytes under later): sharing the file from staging then needs no re-hash.
            _write_info_cache(fill.store, a.ft.key, a.ref.info)
        try:
            fill.complete(e, d)
        except IntegrityError:
            svc.reject(a.ref)
            self.log.error("peers.digest_mismatch", file=e.path, hash_failures=t.hash_failures,
                           error="bytes from peers passed the piece hashes but not the trusted digest")
            with svc._mu:
                svc.stats_bytes["rejected"] += e.size
            raise
        with svc._mu:
            svc.stats_bytes["downloaded"] += e.size
        fill.fetched_from("peers", e.size)

    def _forget(self, a: _Active) -> None:
        with self.svc._mu:
            if self.svc._transfers.get(a.ref.info_hash) is a.t:
                del self.svc._transfers[a.ref.info_hash]


def _raise_storage_error(t: _Transfer, fill: Fill) -> None:
    if t.error is None:
        return
    value, message, path = t.error
    if value == errno.ENOSPC:
        raise DiskFullError(f"peers: disk full while writing {path or fill.dir}: {message}")
    raise TransientSourceError(f"peers: libtorrent error {value} ({message}) on {path or 'torrent'}")


def _check_written(path: Path, entry: FileEntry, fill: Fill) -> None:
    """A file with holes was not fully written here: a local failure (disk full), not a peer's lie.

    Without this a write that failed after its piece passed would look like bad bytes from peers and
    get an honest torrent refused.
    """
    st = os.stat(path)
    if st.st_size == entry.size and st.st_blocks * 512 >= st.st_size:
        return
    message = (f"peers: {entry.path} was not fully written ({st.st_blocks * 512} of {entry.size} bytes on disk, "
               f"{shutil.disk_usage(fill.dir).free} bytes free)")
    if shutil.disk_usage(fill.dir).free < entry.size - st.st_blocks * 512:
        raise DiskFullError(message.replace("peers: ", "peers: disk full: ", 1))
    raise TransientSourceError(message)


def _ensure_inside(path: Path, root: Path) -> None:
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise UnsafePathError(f"peers: {path} is outside {root}")
