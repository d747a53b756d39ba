"""One libtorrent session per agent: a torrent per file; seed, share while filling, download, serve the index.

    seed(store, manifest)      hub/models--o--n/blobs/<digest>  <- read-only, seed_mode + upload_mode
    share_fill(fill)           each file verified in staging is served at once (staging/.../blobs/<digest>),
                               and moves to its published blob on ``seed``
    download(swarm, ..., fill) download.py: .agent/staging/.../p2p/<n>.part -> hashed -> Fill.complete
    index                      GET /p2p/v1/files/<commit key>, /p2p/v1/info/<file key> on port+1 (metadata only)

Rules that keep peers untrusted and the disk safe:
- Every path handed to libtorrent is computed here from the cache layout: a published blob (read
  only: ``upload_mode`` means libtorrent never requests, so never writes, a piece of a seeded
  torrent) or a file under this fill's staging folder. Names inside a peer's info dict never reach
  the disk (every file is renamed); the part file of skipped pieces lives in staging too.
- ``seed_mode`` hashes each piece on its first request, so only pieces that pass their hash are
  served; a failing one stops the seed and reports the model (``on_corrupt``).
- A finished download is flushed and the torrent removed before its file is read (``is_seeding``
  can turn true before the data is on disk), then the file is re-hashed against the plan's
  trusted digest by the store. Piece hashes only reject bad pieces early and get the sender banned
  (libtorrent's smart-ban plugin).
- Alerts are popped on one thread and turned into plain values at once: an alert object must not
  outlive the next ``pop_alerts`` (libtorrent #7429), and ``set_alert_notify`` can deadlock.
"""

from __future__ import annotations

import atexit
import contextlib
import os
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

from agent.cache.manifest import Manifest, ManifestFile
from agent.cache.store import Fill, Store
from agent.core.plan import FileEntry, ModelPlan
from agent.core.torrent import (
    FileTorrent,
    TorrentError,
    TorrentLayout,
    build_info,
    check_info,
    commit_key,
    file_torrents,
    info_hash,
    piece_hashes,
)
from agent.errors import IntegrityError, SourceError
from agent.sources.base import Progress
from agent.sources.peers.download import SwarmDownload
from agent.sources.peers.index import IndexServer, fetch_info, fetch_listing
from agent.sources.peers.settings import PeerAddr, PeerSettings
from agent.sources.peers.slots import DirSlots, LocalSlots, OriginGate, OriginSlots, slot_key

log = structlog.get_logger("agent.sources.peers")
READ_CHUNK = 8 * 1024 * 1024
FLUSH_TIMEOUT = 60.0
REMOVE_TIMEOUT = 10.0
INFO_QUORUM = 3  # info dicts asked for per file (from the peers that list it) before taking the most common

# On top of high_performance_seed(); measured with bench/fill_peers.py (its docstring has the figures).
# Disk and hashing threads scale with cores: on the 2-core VM one hashing and two disk threads beat 2+4.
_CORES = os.cpu_count() or 2
HASH_THREADS = min(8, _CORES)  # piece hashes of a model this node filled from the origin
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


@dataclass(frozen=True)
class TorrentRef:
    """An info dict accepted for one file: it matched the layout derived from trusted metadata."""

    key: str
    info: bytes
    info_hash: str
    layout: TorrentLayout
    holders: tuple[PeerAddr, ...] = ()


@dataclass(frozen=True)
class Swarm:
    """What the peers source resolved for a plan: each file's torrent as derived from trusted metadata."""

    repo: str
    commit: str
    commit_key: str
    files: tuple[FileTorrent, ...]
    holders: tuple[PeerAddr, ...] = ()

    @classmethod
    def of(cls, repo: str, commit: str, files: Sequence[FileEntry], holders: Sequence[PeerAddr] = ()) -> Swarm:
        """Raises TorrentError when a file has no trusted digest (bytes from peers could not be checked)."""
        return cls(repo, commit, commit_key(repo, commit), file_torrents(repo, commit, files), tuple(holders))


