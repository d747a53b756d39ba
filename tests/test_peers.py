"""The peers source on real libtorrent sessions over loopback: fills from a seeder, and every fault of
issue 13 (corrupt pieces, a seed killed mid-transfer, no peers, another commit's torrent, a full disk).

Nodes listen on distinct loopback addresses (127.0.0.1/.2/.3) so a ban names exactly one of them.
Small models (a few MiB, 1 MiB pieces); stall timeouts of a second or two keep every test short.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt
import pytest
import structlog

import tests.peers.hub_fixtures as hub_fixtures
from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core import torrent as T
from agent.core.plan import FileEntry
from agent.core.spec import FileFilter
from agent.errors import Cancelled, DiskFullError, TransientSourceError
from agent.modelgen import MiB, make_hub_model, make_model_dir, write_hub_layout
from agent.runtime.fill import FillFailed, FillResult, fill_model
from agent.sources.base import NullProgress, Source, SourceSettings
from agent.sources.hub import HubSource
from agent.sources.peers.index import IndexServer
from agent.sources.peers.service import PeerService, session_settings
from agent.sources.peers.settings import PeerAddr, PeerSettings
from agent.sources.peers.slots import DirSlots, SlottedSource
from agent.sources.peers.source import PeerSource
from agent.sources.pvc import PvcSource
from tests.conftest import agent_cmd
from tests.peers.hub_server import HubServer, wait_for
from tests.peers.net import free_port, free_port_pair

hub = hub_fixtures.hub
hub_session = hub_fixtures.hub_session
hub_models = hub_fixtures.hub_models
REPO = "org/swarm"
SEED_WAIT = 30.0


@dataclass
class Origin:
    root: Path
    commit: str  # main
    commit_dev: str  # another commit of the same repo

    def source(self) -> PvcSource:
        return PvcSource(self.root)


@dataclass
class Node:
    name: str
    store: Store
    service: PeerService
    host: str

    @property
    def addr(self) -> PeerAddr:
        return self.service.addr(self.host)

    def sources(self, origin: Source) -> list[Source]:
        return [PeerSource(self.service, [origin]), SlottedSource(origin, self.service.gate, self.service)]

    def fill(self, origin: Source, revision: str = "main", **kw: object) -> FillResult:
        return fill_model(self.store, self.sources(origin), REPO, revision, **kw)  # type: ignore[arg-type]

    def seed(self, manifest: Manifest) -> str | None:
        return self.service.seed(self.store, manifest).result(timeout=SEED_WAIT)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    hub_dir = tmp_path / "pvc" / "hub"
    commit = make_hub_model(hub_dir, REPO, weight_bytes=6 * MiB, shards=2, refs=("main",))
    dev = make_hub_model(hub_dir, REPO, weight_bytes=3 * MiB, shards=1, seed=1, refs=("dev",))
    return Origin(tmp_path / "pvc", commit, dev)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str, *, host: str = "127.0.0.1", peers: tuple[Node | PeerAddr, ...] = (),
             store: Store | None = None, **kw: object) -> Node:
        kw.setdefault("stall_timeout", 2.0)
        kw.setdefault("poll_interval", 0.05)
        kw.setdefault("port", 0)
        kw.setdefault("index_port", 0 if kw["port"] == 0 else None)
        addrs = tuple(p.addr if isinstance(p, Node) else p for p in peers)
        ps = PeerSettings(listen_host=host, peers=addrs, **kw)  # type: ignore[arg-type]
        node = Node(name, store or Store(tmp_path / name), PeerService(ps).start(), host)
        made.append(node)
        return node

    yield make
    for n in made:
        n.service.stop()


def seeder(make_node: Callable[..., Node], origin: Origin, name: str = "seed", **kw: object) -> Node:
    node = make_node(name, **kw)
    res = fill_model(node.store, [origin.source()], REPO, "main")
    assert node.seed(res.manifest) is not None
    return node


def snapshot(store: Store, commit: str) -> dict[str, bytes]:
    snap = store.layout.snapshot_dir(REPO, commit)
    return {p.relative_to(snap).as_posix(): p.read_bytes() for p in sorted(snap.rglob("*")) if p.is_file()}


def staging_leftovers(store: Store) -> list[str]:
    root = store.layout.staging_root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "p2p" in p.parts) if root.is_dir() else []


# -- the happy path ------------------------------------------------------------------------------------


def test_leecher_fills_from_a_seeder_without_origin_bytes(hub: HubServer, hub_models: hub_fixtures.HubModels,
                                                           make_node: Callable[..., Node]) -> None:
    """Origin = the loopback Hub: the seeder reads the model from it once, the leecher reads only metadata."""
    def hub_source() -> HubSource:
        return HubSource(SourceSettings(hf_endpoint=hub.url, hf_token=hub_fixtures.TOKEN, timeout=5))

    def origin_bytes() -> int:
        return sum(r.bytes_sent for r in hub.requests(method="GET") if "/resolve/" in r.path or r.origin == "cdn")

    seed = make_node("seed")
    first = fill_model(seed.store, [hub_source()], "org/tiny", "main")
    seed_bytes = origin_bytes()
    assert seed_bytes >= first.manifest.total_bytes
    assert seed.service.seed(seed.store, first.manifest).result(SEED_WAIT)

    leech = make_node("leech", host="127.0.0.2", peers=(seed,))
    src = hub_source()
    sources = [PeerSource(leech.service, [src]), SlottedSource(src, leech.service.gate, leech.service)]
    res = fill_model(leech.store, sources, "org/tiny", "main")
    assert res.source.startswith("peers") and res.fetched_bytes == first.manifest.total_bytes
    assert origin_bytes() == seed_bytes  # not one file byte from the origin for the leecher
    m = res.manifest
    assert m.commit == hub_models.commit and m.level == "verified"  # the Hub's digests are the reference
    assert leech.store.check(m, full=True).ok
    assert seed.store.check(first.manifest).ok  # seeding left blobs untouched (mtime, inode, size)
    assert staging_leftovers(leech.store) == []


def test_an_empty_file_is_written_by_the_follower_not_shared(tmp_path: Path, make_node: Callable[..., Node]) -> None:
    """Empty files have no torrent: the follower writes them itself and the snapshot is still complete."""
    work = tmp_path / "gen"
    make_model_dir(work, weight_bytes=2 * MiB, shards=1)
    (work / "empty.txt").write_bytes(b"")
    commit = write_hub_layout(work, tmp_path / "pvc" / "hub", REPO)
    src = PvcSource(tmp_path / "pvc")
    seed = make_node("seed")
    seed.seed(fill_model(seed.store, [src], REPO, "main").manifest)
    leech = make_node("leech", host="127.0.0.2", peers=(seed,))
    res = leech.fill(src)
    assert res.source.startswith("peers") and "empty.txt" in {f.path for f in res.manifest.files}
    assert snapshot(leech.store, commit) == snapshot(seed.store, commit)
    assert snapshot(leech.store, commit)["empty.txt"] == b""


def test_every_node_derives_the_same_info_hash(origin: Origin, make_node: Callable[..., Node]) -> None:
    a, b = make_node("a"), make_node("b")
    a.seed(fill_model(a.store, [origin.source()], REPO, "main").manifest)
    b.seed(fill_model(b.store, [origin.source()], REPO, "main").manifest)
    m = a.store.manifest(REPO, origin.commit)
    assert m is not None
    assert a.service.seeding() == b.service.seeding() and len(a.service.seeding()) == len(m.files)  # one per file
    # the same computed in a fresh interpreter (other hash seed, other dict order) from the blob alone
    big = max(m.files, key=lambda f: f.size)
    row = [big.path, big.size, big.algo, big.digest, str(a.store.layout.blob_path(REPO, big.digest))]
    code = (
        "import json,sys\n"
        "from agent.core import torrent as T\nfrom agent.core.plan import FileEntry\n"
        "repo, commit, (p, s, a, d, blob) = json.load(sys.stdin)\n"
        "(ft,) = T.file_torrents(repo, commit, [FileEntry(p, s, a, d)])\n"
        "data = iter([open(blob, 'rb').read()])\n"
        "print(ft.key, T.info_hash(T.build_info(ft.layout, T.piece_hashes(data, ft.layout.piece_length))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([REPO, origin.commit, row]),
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    key, ih = out.stdout.split()
    assert (REPO, origin.commit, ih) in a.service.seeding()
    # libtorrent reads our info dict the same way
    ti = lt.torrent_info(b"d4:info" + a.service._infos[key] + b"e")
    assert str(ti.info_hashes().v1) == ih and ti.total_size() == big.size


# -- faults ---------------------------------------------------------------------------------------------


def corrupt_peer(tmp_path: Path, seed: Node, commit: str, host: str = "127.0.0.3") -> tuple[object, IndexServer]:
    """A peer that claims every piece of the real torrents but holds flipped bytes, and serves the real info
    dicts from its own index: what a node with a rotten disk (or a hostile one) looks like to others."""
    m = seed.store.manifest(REPO, commit)
    assert m is not None
    fts = T.file_torrents(REPO, commit, [FileEntry(f.path, f.size, f.algo, f.digest) for f in m.files])
    infos = {ft.key: seed.service._infos[ft.key] for ft in fts}
    d = tmp_path / "rotten"
    d.mkdir()
    ses = lt.session(lt.session_params(session_settings(PeerSettings(), f"{host}:0")))
    for i, ft in enumerate(fts):
        data = bytearray(seed.store.layout.blob_path(REPO, m.by_path()[ft.entry.path].digest).read_bytes())
        for j in range(0, len(data), 4096):
            data[j] ^= 0xFF
        (d / str(i)).write_bytes(bytes(data))
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(b"d4:info" + infos[ft.key] + b"e")
        atp.save_path = str(d)
        atp.renamed_files = {0: str(d / str(i))}
        atp.have_pieces = [True] * ft.layout.num_pieces  # trusted resume data: served without a check
        atp.flags = 0
        ses.add_torrent(atp)
    ckey = T.commit_key(REPO, commit)
    index = IndexServer(host, 0, infos.get, lambda k: sorted(infos) if k == ckey else []).start()
    return ses, index


def test_corrupt_peer_is_banned_and_nothing_bad_is_published(tmp_path: Path, origin: Origin,
                                                             make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin, upload_rate=3 * MiB)  # slow honest seed: the rotten one gets requests
    ses, index = corrupt_peer(tmp_path, seed, origin.commit)
    try:
        rotten = PeerAddr("127.0.0.3", ses.listen_port(), index.port)  # type: ignore[attr-defined]
        leech = make_node("leech", host="127.0.0.2", peers=(rotten, seed), stall_timeout=10.0)
        with structlog.testing.capture_logs() as events:
            res = leech.fill(origin.source())
    finally:
        index.stop()
        del ses
    assert res.source.startswith("peers"), "\n".join(str(e) for e in events if e["log_level"] != "debug")
    assert snapshot(leech.store, origin.commit) == snapshot(seed.store, origin.commit)
    assert leech.store.check(res.manifest, full=True).ok
    banned = [e["peer"] for e in events if e["event"] == "peers.peer_banned"]
    assert banned and all(p.startswith("127.0.0.3:") for p in banned), banned
    done = next(e for e in events if e["event"] == "peers.download_done")
    assert done["hash_failures"] >= 1 and done["banned"] == ["127.0.0.3"]
    assert staging_leftovers(leech.store) == []


def test_only_corrupt_peers_fall_back_to_origin(tmp_path: Path, origin: Origin,
                                                make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin)
    ses, index = corrupt_peer(tmp_path, seed, origin.commit)
    try:
        seed.service.unseed(REPO, origin.commit)  # the honest copy is gone; its info dict lives on in the liar
        rotten = PeerAddr("127.0.0.3", ses.listen_port(), index.port)  # type: ignore[attr-defined]
        leech = make_node("leech", host="127.0.0.2", peers=(rotten,), stall_timeout=3.0)
        with structlog.testing.capture_logs() as events:
            res = leech.fill(origin.source())
    finally:
        index.stop()
        del ses
    assert res.source == origin.source().label
    assert any(e["event"] == "peers.peer_banned" for e in events)
    failed = [e for e in events if e["event"] == "fill.source_failed"]
    assert len(failed) == 1 and "no progress" in failed[0]["error"]
    assert snapshot(leech.store, origin.commit) == snapshot(seed.store, origin.commit)
    assert staging_leftovers(leech.store) == []


def test_torrent_of_bad_bytes_fails_the_digest_and_is_never_used_again(tmp_path: Path, origin: Origin,
                                                                       make_node: Callable[..., Node]) -> None:
    """A peer builds a self-consistent torrent from rotten bytes: libtorrent is happy, the digest is not."""
    liar = seeder(make_node, origin, "liar")
    m = liar.store.manifest(REPO, origin.commit)
    assert m is not None
    liar.service.unseed(REPO, origin.commit)
    big = max(m.files, key=lambda f: f.size)
    blob = liar.store.layout.blob_path(REPO, big.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))  # same size, one bit off; the liar's torrent is hashed from this
    for p in (liar.store.layout.agent_dir / "p2p" / "torrents").glob("*.info"):
        p.unlink()
    assert liar.seed(m) is not None
    leech = make_node("leech", host="127.0.0.2", peers=(liar,))
    with structlog.testing.capture_logs() as events:
        res = leech.fill(origin.source())
    assert res.source == origin.source().label  # the origin filled it; nothing from peers published
    assert leech.store.check(res.manifest, full=True).ok
    mismatch = [e for e in events if e["event"] == "peers.digest_mismatch"]
    assert len(mismatch) == 1 and mismatch[0]["file"] == big.path  # downloaded once; the retry refused it
    failed = [e["error"] for e in events if e["event"] == "fill.source_failed"]
    assert len(failed) == 1 and "failed the trusted digest" in failed[0]


class FirstBytes(NullProgress):
    def __init__(self) -> None:
        self.moved = threading.Event()

    def advance(self, nbytes: int) -> None:
        if nbytes > 0:
            self.moved.set()


def test_seed_killed_mid_transfer_falls_back_to_origin(origin: Origin, make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin, upload_rate=1 * MiB)
    leech = make_node("leech", host="127.0.0.2", peers=(seed,), stall_timeout=1.0)
    progress = FirstBytes()
    out: list[FillResult | BaseException] = []

    def run() -> None:
        try:
            out.append(leech.fill(origin.source(), progress=progress))
        except BaseException as e:
            out.append(e)

    with structlog.testing.capture_logs() as events:
        t = threading.Thread(target=run)
        t.start()
        assert progress.moved.wait(20)
        seed.service.stop()
        t.join(30)
    res = out[0]
    assert isinstance(res, FillResult), res
    assert res.source == origin.source().label
    failed = [e for e in events if e["event"] == "fill.source_failed"]
    assert len(failed) == 1 and failed[0]["source"].startswith("peers") and "no progress" in failed[0]["error"]
    assert snapshot(leech.store, origin.commit) == snapshot(seed.store, origin.commit)
    assert staging_leftovers(leech.store) == []


def test_discovered_peers_replace_the_static_list(origin: Origin, make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin)
    leech = make_node("leech", host="127.0.0.2")  # knows nobody at start
    leech.service.set_peers([seed.addr])  # what cluster discovery calls
    assert leech.fill(origin.source()).source.startswith("peers")


def test_holders_are_learned_per_model(origin: Origin, make_node: Callable[..., Node]) -> None:
    """In a cluster a model's Leases name its holders; another model's Lease read never replaces them."""
    seed = seeder(make_node, origin)
    leech = make_node("leech", host="127.0.0.2")  # no static peers
    leech.service.learn_holders(f"{REPO}@{origin.commit}", [seed.addr])
    leech.service.learn_holders("org/other@" + "0" * 40, [PeerAddr("127.0.0.1", free_port(), free_port())])
    res = leech.fill(origin.source())
    assert res.source.startswith("peers") and res.fetched_bytes == res.manifest.total_bytes


@pytest.mark.parametrize("peers", ["none", "dead"])
def test_no_peer_falls_back_and_holds_the_slot_until_seeding(origin: Origin, make_node: Callable[..., Node],
                                                             peers: str) -> None:
    dead = PeerAddr("127.0.0.1", free_port(), free_port())
    leech = make_node("leech", peers=() if peers == "none" else (dead,))
    with structlog.testing.capture_logs() as events:
        res = leech.fill(origin.source())
    assert res.source == origin.source().label and res.manifest.level == "verified"
    said = [e["event"] for e in events if e["event"].startswith("peers.")]
    assert said[:2] == ["peers.origin_slot", "peers.origin_stripe"], said
    assert not {"peers.found", "peers.download_start"} & set(said)
    key = f"{REPO}@{origin.commit}"
    # others keep waiting for this node's torrents until they are served: publish seeds them at once (on the
    # seeder thread), so right here the slot is either still held or the files are already served
    assert leech.service.gate.held() == [key] or len(leech.service.seeding()) == len(res.manifest.files)
    leech.seed(res.manifest)
    assert leech.service.gate.held() == []


def test_other_commit_is_never_mixed(origin: Origin, make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin)  # seeds main only
    leech = make_node("leech", host="127.0.0.2", peers=(seed,))
    with structlog.testing.capture_logs() as events:
        res = leech.fill(origin.source(), "dev")
    assert res.manifest.commit == origin.commit_dev and res.source == origin.source().label
    assert not any(e["event"] == "peers.found" for e in events)


def test_lying_index_for_another_file_set_is_rejected(origin: Origin, make_node: Callable[..., Node]) -> None:
    """An index that lists every file and answers every key with a main file's info dict: a fill of dev,
    or of a subset of main, never takes it."""
    seed = seeder(make_node, origin)
    info = next(iter(seed.service._infos.values()))
    claimed = []
    for revision, files in (("dev", FileFilter()), ("main", FileFilter(allow=("*.json",)))):
        plan = origin.source().resolve(REPO, revision, files)
        claimed += [ft.key for ft in T.file_torrents(REPO, plan.commit, plan.files)]
    liar = IndexServer("127.0.0.1", 0, lambda _key: info, lambda _ckey: claimed).start()
    try:
        leech = make_node("leech", host="127.0.0.2", peers=(PeerAddr("127.0.0.1", seed.service.bt_port, liar.port),))
        with structlog.testing.capture_logs() as events:
            dev = leech.fill(origin.source(), "dev")
            subset = fill_model(leech.store, leech.sources(origin.source()), REPO, "main",
                                FileFilter(allow=("*.json",)))
    finally:
        liar.stop()
    assert dev.source == subset.source == origin.source().label
    rejected = [e["error"] for e in events if e["event"] == "peers.metadata_rejected"]
    assert {e.split(":")[0] for e in rejected} == {"name", "files[0]"}  # dev: other name; subset: other file
    assert not any(e["event"] == "peers.download_done" for e in events)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk case: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_on_a_leecher_fails_cleanly(small_fs: Path, origin: Origin, make_node: Callable[..., Node]) -> None:
    seed = seeder(make_node, origin)
    leech = make_node("leech", host="127.0.0.2", peers=(seed,), store=Store(small_fs / "cache", fsync=False))
    src = PeerSource(leech.service, [origin.source()])
    plan = src.resolve(REPO, "main", FileFilter())
    with leech.store.lock(REPO):
        fill = leech.store.begin(plan)
        needed = fill.needed()
        with fill.reserve(needed):  # passes: then something else takes the space, as on a shared disk
            with open(small_fs / "ballast", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(small_fs).free - 2 * MiB))
            with pytest.raises(DiskFullError, match="disk full"):
                src.fetch(plan, needed, fill, NullProgress())
        fill.abort()
    assert not leech.store.layout.snapshot_dir(REPO, plan.commit).exists()
    assert staging_leftovers(leech.store) == []
    assert seed.service.seeding() and seed.store.check(seed.store.manifest(REPO, origin.commit)).ok  # type: ignore[arg-type]
    other = make_node("other", host="127.0.0.3", peers=(seed,))  # the seed still serves everyone else
    assert other.fill(origin.source()).source.startswith("peers")


# -- origin slots across nodes --------------------------------------------------------------------------


def test_waiting_node_fills_from_the_slot_holder(tmp_path: Path, origin: Origin,
                                                 make_node: Callable[..., Node]) -> None:
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=1)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, origin_concurrency=1)
    key = f"{REPO}@{origin.commit}"
    assert a.service.gate.decide(key) == "held"  # a got the only slot first
    out: list[FillResult | BaseException] = []

    def run_b() -> None:
        try:
            out.append(b.fill(origin.source()))
        except BaseException as e:
            out.append(e)

    with structlog.testing.capture_logs() as events:
        t = threading.Thread(target=run_b)
        t.start()
        assert wait_for(lambda: any(e["event"] == "peers.following_holders" for e in events), 10)
        res_a = a.fill(origin.source())
        assert res_a.source == origin.source().label
        a.seed(res_a.manifest)
        t.join(30)
    res_b = out[0]
    assert isinstance(res_b, FillResult), res_b
    assert res_b.source.startswith("peers") and b.service.gate.held() == []
    assert snapshot(b.store, origin.commit) == snapshot(a.store, origin.commit)


def test_node_without_a_slot_never_reads_the_origin(tmp_path: Path, origin: Origin,
                                                    make_node: Callable[..., Node]) -> None:
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=1)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, holder_wait=0.3, origin_concurrency=1)
    assert a.service.gate.decide(f"{REPO}@{origin.commit}") == "held"  # a holds it and never seeds
    with pytest.raises(FillFailed) as exc:
        b.fill(origin.source())
    assert not exc.value.permanent  # the loop retries later
    (_, peers_err), (_, origin_err) = exc.value.attempts
    assert isinstance(peers_err, TransientSourceError) and "no peer lists" in str(peers_err)
    assert isinstance(origin_err, TransientSourceError) and "held by other nodes" in str(origin_err)
    assert not b.store.layout.repo_dir(REPO).exists()


class OriginTap:
    """A real origin source that records which files it was asked for and can freeze after one of them
    (``hold_after``) until ``go`` is set: a slow origin caught mid-fill."""

    def __init__(self, inner: PvcSource, hold_after: str | None = None) -> None:
        self.inner, self.kind, self.hold_after = inner, inner.kind, hold_after
        self.fetched: list[str] = []
        self.reached, self.go = threading.Event(), threading.Event()

    @property
    def label(self) -> str:
        return self.inner.label

    def resolve(self, repo: str, revision: str, files: FileFilter) -> object:
        return self.inner.resolve(repo, revision, files)

    def fetch(self, plan: object, entries: list[FileEntry], fill: object, progress: object) -> None:
        for e in entries:
            self.inner.fetch(plan, [e], fill, progress)  # type: ignore[arg-type]
            self.fetched.append(e.path)
            if e.path == self.hold_after:
                self.reached.set()
                assert self.go.wait(30)

    def close(self) -> None:
        self.inner.close()


def in_thread(fn: Callable[[], FillResult]) -> tuple[threading.Thread, list[FillResult | BaseException]]:
    out: list[FillResult | BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_follower_takes_each_file_while_the_holder_is_still_filling(tmp_path: Path, origin: Origin,
                                                                      make_node: Callable[..., Node]) -> None:
    """Pipelining: the holder shares a file the moment it is verified in its staging, so a follower has it
    (verified in its own staging) while the holder's origin fill is frozen and nothing is published yet."""
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=1)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, origin_concurrency=1)
    plan = origin.source().resolve(REPO, "main", FileFilter())
    shard = min((e for e in plan.files if e.path.endswith(".safetensors")), key=lambda e: e.path)
    slow, b_origin = OriginTap(origin.source(), hold_after=shard.path), OriginTap(origin.source())
    ta, out_a = in_thread(lambda: a.fill(slow))  # type: ignore[arg-type]
    assert slow.reached.wait(20)  # a holds the origin slot, has verified the first shard, and is frozen
    tb, out_b = in_thread(lambda: b.fill(b_origin))  # type: ignore[arg-type]
    staged = b.store.layout.staging_dir(REPO) / plan.commit / "blobs" / (shard.digest or "")
    assert wait_for(staged.exists, 20), "the follower never got the shard the holder had verified"
    assert ta.is_alive() and not a.store.layout.snapshot_dir(REPO, plan.commit).exists()  # a is still filling
    assert hashlib.sha256(staged.read_bytes()).hexdigest() == shard.digest
    slow.go.set()
    ta.join(30)
    tb.join(30)
    res_a, res_b = out_a[0], out_b[0]
    assert isinstance(res_a, FillResult) and isinstance(res_b, FillResult), (res_a, res_b)
    assert res_a.source == origin.source().label and res_b.source.startswith("peers")
    assert b_origin.fetched == [] and sorted(slow.fetched) == sorted(e.path for e in plan.files)  # origin read once
    assert snapshot(b.store, plan.commit) == snapshot(a.store, plan.commit)
    assert staging_leftovers(b.store) == []
    a.seed(res_a.manifest)  # staged seeds move to the published blobs: still one torrent per file
    assert len(a.service.seeding()) == len([e for e in plan.files if e.size])


