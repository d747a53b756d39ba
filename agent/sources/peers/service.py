"""One libtorrent session per agent: seed published models, download into staging, serve the index.

    seed(store, manifest)    hub/models--o--n/blobs/<digest>  <- read-only, seed_mode + upload_mode
    download(ref, ..., fill) .agent/staging/models--o--n/<commit>/p2p/<n>.part  -> fill.adopt() (sha256/git-sha1)
    index                    GET /p2p/v1/info/<plan key> on port+1 (metadata only)

Rules that keep peers untrusted and the disk safe:
- Every path handed to libtorrent is computed here from the cache layout: a published blob (read
  only: ``upload_mode`` means libtorrent never requests, so never writes, a piece of a seeded
  torrent) or a file under this fill's staging folder. Names inside a peer's info dict never reach
  the disk (every file is renamed); the part file of skipped pieces lives in staging too.
- ``seed_mode`` hashes each piece on its first request, so only pieces that pass their hash are
  served; a failing one stops the seed and reports the model (``on_corrupt``).
- A finished download is flushed and the torrent removed before any file is read (``is_seeding``
  can turn true before the data is on disk), then every file is re-hashed against the plan's
  trusted digest by the store. Piece hashes only reject bad pieces early and get the sender banned
  (libtorrent's smart-ban plugin).
- Alerts are popped on one thread and turned into plain values at once: an alert object must not
  outlive the next ``pop_alerts`` (libtorrent #7429), and ``set_alert_notify`` can deadlock.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libtorrent as lt
import structlog

from agent.cache.hashing import Digests, hash_file
from agent.cache.manifest import Manifest
from agent.cache.store import Fill, Store
from agent.core.plan import FileEntry, ModelPlan
from agent.core.torrent import (
    TorrentError,
    TorrentLayout,
    build_info,
    check_info,
    info_hash,
    layout,
    piece_hashes,
    piece_priorities,
    plan_key,
)
from agent.errors import (
    Cancelled,
    DiskFullError,
    IntegrityError,
    SourceError,
    TransientSourceError,
    UnsafePathError,
)
from agent.sources.base import Progress
from agent.sources.peers.index import IndexServer, fetch_info
from agent.sources.peers.settings import PeerAddr, PeerSettings
from agent.sources.peers.slots import DirSlots, LocalSlots, OriginGate, OriginSlots, slot_key

log = structlog.get_logger("agent.sources.peers")
READ_CHUNK = 8 * 1024 * 1024
FLUSH_TIMEOUT = 60.0
REMOVE_TIMEOUT = 10.0
RECONNECT_EVERY = 2.0

# On top of high_performance_seed(); measured with bench/fill_peers.py (its docstring has the figures).
# Disk and hashing threads scale with cores: on the 2-core VM one hashing and two disk threads beat 2+4.
_CORES = os.cpu_count() or 2
HASH_THREADS = min(8, _CORES)  # piece hashes of a model this node filled from the origin
VERIFY_THREADS = min(8, max(1, _CORES // 2))  # files of one band complete together: hash them in parallel
TUNING: dict[str, Any] = {
    # Shallow request queues and no read-cache suggestions: with the defaults (1500 blocks, suggest_read_cache)
    # leechers asked the one seed for the same pieces and it sent a model about 1.5 times (swarm lab); on
    # loopback 100 blocks (1.6 MiB) per peer still kept one fast link full (bench/fill_peers.py).
    "max_out_request_queue": 100,
    "request_queue_time": 1,
    "suggest_mode": 0,
    "send_buffer_watermark": 8 * 1024 * 1024,
    "send_buffer_low_watermark": 1024 * 1024,
    "aio_threads": min(8, max(2, _CORES // 4)),
    "hashing_threads": min(8, max(1, _CORES // 4)),
}
DISK_IO_CONSTRUCTORS = {
    "posix": "posix_disk_io_constructor",
    "pread": "pread_disk_io_constructor",
    "mmap": "mmap_disk_io_constructor",
}


def session_settings(ps: PeerSettings, listen: str, tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """libtorrent settings: TCP only, no DHT/LSD/UPnP (peers come from the index), our rate limits."""
    s: dict[str, Any] = dict(lt.high_performance_seed())
    s.update(TUNING)
    s.update(tuning or {})
    s.update({
        "listen_interfaces": listen,
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_outgoing_utp": False, "enable_incoming_utp": False,  # uTP ran at 8 MB/s on loopback
        "allow_multiple_connections_per_ip": True,  # agents on one host (tests, the lab) share an IP
        "upload_rate_limit": ps.upload_rate, "download_rate_limit": ps.download_rate,
        "user_agent": "model-cache-agent", "peer_fingerprint": "-MC0100-",
        "alert_mask": (lt.alert_category.error | lt.alert_category.peer | lt.alert_category.status
                       | lt.alert_category.storage | lt.alert_category.performance_warning
                       | lt.alert_category.file_progress),
        "alert_queue_size": 10000,
    })
    return s


@dataclass
class TorrentRef:
    """An info dict accepted for a plan: it matched the layout derived from trusted metadata."""

    key: str
    info: bytes
    info_hash: str
    layout: TorrentLayout
    holders: tuple[PeerAddr, ...] = ()


@dataclass
class _Transfer:
    """What the alert thread learned about one torrent; read by the thread that waits for it."""

    changed: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    flushed: threading.Event = field(default_factory=threading.Event)
    removed: threading.Event = field(default_factory=threading.Event)
    hash_failures: int = 0
    banned: list[str] = field(default_factory=list)
    completed_files: list[int] = field(default_factory=list)  # torrent file indices, in completion order
    flushes: int = 0  # cache_flushed alerts received
    peers_seen: int = 0  # most peers connected at once
    error: tuple[int, str, str] | None = None  # errno-like value, message, file

    def poke(self) -> None:
        self.changed.set()


class _Verifier:
    """Hash each finished file while the rest download: file_completed -> flush -> read back from disk.

    A file is read only after a ``cache_flushed`` alert that answers a flush requested after the file
    completed (libtorrent may hash a piece from memory before its bytes reach the file), and libtorrent
    never writes a completed file again, so the digest covers the final bytes. The store still checks
    it against the trusted digest in ``Fill.complete``.
    """

    def __init__(self, t: _Transfer, targets: dict[int, tuple[FileEntry, Path]], *, fsync: bool) -> None:
        self.t = t
        self.targets = targets
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="p2p-verify")
        self._seen = 0  # completed_files consumed
        self._requested = 0  # flushes asked for
        self._waiting: list[tuple[int, int]] = []  # (flush number that covers it, file index)
        self._futures: dict[int, Future[Digests]] = {}

    def request_flush(self, handle: Any) -> None:
        self._requested += 1
        handle.flush_cache()

    def wait_flushed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.t.flushes < self._requested and self.t.error is None and time.monotonic() < deadline:
            self.t.flushed.wait(0.05)
            self.t.flushed.clear()

    def poll(self, handle: Any = None) -> None:
        done = self.t.completed_files
        if handle is not None and len(done) > self._seen:
            fresh = [i for i in done[self._seen:] if i in self.targets]
            self._seen = len(done)
            if fresh:
                self.request_flush(handle)
                self._waiting += [(self._requested, i) for i in fresh]
        ready = [i for n, i in self._waiting if n <= self.t.flushes]
        self._waiting = [(n, i) for n, i in self._waiting if n > self.t.flushes]
        for i in ready:
            log.debug("peers.verify_early", file=self.targets[i][0].path)
            self._futures[i] = self._pool.submit(self._hash, *self.targets[i])

    def _hash(self, entry: FileEntry, path: Path) -> Digests:
        d = hash_file(path, entry.algo, size=entry.size)
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return d

    def result(self, i: int) -> Digests:
        fut = self._futures.get(i)
        return fut.result() if fut is not None else self._hash(*self.targets[i])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# Services started and not yet stopped. At interpreter exit a daemon thread still inside libtorrent
# (the alert reader blocks in wait_for_alert without the GIL) is unwound through C++ frames when it
# takes the GIL back, and the process aborts (exit 134): stop every live session before that point.
_LIVE: set[PeerService] = set()
_LIVE_MU = threading.Lock()


def live_services() -> list[PeerService]:
    with _LIVE_MU:
        return list(_LIVE)


@atexit.register
def _stop_live_services() -> None:
    for svc in live_services():
        with contextlib.suppress(Exception):
            svc.stop()


@dataclass
class _Seed:
    key: str
    repo: str
    commit: str
    info_hash: str
    handle: Any


class PeerService:
    """The agent's swarm membership. Start once; ``seed`` after every publish; ``stop`` at exit."""

    def __init__(self, settings: PeerSettings, *, slots: OriginSlots | None = None,
                 clock: Callable[[], float] = time.monotonic, tuning: dict[str, Any] | None = None,
                 on_corrupt: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        if slots is None:
            cap = settings.origin_concurrency
            slots = DirSlots(settings.slots_dir, cap) if settings.slots_dir else LocalSlots(cap)
        self.gate = OriginGate(slots)
        self.clock = clock
        self.tuning = tuning
        self.on_corrupt = on_corrupt
        self._mu = threading.RLock()
        self._ses: Any = None
        self._index: IndexServer | None = None
        self._alerts: threading.Thread | None = None
        self._closing = threading.Event()
        self._transfers: dict[str, _Transfer] = {}
        self._seeds: dict[str, _Seed] = {}  # plan key -> seed
        self._infos: dict[str, bytes] = {}  # plan key -> info dict served by the index
        self._rejected: dict[str, set[str]] = {}  # plan key -> info-hashes whose bytes failed the digest
        self._seeder = ThreadPoolExecutor(1, thread_name_prefix="p2p-seed")
        self._lookup = ThreadPoolExecutor(8, thread_name_prefix="p2p-index")
        self.stats_bytes = {"downloaded": 0, "rejected": 0}
        self._wire: dict[str, int] = {}  # bytes over the wire and peers, from the last session_stats_alert

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> PeerService:
        with self._mu:
            if self._ses is not None:
                return self
            ps = self.settings
            params = lt.session_params(session_settings(ps, f"{_listen_host(ps.listen_host)}:{ps.port}",
                                                        self.tuning))
            params.disk_io_constructor = DISK_IO_CONSTRUCTORS[ps.disk_io]
            ses = lt.session(params)
            # Cluster peers have private addresses, which libtorrent puts in its unlimited "local"
            # class; one class for every address makes the rate limits apply to them too.
            ipf = lt.ip_filter()
            ipf.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
            ipf.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1 << lt.session.global_peer_class_id)
            ses.set_peer_class_filter(ipf)
            self._ses = ses
            self._index = IndexServer(ps.listen_host, ps.bound_index_port, self._serve_info).start()
            self._alerts = threading.Thread(target=self._alert_loop, name="p2p-alerts", daemon=True)
            self._alerts.start()
            with _LIVE_MU:
                _LIVE.add(self)
            log.info("peers.started", bt_port=self.bt_port, index_port=self.index_port, disk_io=ps.disk_io,
                     peers=[str(p) for p in ps.peers], upload_rate=ps.upload_rate, download_rate=ps.download_rate)
            return self

    @property
    def bt_port(self) -> int:
        return int(self._ses.listen_port()) if self._ses is not None else 0

    @property
    def index_port(self) -> int:
        return self._index.port if self._index is not None else 0

    def addr(self, host: str = "127.0.0.1") -> PeerAddr:
        """How other nodes reach this one (tests and the lab, where ports are picked at random)."""
        return PeerAddr(host, self.bt_port, self.index_port)

    def stop(self) -> None:
        """Release origin slots, stop seeding and serving; the session shuts down with its torrents."""
        self._closing.set()
        with _LIVE_MU:
            _LIVE.discard(self)
        self.gate.release_all()
        self._seeder.shutdown(wait=True, cancel_futures=True)
        self._lookup.shutdown(wait=False, cancel_futures=True)
        with self._mu:
            ses, self._ses = self._ses, None
            if self._index is not None:
                self._index.stop()
                self._index = None
        if self._alerts is not None:
            self._alerts.join(timeout=5)
        if ses is not None:
            ses.pause()
            del ses  # the destructor waits for libtorrent's threads

    def set_peers(self, peers: Sequence[PeerAddr]) -> None:
        """Replace the known peers (cluster discovery); new downloads and seeds use the new list."""
        self.settings = replace(self.settings, peers=tuple(peers))

    @property
    def closing(self) -> threading.Event:
        return self._closing

    # -- alerts ------------------------------------------------------------------------------------

    def _alert_loop(self) -> None:
        ses = self._ses
        next_stats = 0.0
        while not self._closing.is_set():
            if time.monotonic() >= next_stats:  # counters for metrics arrive as a session_stats_alert
                ses.post_session_stats()
                next_stats = time.monotonic() + 1.0
            ses.wait_for_alert(200)
            for a in ses.pop_alerts():
                try:
                    self._dispatch(a)
                except Exception as e:  # a binding surprise must not kill the only alert reader
                    log.warning("peers.alert_error", alert=type(a).__name__, error=str(e))

    def _dispatch(self, a: Any) -> None:
        if isinstance(a, lt.session_stats_alert):
            v = a.values
            self._wire = {"uploaded_bytes": int(v.get("net.sent_payload_bytes", 0)),
                          "downloaded_bytes": int(v.get("net.recv_payload_bytes", 0)),
                          "peers": int(v.get("peer.num_peers_connected", 0))}
            return
        if isinstance(a, lt.torrent_removed_alert):
            t = self._transfers.get(str(a.info_hashes.v1))
            if t is not None:
                t.removed.set()
                t.poke()
            return
        if isinstance(a, lt.listen_failed_alert):
            log.error("peers.listen_failed", message=a.message())
            return
        if not isinstance(a, lt.torrent_alert):
            return
        try:
            ih = str(a.handle.info_hashes().v1)
        except RuntimeError:
            return
        if isinstance(a, lt.hash_failed_alert):
            seed = self._seed_by_hash(ih)
            if seed is not None:
                self._seed_corrupt(seed, a.piece_index)
                return
        t = self._transfers.get(ih)
        if t is None:
            return
        if isinstance(a, lt.torrent_finished_alert):
            t.finished.set()
        elif isinstance(a, lt.hash_failed_alert):
            t.hash_failures += 1
        elif isinstance(a, lt.peer_ban_alert):
            if str(a.endpoint[0]) not in t.banned:
                t.banned.append(str(a.endpoint[0]))
            log.warning("peers.peer_banned", peer=f"{a.endpoint[0]}:{a.endpoint[1]}", info_hash=ih[:12])
        elif isinstance(a, lt.file_error_alert):
            t.error = (a.error.value(), a.error.message(), a.filename())
        elif isinstance(a, lt.torrent_error_alert) and a.error.value():
            t.error = (a.error.value(), a.error.message(), "")
        elif isinstance(a, lt.cache_flushed_alert):
            t.flushes += 1
            t.flushed.set()
        elif isinstance(a, lt.file_completed_alert):
            t.completed_files.append(a.index)
        elif isinstance(a, lt.performance_alert):
            log.debug("peers.performance_warning", message=a.message())
        t.poke()

    # -- the index -----------------------------------------------------------------------------------

    def _serve_info(self, key: str) -> bytes | None:
        return self._infos.get(key)

    def find_info(self, key: str, lay: TorrentLayout) -> TorrentRef | None:
        """Ask every known peer's index for ``key``; keep info dicts that match ``lay`` exactly.

        When peers disagree (only possible if someone built it from other bytes) the one most peers
        serve wins; an info-hash whose bytes already failed a digest here is never taken again.
        """
        peers = list(self.settings.peers)
        if not peers:
            return None
        answers = list(self._lookup.map(lambda p: (p, fetch_info(p, key)), peers))
        found: dict[str, tuple[bytes, list[PeerAddr]]] = {}
        for peer, info in answers:
            if info is None:
                continue
            try:
                ih = check_info(info, lay)
            except TorrentError as e:
                log.warning("peers.metadata_rejected", peer=str(peer), key=key[:12], error=str(e))
                continue
            if ih in self._rejected.get(key, set()):
                continue
            found.setdefault(ih, (info, []))[1].append(peer)
        if not found:
            return None
        ih, (info, holders) = max(found.items(), key=lambda kv: len(kv[1][1]))
        return TorrentRef(key, info, ih, lay, tuple(holders))

    # -- seeding -----------------------------------------------------------------------------------

    def seed(self, store: Store, manifest: Manifest) -> Future[str | None]:
        """Seed a published snapshot from ``hub/blobs`` (piece hashes read from the blobs if unknown).

        Returns at once; the future gives the info-hash (None: nothing to seed). The origin slot
        this node held for the model is released once the torrent is served.
        """
        self.start()
        return self._seeder.submit(self._seed, store, manifest)

    def _seed(self, store: Store, manifest: Manifest) -> str | None:
        entries = [FileEntry(f.path, f.size, f.algo, f.digest) for f in manifest.files]
        key = plan_key(manifest.repo, manifest.commit, entries)
        try:
            with self._mu:
                if key in self._seeds:
                    return self._seeds[key].info_hash
            lay = layout(manifest.repo, manifest.commit, entries)
            if not lay.files:
                return None
            by_path = {e.path: e for e in entries}
            blobs = [store.layout.blob_path(manifest.repo, by_path[f.path].digest or "") for f in lay.files]
            for f, b in zip(lay.files, blobs, strict=True):
                if os.stat(b).st_size != f.size:
                    raise IntegrityError(f.path, f"blob {b.name} has size {os.stat(b).st_size}, expected {f.size}")
            info = self._cached_info(store, key, lay)
            if info is None:
                t0 = time.monotonic()
                info = build_info(lay, hash_pieces(blobs, lay))
                log.info("peers.hashed", repo=manifest.repo, commit=manifest.commit[:12], bytes=lay.total_bytes,
                         seconds=round(time.monotonic() - t0, 3))
                _write_info_cache(store, key, info)
            ih = info_hash(info)
            # Blobs the store still vouches for (size, mtime, inode as verified at publish) are served as
            # they are: a SHA-1 pass per piece would cost a seeding GPU node ~1.4 s of CPU per GB. Otherwise
            # seed_mode checks each piece on its first request. The receiver checks every piece either way.
            trusted = not self.settings.seed_verify and store.check(manifest).ok
            atp = _add_params(info, save_path=store.layout.agent_dir / "p2p" / "seed",
                              renamed={i: str(b) for i, b in enumerate(blobs)},
                              flags=lt.torrent_flags.upload_mode | (0 if trusted else lt.torrent_flags.seed_mode))
            if trusted:
                atp.have_pieces = [True] * lay.num_pieces
            with self._mu:
                if self._ses is None or self._closing.is_set():
                    return None
                handle = self._ses.add_torrent(atp)
                self._seeds[key] = _Seed(key, manifest.repo, manifest.commit, ih, handle)
                self._infos[key] = info
            self._connect(handle, self.settings.peers)
            log.info("peers.seeding", repo=manifest.repo, commit=manifest.commit[:12], info_hash=ih[:12],
                     pieces=lay.num_pieces, piece_length=lay.piece_length)
            return ih
        finally:
            self.gate.seeded(slot_key(manifest.repo, manifest.commit))

    def _cached_info(self, store: Store, key: str, lay: TorrentLayout) -> bytes | None:
        info = self._infos.get(key)
        if info is None:
            with contextlib.suppress(OSError):
                info = _info_cache_path(store, key).read_bytes()
        if info is None:
            return None
        try:
            check_info(info, lay)
        except TorrentError:
            return None
        return info

    def unseed(self, repo: str, commit: str) -> None:
        """Stop seeding a snapshot (call before its blobs are removed)."""
        with self._mu:
            gone = [s for s in self._seeds.values() if s.repo == repo and s.commit == commit]
            for s in gone:
                del self._seeds[s.key]
                self._infos.pop(s.key, None)
                if self._ses is not None:
                    self._ses.remove_torrent(s.handle)
        for s in gone:
            log.info("peers.unseeded", repo=repo, commit=commit[:12], info_hash=s.info_hash[:12])
        self.gate.unseeded(slot_key(repo, commit))

    def seeding(self) -> list[tuple[str, str, str]]:
        """(repo, commit, info-hash) of every seeded snapshot."""
        with self._mu:
            return sorted((s.repo, s.commit, s.info_hash) for s in self._seeds.values())

    def _seed_by_hash(self, ih: str) -> _Seed | None:
        with self._mu:
            return next((s for s in self._seeds.values() if s.info_hash == ih), None)

    def _seed_corrupt(self, seed: _Seed, piece: int) -> None:
        log.error("peers.seed_corrupt", repo=seed.repo, commit=seed.commit[:12], piece=piece,
                  error="a published blob no longer matches its piece hash; stopped seeding it")
        self.unseed(seed.repo, seed.commit)
        if self.on_corrupt is not None:
            self.on_corrupt(seed.repo, seed.commit)

    # -- downloading -------------------------------------------------------------------------------

    def reject(self, ref: TorrentRef) -> None:
        """Never use this info-hash for this plan again (its bytes failed the trusted digest)."""
        self._rejected.setdefault(ref.key, set()).add(ref.info_hash)
        self._infos.pop(ref.key, None)

    def download(self, ref: TorrentRef, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill,
                 progress: Progress) -> None:
        """Download ``entries`` of ``ref`` into ``fill``'s staging, then hand each file to the store.

        Raises DiskFullError (ENOSPC), IntegrityError (a file failed its digest: nothing of it is
        kept), Cancelled, or TransientSourceError when the swarm stops delivering for
        ``stall_timeout`` seconds (the caller falls back to the next source).
        """
        self.start()
        if ref.info_hash in self._rejected.get(ref.key, set()):
            raise SourceError(f"peers: torrent {ref.info_hash[:12]} delivered bytes that failed the trusted digest")
        wanted = {e.path: e for e in entries if e.size > 0}
        for e in entries:
            if e.size == 0:
                fill.write_stream(e, iter(()))
        if not wanted:
            return
        work = fill.dir / "p2p"
        renamed: dict[int, str] = {}
        targets: dict[int, tuple[FileEntry, Path]] = {}
        for i, f in enumerate(ref.layout.files):
            e = wanted.get(f.path)
            target = work / (f"{i}.part" if e is not None else f"skip-{i}")
            renamed[i] = str(target)
            if e is not None:
                targets[i] = (e, target)
        missing = set(wanted) - {e.path for e, _ in targets.values()}
        if missing:
            raise UnsafePathError(f"peers: {sorted(missing)[0]} is not in torrent {ref.info_hash[:12]}")
        _ensure_inside(work, fill.store.layout.staging_root)
        work.mkdir(parents=True, exist_ok=True)
        atp = _add_params(ref.info, save_path=work, renamed=renamed, flags=0)
        atp.file_priorities = [4 if f.path in wanted else 0 for f in ref.layout.files]
        atp.piece_priorities = piece_priorities(ref.layout, set(wanted), share=self._share())
        t = _Transfer()
        verifier = _Verifier(t, targets, fsync=fill.store.fsync)
        handle = None
        with self._mu:
            if self._ses is None:
                raise TransientSourceError("peers: the p2p service is stopped")
            if ref.info_hash in self._transfers:
                raise TransientSourceError(f"peers: torrent {ref.info_hash[:12]} is already being downloaded")
            self._transfers[ref.info_hash] = t
        blog = log.bind(repo=plan.repo, commit=plan.commit[:12], info_hash=ref.info_hash[:12])
        try:
            with self._mu:
                handle = self._ses.add_torrent(atp)
                self._infos.setdefault(ref.key, ref.info)  # others may join through this node meanwhile
            holders = list(dict.fromkeys([*ref.holders, *self.settings.peers]))  # every peer may hold pieces
            self._connect(handle, holders)
            blog.info("peers.download_start", files=len(wanted), bytes=sum(e.size for e in wanted.values()),
                      holders=[str(h) for h in holders])
            t0 = time.monotonic()
            self._wait_finished(handle, t, fill, progress, holders, verifier)
            t1 = time.monotonic()
            verifier.request_flush(handle)
            verifier.wait_flushed(FLUSH_TIMEOUT)
            verifier.poll()
            self._remove(handle, t)
            handle = None
            t2 = time.monotonic()
            _raise_storage_error(t, fill)  # a write that failed after its piece passed (pread writes later)
            downloaded = 0
            for i, (e, target) in targets.items():
                d = verifier.result(i)
                _check_written(target, e, fill)
                os.replace(target, fill.part_path(e))
                try:
                    fill.complete(e, d)
                except IntegrityError:
                    self.reject(ref)
                    blog.error("peers.digest_mismatch", file=e.path, hash_failures=t.hash_failures,
                               error="bytes from peers passed the piece hashes but not the trusted digest")
                    self.stats_bytes["rejected"] += e.size
                    raise
                downloaded += e.size
            self.stats_bytes["downloaded"] += downloaded
            _write_info_cache(fill.store, ref.key, ref.info)  # seeding it after publish needs no re-hash
            blog.info("peers.download_done", bytes=downloaded, hash_failures=t.hash_failures, banned=t.banned,
                      peers=t.peers_seen,
                      transfer_s=round(t1 - t0, 3), flush_s=round(t2 - t1, 3),
                      verify_s=round(time.monotonic() - t2, 3))
        finally:
            verifier.close()
            if handle is not None:  # failed: drop the partial files first, so writes parked on a full disk end
                for partial in (p for p in work.rglob("*") if p.is_file()):  # ours and libtorrent's part file
                    with contextlib.suppress(OSError):
                        os.truncate(partial, 0)
                self._remove(handle, t, delete=True)
            with self._mu:
                self._transfers.pop(ref.info_hash, None)
                if ref.key not in self._seeds:  # the torrent is gone: stop pointing others at it
                    self._infos.pop(ref.key, None)
            shutil.rmtree(work, ignore_errors=True)

    def _share(self) -> tuple[int, int] | None:
        """This node's place among the nodes it knows (itself and its static peers), when there are 3+."""
        ps = self.settings
        host = ps.listen_host if ps.listen_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        me = f"{host}:{ps.port or self.bt_port}"
        everyone = sorted({me, *(str(p) for p in ps.peers)})
        return (everyone.index(me), len(everyone)) if len(everyone) > 2 else None

    def _wait_finished(self, handle: Any, t: _Transfer, fill: Fill, progress: Progress,
                       holders: Sequence[PeerAddr], verifier: _Verifier) -> None:
        done = 0
        last_progress = last_connect = self.clock()
        while True:
            t.changed.wait(0.25)
            t.changed.clear()
            fill.check_stop()
            if self._closing.is_set():
                raise Cancelled("peers: the p2p service is stopping")
            _raise_storage_error(t, fill)
            verifier.poll(handle)
            st = handle.status()
            now = self.clock()
            t.peers_seen = max(t.peers_seen, st.num_peers)
            if st.total_wanted_done > done:
                progress.advance(st.total_wanted_done - done)
                done = st.total_wanted_done
                last_progress = now
            elif st.state in (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data):
                last_progress = now
            if t.finished.is_set() or (st.total_wanted and st.total_wanted_done >= st.total_wanted):
                return
            if now - last_progress > self.settings.stall_timeout:
                raise TransientSourceError(
                    f"peers: no progress for {self.settings.stall_timeout:g}s ({done} of {st.total_wanted} bytes, "
                    f"{st.num_peers} peers connected, {len(t.banned)} banned, {t.hash_failures} bad pieces)")
            if now - last_connect > RECONNECT_EVERY and st.num_peers < len(holders):
                # Peers that joined after our first try refused then (no such torrent yet), and libtorrent
                # gives a refused peer up; asking again is a no-op for peers already connected.
                self._connect(handle, holders)
                last_connect = now


    def _remove(self, handle: Any, t: _Transfer, *, delete: bool = False) -> None:
        """Remove a torrent and wait for libtorrent to let go of its files.

        With pread disk I/O, writes that hit ENOSPC stay queued and hold the removal until there is
        space again; on failure the files are truncated (by the caller) and deleted with the torrent.
        """
        with self._mu:
            if self._ses is not None:
                self._ses.remove_torrent(handle, lt.session.delete_files if delete else 0)
        if not t.removed.wait(REMOVE_TIMEOUT if delete else FLUSH_TIMEOUT):
            log.warning("peers.remove_slow", seconds=REMOVE_TIMEOUT if delete else FLUSH_TIMEOUT)

    def _connect(self, handle: Any, peers: Sequence[PeerAddr]) -> None:
        own = {self.bt_port}
        for p in peers:
            try:
                ip = socket.getaddrinfo(p.host, p.port, type=socket.SOCK_STREAM)[0][4][0]
            except OSError as e:
                log.warning("peers.unresolvable", peer=str(p), error=str(e))
                continue
            if p.port in own and ip in ("127.0.0.1", "::1"):
                continue
            with contextlib.suppress(RuntimeError):
                handle.connect_peer((ip, p.port))

    def stats(self) -> dict[str, int]:
        """Counters for metrics: bytes up/down over the wire, connected peers, seeded snapshots."""
        with self._mu:
            if self._ses is None:
                return {}
            return {**self._wire, "seeding": len(self._seeds),
                    "verified_bytes": self.stats_bytes["downloaded"], "rejected_bytes": self.stats_bytes["rejected"]}


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


