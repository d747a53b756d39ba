"""A simulator of the peers protocol, checked against the swarm lab, then run at cluster scale.

Run: ``python -m bench.swarm_sim [--lab lab.json] [--nodes 100,1000]``. It prints the lab's scenarios
(200/400 Mbit/s, the protocol as built; with ``--lab`` the measured figures beside them and the error),
then N = 100 and 1000 nodes with a 140 GB model at 25 Gb/s per node and a 100 Gb/s origin: time until
all are ready / the Kumar-Ross limit, and origin egress / model size, for the protocol as built ("file"
torrents, ``originConcurrency`` 2 striped slots), the one it replaced ("model": a torrent per model, which
exists only once a slot holder holds every byte) and variants ("file" with 1 or 4 slots, "piece": pieces
shareable the moment they land).

Assumptions (what is simplified, and why it is fair):
- Time-stepped fluid transfers. Each node has an upload and a download capacity (bytes/s, payload:
  ``efficiency`` of the link rate). An uploader splits its upload equally over the links it is
  currently sending on (libtorrent here runs with ``unchoke_slots_limit = -1``: every interested peer
  is unchoked, so "choking" reduces to an equal split); a downloader whose offers exceed its download
  capacity scales them down proportionally. No TCP dynamics, no latency beyond ``join_delay``, no CPU
  limit (the lab's 2-core box is CPU-bound from N = 8 at 200 Mbit/s: see its ``cpu busy``).
- A link carries one piece at a time, picked rarest-first (random tie-break per node) among pieces the
  uploader has and the downloader neither has nor is fetching on another link. libtorrent spreads a
  piece's 16 KiB blocks over several peers; one-piece-per-link is close when pieces are small against a
  node's transfer time. Large models are simulated with pieces grouped (``max_pieces``) to bound the run
  time; a grouped piece is still small against the whole transfer (>= 500 pieces).
- Each node connects to ``connections`` random others (symmetric); the lab's nodes know all others.
- Origin slots: ``slots`` nodes read from the origin, sharing ``origin_up`` equally, each at most its
  download capacity, which the origin read takes from its download link meanwhile. "model": each
  holder reads the whole model (origin egress ``slots`` x model). "file"/"piece": holder ``j`` reads its
  byte-balanced stripe (``core.torrent.stripe``) and leeches the rest like any node (egress 1 x model).
- "model": a holder shares nothing until it holds every byte and has hashed it (``build_rate``); a
  leecher stops serving when its last piece lands (torrent removed, files hashed, published) and serves
  again ``tail_bytes / verify_rate`` later. "file": a holder's file is shared ``file / build_rate``
  after it landed (piece hashes of that file), a node that finished files keeps serving them. The
  others join ``join_delay`` after the first file appears (index poll + connect).

Measured: see ``python -m bench.swarm_sim --lab lab.json`` and the notes of issue 13 (the figures move
with the machine's load, so they are not pinned here).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

Granularity = Literal["model", "file", "piece"]
MBIT = 1e6 / 8
GBIT = 1e9 / 8


@dataclass(frozen=True)
class Scenario:
    nodes: int
    size: float  # model bytes
    piece: float  # torrent piece bytes
    node_rate: float  # link rate, bytes/s, up and down
    origin_rate: float  # bytes/s
    slots: int = 1
    connections: int = 0  # 0: every node knows every other (file mode with --peer for all)
    file_size: float = 0.0  # bytes per file (shards); 0: one file
    build_rate: float = 400e6  # bytes/s: the slot holder's SHA-1 pass over its blobs
    verify_rate: float = 400e6  # bytes/s: sha256 of the last file after the last piece
    join_delay: float = 0.5  # s: index poll + connect + handshake after a torrent appears
    file_delay: float = 0.0  # s: "file": a node takes a file's torrent this long after a holder shares it
    origin_setup: float = 1.0  # s: resolve, metadata, first byte from the origin
    efficiency: float = 0.94  # payload share of a shaped link (TCP/IP + BitTorrent headers)
    granularity: Granularity = "model"
    max_pieces: int = 1024
    seed: int = 1
    host_rate: float = 0.0  # bytes/s all nodes together can move on the lab's one machine (0: no limit)

    @property
    def limit(self) -> float:
        """Kumar & Ross: max(F/u_s, F/d, N*F/(u_s + N*u)) with the link rates as given."""
        f, n, u, us = self.size, self.nodes, self.node_rate, self.origin_rate
        return max(f / us, f / u, n * f / (us + n * u))


@dataclass
class SimResult:
    scenario: Scenario
    seconds: float
    ready: list[float]
    origin_bytes: float
    peer_bytes: list[float]

    @property
    def ratio(self) -> float:
        return self.seconds / self.scenario.limit

    def line(self) -> str:
        s = self.scenario
        return (f"N={s.nodes:5d} F={s.size / 1e9:7.2f} GB {s.granularity:6s} all ready {self.seconds:8.2f}s "
                f"limit {s.limit:7.2f}s ratio {self.ratio:5.2f} origin/model {self.origin_bytes / s.size:5.2f}")


def simulate(sc: Scenario) -> SimResult:
    rng = np.random.default_rng(sc.seed)
    n = sc.nodes
    group = max(1, math.ceil(sc.size / sc.piece / sc.max_pieces))
    piece = sc.piece * group
    m = math.ceil(sc.size / piece)
    up = sc.node_rate * sc.efficiency
    down = sc.node_rate * sc.efficiency
    k = min(sc.slots, n)
    origin_each = min(down, sc.origin_rate * sc.efficiency / k)

    # release[j, p]: when slot holder j can share piece p from its own origin fill (inf: not in its stripe)
    release = np.full((k, m), np.inf)
    striped = sc.granularity != "model"
    per_file = sc.file_size or sc.size
    nfiles = math.ceil(sc.size / per_file)
    file_of = np.minimum(((np.arange(m) * piece) // per_file).astype(int), nfiles - 1)
    file_bytes = np.array([min(per_file, sc.size - f * per_file) for f in range(nfiles)])
    # stripes as core.torrent.stripe: a file belongs to the holder in whose 1/k of the bytes its middle lies
    starts = np.concatenate([[0.0], np.cumsum(file_bytes)[:-1]])
    owner = np.minimum(k - 1, ((2 * starts + file_bytes) * k // (2 * sc.size)).astype(int)) if striped \
        else np.zeros(nfiles, dtype=int)
    for j in range(k):
        mine = np.flatnonzero(owner[file_of] == j) if striped else np.arange(m)
        if not len(mine):
            continue
        t_fetch = sc.origin_setup + np.arange(1, len(mine) + 1) * piece / origin_each  # piece has landed
        if sc.granularity == "piece":
            release[j, mine] = t_fetch
        elif sc.granularity == "file":
            fo = file_of[mine]
            ends = {f: t_fetch[fo == f].max() for f in np.unique(fo)}
            release[j, mine] = [ends[f] + file_bytes[f] / sc.build_rate for f in fo]
        else:
            release[j, mine] = t_fetch[-1] + sc.size / sc.build_rate
    holder_ready = sc.origin_setup + sc.size / origin_each  # model: a holder's own fill, verified in-line
    # while a holder reads its stripe, the origin takes origin_each of its download link
    fetch_end = np.where(np.isfinite(release), release, -np.inf).max(1) if striped else np.full(k, np.inf)
    room = np.full(n, down)

    have = np.zeros((n, m), dtype=bool)
    inprog = np.zeros((n, m), dtype=bool)
    avail = np.zeros(m, dtype=np.int64)
    tie = rng.random((n, m)) * 0.5  # per-node random order among equally rare pieces
    is_holder = np.zeros(n, dtype=bool)
    is_holder[:k] = True

    # neighbours
    if sc.connections <= 0 or sc.connections >= n - 1:
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    else:
        nb: list[set[int]] = [set() for _ in range(n)]
        for a in range(n):
            for b in rng.choice(n - 1, size=sc.connections // 2, replace=False):
                b = int(b) + (1 if b >= a else 0)
                nb[a].add(b)
                nb[b].add(a)
        pairs = [(a, b) for a in range(n) for b in nb[a]]
    lu = np.array([p[0] for p in pairs], dtype=np.int64)  # uploader of each directed link
    ld = np.array([p[1] for p in pairs], dtype=np.int64)
    lp = np.full(len(pairs), -1, dtype=np.int64)  # piece on the link, -1 idle
    lb = np.zeros(len(pairs))  # bytes of that piece delivered
    tried = np.full(len(pairs), -1, dtype=np.int64)  # uploader's piece count when the link last found nothing

    joined = np.full(n, np.inf)  # when a non-holder starts downloading
    joined[:k] = 0.0
    done_at = np.full(n, np.inf)  # all pieces received (or, for holders, origin fill done)
    serving_from = np.full(n, np.inf)  # when a node serves (again)
    ready = np.full(n, np.inf)
    peer_bytes = np.zeros(n)
    released = np.zeros((k, m), dtype=bool)
    if striped:  # a holder never asks peers for its own stripe
        inprog[:k] = np.isfinite(release)

    dt = piece / down / 4
    t = 0.0
    first_release = float(release.min())
    # "file": a piece can be asked for once its file's torrent is known (listed by a holder, found by an index
    # poll, added and connected); all pieces of a file at once
    visible_at = np.zeros(m)
    if sc.granularity == "file":
        first_anywhere = release.min(0)
        for f in range(nfiles):
            idx = file_of == f
            visible_at[idx] = first_anywhere[idx].min() + sc.file_delay
    visible = visible_at <= 0
    while not np.all(np.isfinite(ready)):
        t += dt
        # slot holders: pieces released by their origin fill
        if not visible.all():
            now_visible = visible_at <= t
            if (now_visible & ~visible).any():
                tried[:] = -1  # links that found nothing may find a newly known file
            visible = now_visible
        newly = (~released) & (release <= t)
        if newly.any():
            released |= newly
            have[:k] |= newly
            avail += newly.sum(0)
            serving_from[:k] = np.minimum(serving_from[:k], first_release)
            for j in range(k):
                if striped and have[j].all() and not np.isfinite(done_at[j]):
                    done_at[j] = t
                    ready[j] = t + min(per_file, sc.size) / sc.verify_rate
        if not striped and t >= holder_ready:
            ready[:k] = np.minimum(ready[:k], holder_ready)
        if t >= first_release + sc.join_delay:
            joined[k:] = np.minimum(joined[k:], first_release + sc.join_delay)

        leeching = (joined <= t) & ~np.isfinite(done_at) & (~is_holder if not striped else True)
        serving = (serving_from <= t) | leeching  # a leecher shares what it has; a finished one after publish
        count = have.sum(1)
        # assign pieces to idle links whose uploader gained pieces since the last miss
        idle = (lp < 0) & serving[lu] & leeching[ld] & (count[lu] > tried)
        for li in np.flatnonzero(idle):
            u, d = lu[li], ld[li]
            cand = have[u] & ~have[d] & ~inprog[d] & visible
            if not cand.any():
                tried[li] = count[u]
                continue
            idx = np.flatnonzero(cand)
            p = idx[np.argmin(avail[idx] + tie[d, idx])]
            lp[li], lb[li] = p, 0.0
            inprog[d, p] = True
        active = (lp >= 0) & serving[lu] & leeching[ld]
        # a link that lost its uploader or downloader frees its piece
        dropped = (lp >= 0) & ~active
        for li in np.flatnonzero(dropped):
            inprog[ld[li], lp[li]] = False
            lp[li] = -1
            tried[ld == ld[li]] = -1  # the freed piece may be on offer from links that found nothing
        if not active.any():
            continue
        links = np.flatnonzero(active)
        n_up = np.bincount(lu[links], minlength=n)
        offer = up * dt / n_up[lu[links]]
        want = np.bincount(ld[links], weights=offer, minlength=n)
        room[:k] = np.where(t < fetch_end, max(0.0, down - origin_each), down)
        scale = np.where(want > room * dt, room * dt / np.maximum(want, 1e-9), 1.0)
        got = offer * scale[ld[links]]
        if sc.host_rate > 0:  # one machine runs every node: its CPU (hashing, kernel networking) caps the total
            reading = sum(origin_each for j in range(k) if t < fetch_end[j]) if striped else 0.0
            budget = max(0.0, sc.host_rate - reading) * dt
            if got.sum() > budget:
                got *= budget / got.sum()
        lb[links] += got
        np.add.at(peer_bytes, ld[links], got)
        finished = links[lb[links] >= piece]
        for li in finished:
            d, p = ld[li], lp[li]
            have[d, p] = True
            inprog[d, p] = False
            avail[p] += 1
            lp[li] = -1
        for d in np.unique(ld[finished]):
            if have[d].all() and not np.isfinite(done_at[d]):
                done_at[d] = t
                tail = min(sc.file_size or sc.size, sc.size)
                ready[d] = t + tail / sc.verify_rate
                if striped:  # per-file torrents: every finished file is shared on; only the last one waits
                    serving_from[d] = min(serving_from[d], t)
                    continue
                serving_from[d] = ready[d]  # torrent removed while hashing and publishing, re-added as a seed
                for li in np.flatnonzero(lu == d):  # its uploads stop meanwhile
                    if lp[li] >= 0:
                        inprog[ld[li], lp[li]] = False
                        lp[li] = -1
                        tried[ld == ld[li]] = -1
        if t > 100 * sc.limit + 1000:
            raise RuntimeError(f"simulation did not converge: {int(np.isfinite(ready).sum())}/{n} ready at {t:.0f}s")
    return SimResult(sc, float(ready.max()), sorted(float(r) for r in ready), (1 if striped else k) * sc.size,
                     [float(b) for b in peer_bytes])


# A file's torrent reaches a node: half an index poll on average (the lab polls every 0.5 s; a busy node every
# 2 s), the loop's 0.25 s tick, the info-dict GET, torrent add and connect. The cluster adds the busy poll.
LAB_FILE_DELAY = 0.75
CLUSTER_FILE_DELAY = 1.5


def lab_scenario(n: int, size: float, *, shards: int = 16, slots: int = 2, granularity: Granularity = "file",
                 host_rate: float = 0.0, node_mbit: float = 200, origin_mbit: float = 400) -> Scenario:
    """The lab's settings: 1 MiB pieces (piece rule for files of a few hundred MB and less), ``shards``
    weight files, all peers known, ``slots`` origin slots, the machine's capacity ``host_rate``."""
    return Scenario(nodes=n, size=size, piece=1 << 20, node_rate=node_mbit * MBIT, origin_rate=origin_mbit * MBIT,
                    file_size=size / shards, slots=slots, granularity=granularity, host_rate=host_rate,
                    file_delay=LAB_FILE_DELAY)