def test_a_holder_dying_mid_fill_leaves_the_follower_only_the_rest_to_read(tmp_path: Path, origin: Origin,
                                                                         make_node: Callable[..., Node]) -> None:
    """The holder is killed after sharing its first files: the follower gives up on the swarm once the slot
    is free, and its next attempt takes the slot and reads from the origin only what it had not verified."""
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=1)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, stall_timeout=1.0, origin_concurrency=1)
    plan = origin.source().resolve(REPO, "main", FileFilter())
    shard = min((e for e in plan.files if e.path.endswith(".safetensors")), key=lambda e: e.path)
    slow, b_origin = OriginTap(origin.source(), hold_after=shard.path), OriginTap(origin.source())
    a_stop = threading.Event()
    ta, _ = in_thread(lambda: a.fill(slow, stop=a_stop))  # type: ignore[arg-type]
    assert slow.reached.wait(20)
    tb, out_b = in_thread(lambda: b.fill(b_origin))  # type: ignore[arg-type]
    staged = b.store.layout.staging_dir(REPO) / plan.commit / "blobs" / (shard.digest or "")
    assert wait_for(staged.exists, 20)
    a.service.stop()  # the holder dies: its slot and its torrents are gone
    a_stop.set()
    slow.go.set()
    ta.join(30)
    tb.join(30)
    first = out_b[0]
    assert isinstance(first, FillFailed) and not first.permanent, first  # the loop retries it later
    assert b_origin.fetched == []  # while a slot was held by another node, b never read the origin
    with structlog.testing.capture_logs() as events:
        res = b.fill(b_origin)
    assert res.source == origin.source().label
    had = {e.path for e in plan.files if e.path.encode() <= shard.path.encode()}  # what a shared before dying
    assert set(b_origin.fetched) == {e.path for e in plan.files} - had  # only the rest came from the origin
    assert any(e["event"] == "peers.origin_slot" for e in events)
    assert b.store.check(res.manifest, full=True).ok and staging_leftovers(b.store) == []