def _listen_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _add_params(info: bytes, *, save_path: Path, renamed: dict[int, str], flags: int) -> Any:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(b"d4:info" + info + b"e")
    atp.save_path = str(save_path)
    atp.renamed_files = renamed
    atp.flags = flags  # not auto-managed, not paused: starts now, never queued
    return atp


def _ensure_inside(path: Path, root: Path) -> None:
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise UnsafePathError(f"peers: {path} is outside {root}")


def _read_range(paths: Sequence[Path], sizes: Sequence[int], start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of the files concatenated, read in READ_CHUNK pieces."""
    pos = 0
    for path, size in zip(paths, sizes, strict=True):
        lo, hi = max(start, pos), min(end, pos + size)
        if lo < hi:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, lo - pos, hi - lo, os.POSIX_FADV_SEQUENTIAL)
                off = lo - pos
                while off < hi - pos:
                    chunk = os.pread(fd, min(READ_CHUNK, hi - pos - off), off)
                    if not chunk:
                        raise IntegrityError(str(path), f"file ended at {off} bytes, expected {size}")
                    off += len(chunk)
                    yield chunk
            finally:
                os.close(fd)
        pos += size


def hash_pieces(paths: Sequence[Path], lay: TorrentLayout, workers: int = HASH_THREADS) -> bytes:
    """The torrent's piece hashes from the files, ``workers`` contiguous piece ranges at once.

    Pieces are independent, so a slot holder with many cores hashes a 140 GB model in parallel (hashlib
    releases the GIL); on one core this is one sequential read.
    """
    n, plen = lay.num_pieces, lay.piece_length
    sizes = [f.size for f in lay.files]
    total = lay.total_bytes
    bounds = [n * k // workers for k in range(workers + 1)]
    ranges = [(bounds[k] * plen, min(total, bounds[k + 1] * plen)) for k in range(workers) if bounds[k] < bounds[k + 1]]
    if len(ranges) == 1:
        return piece_hashes(_read_range(paths, sizes, 0, total), plen)
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="p2p-hash") as pool:
        parts = pool.map(lambda r: piece_hashes(_read_range(paths, sizes, *r), plen), ranges)
        return b"".join(parts)


def _info_cache_path(store: Store, key: str) -> Path:
    return store.layout.agent_dir / "p2p" / "torrents" / f"{key}.info"


def _write_info_cache(store: Store, key: str, info: bytes) -> None:
    p = _info_cache_path(store, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_bytes(info)
    os.replace(tmp, p)