def host_rate_of(runs: list[dict[str, float]]) -> float:
    """Bytes/s the lab machine moves at 100% CPU, from its busiest run: N x model bytes over the busy core-seconds,
    times the cores. The simulator's one fitted parameter; it only applies to lab scenarios."""
    r = max(runs, key=lambda r: r.get("cpu_busy", 0.0))
    busy = r.get("cpu_busy", 0.0)
    if busy < 0.9:  # the machine was not the limit in any run: nothing to calibrate
        return 0.0
    return r["nodes"] * r["size"] / (busy * r["seconds"])


def cluster_scenario(n: int, granularity: Granularity, slots: int = 2) -> Scenario:
    """140 GB, 16 MiB pieces, 5 GB shards, 25 Gb/s nodes, 100 Gb/s origin, 50 connections per node.

    build_rate 5 GB/s: the holder hashes its blobs with one thread per core from NVMe; verify_rate
    1.4 GB/s: sha256 of the last shard on one core (the others were hashed while the rest arrived).
    """
    return Scenario(nodes=n, size=140e9, piece=16 << 20, node_rate=25 * GBIT, origin_rate=100 * GBIT,
                    connections=50, file_size=5e9, build_rate=5e9, verify_rate=1.4e9, join_delay=1.0,
                    origin_setup=2.0, granularity=granularity, max_pieces=600, slots=slots,
                    file_delay=CLUSTER_FILE_DELAY)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--lab", help="JSON written by bench.swarm_lab --json: compare with the measured figures")
    ap.add_argument("--size", type=float, default=300e6, help="lab model bytes when no --lab is given")
    ap.add_argument("--nodes", default="100,1000", help="cluster-scale N")
    ap.add_argument("--quick", action="store_true", help="small cluster runs only (CI)")
    ap.add_argument("--variants", default="model:1,file:1,file:2,file:4,piece:2",
                    help="cluster runs as granularity:slots, comma-separated")
    ap.add_argument("--shards", type=int, default=16, help="lab model weight files (as bench.swarm_lab)")
    ap.add_argument("--slots", type=int, default=2, help="lab origin slots (as bench.swarm_lab)")
    ap.add_argument("--node-rate", type=float, default=200.0, help="lab Mbit/s per node when the JSON has none")
    ap.add_argument("--origin-rate", type=float, default=400.0, help="lab origin Mbit/s when the JSON has none")
    args = ap.parse_args(argv)
    measured = json.loads(Path(args.lab).read_text()) if args.lab else []
    lab_runs = [(r["nodes"], r["size"], r) for r in measured] or [(n, args.size, None) for n in (2, 4, 8)]
    host = host_rate_of(measured) if measured else 0.0
    rates = (measured[0].get("node_mbit", args.node_rate), measured[0].get("origin_mbit", args.origin_rate)) \
        if measured else (args.node_rate, args.origin_rate)
    print(f"lab scenarios ({rates[0]:g} Mbit/s nodes, {rates[1]:g} Mbit/s origin, {args.shards} shards, built: file "
          f"torrents, {args.slots} striped slots; machine capacity "
          + (f"{host / 1e6:.0f} MB/s from the busiest run)" if host else "not limiting)") + ":")
    for n, size, r in lab_runs:
        sim = simulate(lab_scenario(n, size, shards=args.shards, slots=args.slots, host_rate=host,
                                    node_mbit=rates[0], origin_mbit=rates[1]))
        line = sim.line()
        if r is not None:
            lab_ratio = r["seconds"] / r["limit"]
            err = (sim.seconds - r["seconds"]) / r["seconds"]
            egress = r["origin_bytes"] / r["size"]
            line += (f" | lab {r['seconds']:.2f}s ratio {lab_ratio:.2f} origin/model {egress:.2f}"
                     f" cpu busy {r.get('cpu_busy', 0):.0%}")
            line += f" | sim error {err:+.0%}"
        print("  " + line, flush=True)
    print("cluster (140 GB, 25 Gb/s nodes, 100 Gb/s origin): slots, granularity")
    variants = [(g, int(k)) for g, k in (v.split(":") for v in args.variants.split(","))]
    for n in (int(x) for x in args.nodes.split(",")):
        for g, k in variants:
            sc = cluster_scenario(n, g, k)  # type: ignore[arg-type]
            if args.quick:
                sc = replace(sc, max_pieces=64)
            built = "  <- built (default originConcurrency 2)" if (g, k) == ("file", 2) else ""
            print(f"  slots {k} " + simulate(sc).line() + built, flush=True)

if __name__ == "__main__":
    main()