def test_two_holders_read_disjoint_stripes_and_swap(tmp_path: Path, origin: Origin,
                                                    make_node: Callable[..., Node]) -> None:
    """originConcurrency 2: each holder reads its half of the bytes from the origin, the other half from the
    other holder; the origin is read once in all."""
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=2)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, origin_concurrency=2)
    a.service.set_peers([b.addr])
    key = f"{REPO}@{origin.commit}"
    assert a.service.gate.decide(key) == "held" and b.service.gate.decide(key) == "held"
    assert (a.service.gate.stripe(key), b.service.gate.stripe(key)) == ((0, 2), (1, 2))
    tap_a, tap_b = OriginTap(origin.source()), OriginTap(origin.source())
    with structlog.testing.capture_logs() as events:
        ta, out_a = in_thread(lambda: a.fill(tap_a))  # type: ignore[arg-type]
        tb, out_b = in_thread(lambda: b.fill(tap_b))  # type: ignore[arg-type]
        ta.join(60)
        tb.join(60)
    assert isinstance(out_a[0], FillResult) and isinstance(out_b[0], FillResult), (out_a, out_b)
    plan = origin.source().resolve(REPO, "main", FileFilter())
    assert not set(tap_a.fetched) & set(tap_b.fetched)  # no file read from the origin twice
    assert sorted(tap_a.fetched + tap_b.fetched) == sorted(e.path for e in plan.files)
    shards = sorted(e.path for e in plan.files if e.path.endswith(".safetensors"))
    assert shards[0] in tap_a.fetched and shards[1] in tap_b.fetched  # by bytes: one shard each
    assert snapshot(a.store, origin.commit) == snapshot(b.store, origin.commit)
    assert a.store.check(out_a[0].manifest, full=True).ok and b.store.check(out_b[0].manifest, full=True).ok
    size = {e.path: e.size for e in plan.files}
    for res, tap in ((out_a[0], tap_a), (out_b[0], tap_b)):  # what each took from peers is reported as such
        assert res.peer_bytes == sum(n for p, n in size.items() if p not in tap.fetched) > 0
    stripes = sorted((e["slot"], e["files"]) for e in events if e["event"] == "peers.origin_stripe")
    assert [s for s, _ in stripes] == [0, 1] and all(n > 0 for _, n in stripes)