@dataclass
class _Transfer:
    """What the alert thread learned about one torrent; read by the thread that waits for it."""

    changed: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    flushed: threading.Event = field(default_factory=threading.Event)
    removed: threading.Event = field(default_factory=threading.Event)
    hash_failures: int = 0
    banned: list[str] = field(default_factory=list)
    flushes: int = 0  # cache_flushed alerts received
    error: tuple[int, str, str] | None = None  # errno-like value, message, file

    def poke(self) -> None:
        self.changed.set()


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
    key: str  # file key
    repo: str
    commit: str
    info_hash: str
    handle: Any
    ckey: str  # commit key: the index lists the file under it
    staged: bool  # served from this node's staging (its fill still runs); moves to hub/blobs on publish


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
        self._seeds: dict[str, _Seed] = {}  # file key -> seed
        self._infos: dict[str, bytes] = {}  # file key -> info dict served by the index
        self._listing: dict[str, set[str]] = {}  # commit key -> file keys this node serves
        self._holders: dict[str, tuple[PeerAddr, ...]] = {}  # slot key -> its origin slot holders (cluster Leases)
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
            self._index = IndexServer(ps.listen_host, ps.bound_index_port, self._serve_info,
                                      self._serve_listing).start()
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

    def learn_holders(self, key: str, holders: Sequence[PeerAddr]) -> None:
        """The origin slot holders of one model (``repo@commit``), as last read from its Leases: the indexes
        to ask for that model's files. Kept per model, so two models filling at once never hide each other's."""
        with self._mu:
            self._holders[key] = tuple(holders)

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
            if isinstance(a, lt.file_error_alert) and (seed := self._seed_by_hash(ih)) is not None:
                self._seed_file_error(seed, f"{a.error.message()} on {a.filename()}")
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
        elif isinstance(a, lt.performance_alert):
            log.debug("peers.performance_warning", message=a.message())
        t.poke()

    # -- the index -----------------------------------------------------------------------------------

    def _serve_info(self, key: str) -> bytes | None:
        return self._infos.get(key)

    def _serve_listing(self, ckey: str) -> list[str]:
        with self._mu:
            return sorted(self._listing.get(ckey, ()))

    def find_files(self, swarm: Swarm) -> dict[str, list[PeerAddr]]:
        """file key -> the known peers that list it for ``swarm``'s snapshot (one small GET per peer)."""
        with self._mu:
            learned = self._holders.get(slot_key(swarm.repo, swarm.commit), ())
        peers = list(dict.fromkeys([*swarm.holders, *learned, *self.settings.peers]))
        if not peers:
            return {}
        wanted = {ft.key for ft in swarm.files}
        found: dict[str, list[PeerAddr]] = {}
        for peer, keys in self._lookup.map(lambda p: (p, fetch_listing(p, swarm.commit_key)), peers):
            for k in (keys or set()) & wanted:
                found.setdefault(k, []).append(peer)
        return found

    def fetch_torrent(self, ft: FileTorrent, peers: Sequence[PeerAddr]) -> TorrentRef | None:
        """The first info dict a listing peer serves for ``ft`` that matches its layout exactly.

        An info-hash whose bytes already failed the trusted digest here is never taken again; when that is
        all the peers offer, SourceError (waiting would not change it).
        """
        refused = None
        offered: dict[str, tuple[bytes, list[PeerAddr]]] = {}
        for peer in peers:
            if sum(len(v[1]) for v in offered.values()) >= INFO_QUORUM:
                break
            info = fetch_info(peer, ft.key)
            if info is None:
                continue
            try:
                ih = check_info(info, ft.layout)
            except TorrentError as e:
                log.warning("peers.metadata_rejected", peer=str(peer), file=ft.entry.path, error=str(e))
                continue
            if ih in self._rejected.get(ft.key, set()):
                refused = ih
                continue
            offered.setdefault(ih, (info, []))[1].append(peer)
        if offered:  # peers can only disagree if one built it from other bytes: the most common one wins
            ih, (info, _) = max(offered.items(), key=lambda kv: len(kv[1][1]))
            return TorrentRef(ft.key, info, ih, ft.layout, tuple(peers))
        if refused is not None:
            raise SourceError(f"peers: torrent {refused[:12]} of {ft.entry.path} delivered bytes that failed the "
                              "trusted digest, and no peer offers another")
        return None

    # -- seeding and sharing -------------------------------------------------------------------------

    def seed(self, store: Store, manifest: Manifest) -> Future[int]:
        """Seed a published snapshot from ``hub/blobs``: one torrent per file (piece hashes read if unknown).

        Returns at once; the future gives the number of files seeded. Files this node shared from staging
        during the fill move to their published blob. The origin slot this node held for the model is
        released (or kept as the swarm's beacon) once the files are served.
        """
        self.start()
        fut = self._seeder.submit(self._seed, store, manifest)
        fut.add_done_callback(_log_failure("peers.seed_failed", repo=manifest.repo, commit=manifest.commit[:12]))
        return fut

    def _seed(self, store: Store, manifest: Manifest) -> int:
        try:
            entries = [FileEntry(f.path, f.size, f.algo, f.digest) for f in manifest.files if f.digest]
            fts = file_torrents(manifest.repo, manifest.commit, entries)
            # Blobs the store still vouches for (size, mtime, inode as verified at publish) are served as
            # they are: a SHA-1 pass per piece would cost a seeding GPU node ~1.4 s of CPU per GB. Otherwise
            # seed_mode checks each piece on its first request. The receiver checks every piece either way.
            trusted = not self.settings.seed_verify and store.check(manifest).ok
            n = 0
            for ft in fts:  # one file that cannot be seeded does not keep the others from it
                blob = store.layout.blob_path(manifest.repo, ft.entry.digest or "")
                try:
                    if os.stat(blob).st_size != ft.entry.size:
                        raise IntegrityError(ft.entry.path, f"blob {blob.name} has size {os.stat(blob).st_size}, "
                                             f"expected {ft.entry.size}")
                    if self._add_seed(store, manifest.repo, manifest.commit, ft, blob, trusted=trusted,
                                      staged=False):
                        n += 1
                except (OSError, RuntimeError, TorrentError, IntegrityError) as e:
                    log.warning("peers.seed_file_failed", repo=manifest.repo, commit=manifest.commit[:12],
                                file=ft.entry.path, error=str(e))
            if n:
                log.info("peers.seeding", repo=manifest.repo, commit=manifest.commit[:12], files=n)
            return n
        finally:
            self.gate.seeded(slot_key(manifest.repo, manifest.commit))

    def share_fill(self, fill: Fill) -> None:
        """Share each file of ``fill`` from staging as soon as it is verified (once per fill)."""
        if getattr(fill, "_p2p_shared", False):
            return
        fill._p2p_shared = True  # type: ignore[attr-defined]
        repo, commit, store = fill.plan.repo, fill.plan.commit, fill.store

        def hook(entry: FileEntry, mf: ManifestFile, blob: Path) -> None:
            if not entry.trusted or not entry.digest or entry.size == 0 or self._closing.is_set():
                return
            ft = file_torrents(repo, commit, [FileEntry(entry.path, entry.size, entry.algo, entry.digest)])[0]
            with contextlib.suppress(RuntimeError):  # the seeder is shut down: the service is stopping
                self._seeder.submit(self._share_staged, store, repo, commit, ft, blob)

        fill.on_complete.append(hook)
        fill.on_published.append(lambda manifest: self.seed(store, manifest))  # staged seeds -> hub/blobs
        fill.on_dropped.append(lambda: self.unshare_staged(repo, commit))

    def unshare_staged(self, repo: str, commit: str) -> None:
        """A fill's staging is being deleted: stop serving (and holding open) the files shared from it."""
        with self._mu:
            gone = [s for s in self._seeds.values() if s.staged and s.repo == repo and s.commit == commit]
        for s in gone:
            self._drop_seed(s)

    def _share_staged(self, store: Store, repo: str, commit: str, ft: FileTorrent, blob: Path) -> None:
        try:
            if self._add_seed(store, repo, commit, ft, blob, trusted=True, staged=True):
                log.info("peers.sharing_staged", repo=repo, commit=commit[:12], file=ft.entry.path)
        except (OSError, RuntimeError, TorrentError, IntegrityError) as e:  # e.g. published or dropped meanwhile
            log.info("peers.share_skipped", file=ft.entry.path, error=str(e))

    def _add_seed(self, store: Store, repo: str, commit: str, ft: FileTorrent, path: Path, *,
                  trusted: bool, staged: bool) -> bool:
        """Serve ``path`` as ``ft``'s torrent (read only). A staged seed of the same file is replaced."""
        with self._mu:
            old = self._seeds.get(ft.key)
        if (old is not None and not old.staged) or self._closing.is_set():
            return False
        info = self._cached_info(store, ft)
        if info is None:
            t0 = time.monotonic()
            info = build_info(ft.layout, hash_pieces([path], ft.layout))
            log.debug("peers.hashed", file=ft.entry.path, bytes=ft.entry.size, seconds=round(time.monotonic() - t0, 3))
            _write_info_cache(store, ft.key, info)
        ih = info_hash(info)
        if old is not None:  # staged -> published: the same torrent, its file moved to hub/blobs
            self._drop_seed(old, wait=True)
        atp = _add_params(info, save_path=path.parent, renamed={0: str(path)},
                          flags=lt.torrent_flags.upload_mode | (0 if trusted else lt.torrent_flags.seed_mode))
        if trusted:
            atp.have_pieces = [True] * ft.layout.num_pieces
        ckey = commit_key(repo, commit)
        with self._mu:
            if self._ses is None or self._closing.is_set():
                return False
            handle = self._ses.add_torrent(atp)
            self._seeds[ft.key] = _Seed(ft.key, repo, commit, ih, handle, ckey, staged)
            self._infos[ft.key] = info
            self._listing.setdefault(ckey, set()).add(ft.key)
        self._connect(handle, self.settings.peers)
        return True

    def _drop_seed(self, seed: _Seed, *, wait: bool = False) -> None:
        """Stop serving one file (a no-op for a seed already dropped or replaced)."""
        t = _Transfer()
        with self._mu:
            if self._seeds.get(seed.key) is not seed:
                return
            del self._seeds[seed.key]
            keys = self._listing.get(seed.ckey)
            if keys is not None:
                keys.discard(seed.key)
                if not keys:
                    del self._listing[seed.ckey]
            if self._ses is None:
                return
            if wait:
                self._transfers[seed.info_hash] = t
            try:
                self._ses.remove_torrent(seed.handle)
            except RuntimeError:  # already gone (libtorrent: invalid torrent handle)
                self._transfers.pop(seed.info_hash, None)
                return
        if wait:
            try:
                self._wait_removed(t, REMOVE_TIMEOUT)
            finally:
                with self._mu:
                    if self._transfers.get(seed.info_hash) is t:
                        del self._transfers[seed.info_hash]

    def _cached_info(self, store: Store, ft: FileTorrent) -> bytes | None:
        info = self._infos.get(ft.key)
        if info is None:
            with contextlib.suppress(OSError):
                info = _info_cache_path(store, ft.key).read_bytes()
        if info is None:
            return None
        try:
            check_info(info, ft.layout)
        except TorrentError:
            return None
        return info

    def unseed(self, repo: str, commit: str) -> None:
        """Stop seeding a snapshot (call before its blobs are removed)."""
        with self._mu:
            gone = [s for s in self._seeds.values() if s.repo == repo and s.commit == commit]
        for s in gone:
            self._drop_seed(s)
            self._infos.pop(s.key, None)
        if gone:
            log.info("peers.unseeded", repo=repo, commit=commit[:12], files=len(gone))
        self.gate.unseeded(slot_key(repo, commit))

    def seeding(self) -> list[tuple[str, str, str]]:
        """(repo, commit, info-hash) of every seeded file."""
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

    def _seed_file_error(self, seed: _Seed, message: str) -> None:
        """A seeded file cannot be read (a staged file dropped by a failed fill, a blob evicted): stop serving it."""
        # A staged file moves into hub/ at publish: a read in the moment before its seed moves too is expected.
        (log.info if seed.staged else log.warning)("peers.seed_unreadable", repo=seed.repo, commit=seed.commit[:12],
                                                   staged=seed.staged, error=message)
        self._drop_seed(seed)

    # -- downloading -------------------------------------------------------------------------------

    def reject(self, ref: TorrentRef) -> None:
        """Never use this info-hash for this file again (its bytes failed the trusted digest)."""
        self._rejected.setdefault(ref.key, set()).add(ref.info_hash)

    def download(self, swarm: Swarm, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress,
                 *, alive: Callable[[], bool] = lambda: False) -> None:
        """Download ``entries`` file by file as peers list them, into ``fill``'s staging.

        Each file's torrent is added as soon as some peer lists it (a slot holder lists a file the moment
        it is verified in its staging), finished files are re-hashed against the trusted digest and shared
        from here at once. ``alive()`` says whether a slot holder is still filling: files nobody lists are
        waited for up to ``holder_wait`` while it is, ``stall_timeout`` when not. Raises DiskFullError,
        IntegrityError (a file failed its digest: nothing of it is kept), Cancelled, or
        TransientSourceError (the caller falls back to the next source).
        """
        self.start()
        self.share_fill(fill)
        SwarmDownload(self, swarm, plan, entries, fill, progress, alive).run()

    def _share(self) -> tuple[int, int] | None:
        """This node's place among the nodes it knows (itself and its static peers), when there are 3+."""
        ps = self.settings
        host = ps.listen_host if ps.listen_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        me = f"{host}:{ps.port or self.bt_port}"
        everyone = sorted({me, *(str(p) for p in ps.peers)})
        return (everyone.index(me), len(everyone)) if len(everyone) > 2 else None

    def _remove(self, handle: Any, t: _Transfer, *, delete: bool = False) -> bool:
        """Remove a torrent and wait for libtorrent to let go of its files.

        With pread disk I/O, writes that hit ENOSPC stay queued and hold the removal until there is
        space again; on failure the files are truncated (by the caller) and deleted with the torrent.
        """
        with self._mu:
            if self._ses is not None:
                with contextlib.suppress(RuntimeError):  # already gone
                    self._ses.remove_torrent(handle, lt.session.delete_files if delete else 0)
        return self._wait_removed(t, REMOVE_TIMEOUT if delete else FLUSH_TIMEOUT)

    def _wait_removed(self, t: _Transfer, timeout: float) -> bool:
        """Wait for libtorrent's torrent_removed alert; a stopping service reads no more alerts, so stop waiting.
        True once libtorrent has let go of the files."""
        deadline = time.monotonic() + timeout
        while not t.removed.wait(0.1):
            if self._closing.is_set():
                return False
            if time.monotonic() > deadline:
                log.warning("peers.remove_slow", seconds=timeout)
                return False
        return True

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
            return {**self._wire, "seeding": len({(s.repo, s.commit) for s in self._seeds.values() if not s.staged}),
                    "seeding_files": len(self._seeds),
                    "verified_bytes": self.stats_bytes["downloaded"], "rejected_bytes": self.stats_bytes["rejected"]}


def _listen_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _add_params(info: bytes, *, save_path: Path, renamed: dict[int, str], flags: int) -> Any:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(b"d4:info" + info + b"e")
    atp.save_path = str(save_path)
    atp.renamed_files = renamed
    atp.flags = flags  # not auto-managed, not paused: starts now, never queued
    return atp


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


def _log_failure(event: str, **kw: str) -> Callable[[Future[Any]], None]:
    """A done-callback for background work whose future nobody reads: a failure is logged, not lost."""
    def done(fut: Future[Any]) -> None:
        if not fut.cancelled() and (e := fut.exception()) is not None:
            log.warning(event, error=str(e), error_type=type(e).__name__, **kw)
    return done