class OnceCorruptOrigin(OriginTap):
    """An origin that delivers one file with wrong bytes (right size) the first ``times`` it is asked for it."""

    def __init__(self, inner: PvcSource, bad: str, times: int = 1) -> None:
        super().__init__(inner)
        self.bad, self.times = bad, times

    def fetch(self, plan: object, entries: list[FileEntry], fill: object, progress: object) -> None:
        for e in entries:
            if e.path == self.bad and self.times > 0:
                self.times -= 1
                fill.write_bytes(e, b"\xff" * e.size)  # type: ignore[attr-defined]  # refused: IntegrityError
            super().fetch(plan, [e], fill, progress)


def test_a_holder_keeps_its_slot_through_the_retry_of_a_bad_file(tmp_path: Path, origin: Origin,
                                                                 make_node: Callable[..., Node]) -> None:
    """One file arrives corrupt from the origin: fill_model fetches once more, and the slot (and with it this
    holder's stripe) stays held for that retry instead of going to another node mid-fill."""
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=2)
    plan = origin.source().resolve(REPO, "main", FileFilter())
    shard = min(e.path for e in plan.files if e.path.endswith(".safetensors"))
    flaky = OnceCorruptOrigin(origin.source(), shard)
    with structlog.testing.capture_logs() as events:
        res = a.fill(flaky)  # type: ignore[arg-type]
    assert res.source == origin.source().label and a.store.check(res.manifest, full=True).ok
    assert any(e["event"] == "fill.integrity_retry" for e in events)
    key = f"{REPO}@{origin.commit}"
    stripes = [e for e in events if e["event"] == "peers.origin_stripe"]
    assert len(stripes) == 2 and stripes[1]["slot"] == stripes[0]["slot"]  # the retry still held the slot
    a.seed(res.manifest)  # published: the slot is given up once the files are served (released in file mode)
    assert a.service.gate.held() == [] and DirSlots(slots, cap=2).held_count(key) == 0


def test_files_shared_from_a_failed_fill_stop_being_served(tmp_path: Path, origin: Origin,
                                                            make_node: Callable[..., Node]) -> None:
    """A holder shares its first files from staging, then its fill fails for good (a file corrupt twice): the
    staging is dropped, and with it every file it was serving from there."""
    a = make_node("a", origin_concurrency=1)
    plan = origin.source().resolve(REPO, "main", FileFilter())
    shard = min(e.path for e in plan.files if e.path.endswith(".safetensors"))
    bad = OnceCorruptOrigin(origin.source(), shard, times=2)  # corrupt on fill_model's retry too
    with structlog.testing.capture_logs() as events, pytest.raises(FillFailed):
        a.fill(bad)  # type: ignore[arg-type]
    shared = [e["file"] for e in events if e["event"] == "peers.sharing_staged"]
    assert shared  # files before the shard were served from staging meanwhile
    assert wait_for(lambda: a.service.seeding() == [], 10), a.service.seeding()
    assert a.service._serve_listing(T.commit_key(REPO, origin.commit)) == []


def test_holders_agree_on_stripes_when_one_resumes_a_partial_fill(tmp_path: Path, origin: Origin,
                                                                   make_node: Callable[..., Node]) -> None:
    """b already verified the first shard in an earlier, stopped fill. Stripes come from the whole file list, not
    from what each holder still needs, so a and b still split the rest without a gap (each would otherwise wait
    for the other's shard) and without reading a file from the origin twice."""
    slots = tmp_path / "slots"
    a = make_node("a", slots_dir=slots, origin_concurrency=2, holder_wait=20.0)
    b = make_node("b", host="127.0.0.2", peers=(a,), slots_dir=slots, origin_concurrency=2, holder_wait=20.0)
    a.service.set_peers([b.addr])
    plan = origin.source().resolve(REPO, "main", FileFilter())
    shards = sorted(e.path for e in plan.files if e.path.endswith(".safetensors"))
    earlier, stop = OriginTap(origin.source(), hold_after=shards[0]), threading.Event()
    t, out = in_thread(lambda: b.fill(earlier, stop=stop))  # type: ignore[arg-type]
    assert earlier.reached.wait(20)
    stop.set()
    earlier.go.set()
    t.join(30)
    assert isinstance(out[0], Cancelled), out  # stopped, its verified files kept for the next fill
    key = f"{REPO}@{origin.commit}"
    assert a.service.gate.decide(key) == "held" and b.service.gate.decide(key) == "held"
    tap_a, tap_b = OriginTap(origin.source()), OriginTap(origin.source())
    ta, out_a = in_thread(lambda: a.fill(tap_a))  # type: ignore[arg-type]
    tb, out_b = in_thread(lambda: b.fill(tap_b))  # type: ignore[arg-type]
    ta.join(60)
    tb.join(60)
    assert isinstance(out_a[0], FillResult) and isinstance(out_b[0], FillResult), (out_a, out_b)
    assert shards[0] in tap_a.fetched and shards[1] in tap_b.fetched  # slot 0 and slot 1, as on every node
    assert not set(tap_a.fetched) & set(tap_b.fetched)
    assert not set(earlier.fetched) & set(tap_b.fetched)  # b never re-read what it had verified
    assert out_a[0].seconds < 15 and out_b[0].seconds < 15  # nobody waited out holder_wait for a file no one read
    assert snapshot(a.store, origin.commit) == snapshot(b.store, origin.commit)


def test_dir_slots_cap_release_and_death(tmp_path: Path) -> None:
    a, b = DirSlots(tmp_path, cap=2), DirSlots(tmp_path, cap=2)
    assert not a.busy("m@1")
    s1, s2 = a.try_acquire("m@1"), b.try_acquire("m@1")
    assert s1 and s2 and b.try_acquire("m@1") is None and a.busy("m@1")
    assert b.try_acquire("other@1") is not None  # per model
    s1.release()
    s3 = b.try_acquire("m@1")
    assert s3 is not None
    s2.release()
    s3.release()
    assert not a.busy("m@1")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom agent.sources.peers.slots import DirSlots\n"
        f"s = DirSlots(Path({str(tmp_path)!r}), cap=1).try_acquire('m@1')\nprint(bool(s), flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        one = DirSlots(tmp_path, cap=1)
        assert one.busy("m@1") and one.try_acquire("m@1") is None
    finally:
        holder.kill()
        holder.wait()
    assert not one.busy("m@1") and one.try_acquire("m@1") is not None  # a dead holder's slot is free at once


# -- process exit -------------------------------------------------------------------------------------------

EXIT_PROBE = """
import atexit, threading
def probe():  # registered first, so it runs after the service module's own exit hook
    from agent.sources.peers.service import live_services
    alerts = [t for t in threading.enumerate() if t.name == "p2p-alerts" and t.is_alive()]
    print(f"live={len(live_services())} alert_threads={len(alerts)}", flush=True)
atexit.register(probe)
from agent.sources.peers.service import PeerService
from agent.sources.peers.settings import PeerSettings
PeerService(PeerSettings(listen_host="127.0.0.1", port=0)).start()
"""


def test_a_session_left_running_is_stopped_before_the_interpreter_finalizes() -> None:
    """A daemon thread still inside libtorrent during finalization can abort the process (exit 134)."""
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "live=0 alert_threads=0" in out.stdout, out.stdout + out.stderr[-2000:]


# -- the command line -----------------------------------------------------------------------------------


def test_cli_fill_from_peers(tmp_path: Path, origin: Origin, make_node: Callable[..., Node]) -> None:
    port = free_port_pair()
    seed = make_node("seed", port=port)
    seed.seed(fill_model(seed.store, [origin.source()], REPO, "main").manifest)
    assert seed.service.bt_port == port and seed.service.index_port == port + 1
    err = tmp_path / "cli.stderr"
    with err.open("w") as f:
        try:
            out = subprocess.run(agent_cmd("fill", REPO, "--source", "peers", "--source", f"pvc:{origin.root}",
                                           "--peer", f"127.0.0.1:{port}", "--p2p-port", "0",
                                           "--cache-dir", str(tmp_path / "cli"), "--json"),
                                 stdout=subprocess.PIPE, stderr=f, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the CLI fill did not end in 60 s; its log:\n" + err.read_text()[-4000:])
    out.stderr = err.read_text()
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["source"].startswith("peers") and res["level"] == "verified" and res["commit"] == origin.commit
    got = snapshot(Store(tmp_path / "cli"), origin.commit)
    assert {k: hashlib.sha256(v).hexdigest() for k, v in got.items()} == {
        k: hashlib.sha256(v).hexdigest() for k, v in snapshot(seed.store, origin.commit).items()}
