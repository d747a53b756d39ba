"""A simulator of the peers protocol, checked against the swarm lab, then run at cluster scale.

Run: ``python -m bench.swarm_sim [--lab lab.json]``. It prints the lab's scenarios (N = 2, 4, 8 at 200/400
Mbit/s; with ``--lab`` the measured figures beside them and the error), then N = 100 and 1000 nodes with a
140 GB model at 25 Gb/s per node and a 100 Gb/s origin: time until all are ready / the Kumar-Ross limit,
and origin egress / model size, for the protocol as built ("model": a slot holder's torrent exists only
once it holds, hashed, every byte) and for two pipelined variants it could grow into ("file": a torrent
per file as it lands; "piece": pieces shareable as they land).

Assumptions (what is simplified, and why it is fair):
- Time-stepped fluid transfers. Each node has an upload and a download capacity (bytes/s, payload:
  ``efficiency`` of the link rate). An uploader splits its upload equally over the links it is
  currently sending on (libtorrent here runs with ``unchoke_slots_limit = -1``: every interested peer
  is unchoked, so "choking" reduces to an equal split); a downloader whose offers exceed its download
  capacity scales them down proportionally. No TCP dynamics, no latency beyond ``join_delay``.
- A link carries one piece at a time, picked rarest-first (random tie-break per node) among pieces the
  uploader has and the downloader neither has nor is fetching on another link. libtorrent spreads a
  piece's 16 KiB blocks over several peers; one-piece-per-link is close when pieces are small against a
  node's transfer time. Large models are simulated with pieces grouped (``max_pieces``) to bound the run
  time; a grouped piece is still small against the whole transfer (>= 500 pieces).
- Each node connects to ``connections`` random others (symmetric); the lab's nodes know all others.
- Origin slots: ``slots`` nodes fetch the whole model from the origin, sharing ``origin_up`` equally,
  each at most its download capacity. Origin egress is therefore ``slots`` x model size.
- "model" granularity (built): a slot holder can share nothing until it holds every byte and has
  computed the piece hashes (``build_rate`` bytes/s over the model); the others join ``join_delay``
  later (index polling + connect). A leecher stops serving when its last piece lands (torrent removed,
  files hashed, published) and serves again ``tail_bytes / verify_rate`` later as a seed.
- "file" / "piece": the same with the holder's pieces released per file (after hashing that file) or as
  they land. Not built; shown to size what pipelining would buy.

Measured (``python -m bench.swarm_sim --lab lab.json``; lab: 315 MB, 2-core VM, load 2.2, 15 at N=16):
    N=2  sim 29.43s lab 27.76s (+6%)    N=4  sim 33.11s lab 32.14s (+3%)
    N=8  sim 32.08s lab 34.55s (-7%)    N=16 sim 32.60s lab 39.92s (-18%)
    140 GB, 25 Gb/s, 100 Gb/s origin:   model (built)  file          piece
      N=100   time/limit                 3.36           1.98          1.91       origin/model 1.00
      N=1000  time/limit                 3.48           2.07          2.02       origin/model 1.00
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
    origin_setup: float = 1.0  # s: resolve, metadata, first byte from the origin
    efficiency: float = 0.94  # payload share of a shaped link (TCP/IP + BitTorrent headers)
    granularity: Granularity = "model"
    max_pieces: int = 1024
    seed: int = 1

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

    # when each piece becomes shareable at the slot holders
    t_fetch = sc.origin_setup + np.arange(1, m + 1) * piece / origin_each  # piece p has landed
    t_fetch[-1] = sc.origin_setup + sc.size / origin_each
    if sc.granularity == "piece":
        release = t_fetch.copy()
    elif sc.granularity == "file":
        per_file = sc.file_size or sc.size
        file_of = np.minimum(((np.arange(m) * piece) // per_file).astype(int), math.ceil(sc.size / per_file) - 1)
        file_end = np.array([t_fetch[file_of == f].max() for f in range(file_of.max() + 1)])
        file_bytes = np.array([min(per_file, sc.size - f * per_file) for f in range(file_of.max() + 1)])
        release = (file_end + file_bytes / sc.build_rate)[file_of]
    else:
        release = np.full(m, t_fetch[-1] + sc.size / sc.build_rate)
    holder_ready = float(t_fetch[-1])  # a holder's own fill is verified in-line with the fetch

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
    released = np.zeros(m, dtype=bool)

    dt = piece / down / 4
    t = 0.0
    first_release = float(release.min())
    while not np.all(np.isfinite(ready)):
        t += dt
        # slot holders: pieces released by their origin fill
        newly = (~released) & (release <= t)
        if newly.any():
            released |= newly
            have[:k, newly] = True
            avail[newly] += k
            serving_from[:k] = np.minimum(serving_from[:k], first_release)
        if t >= holder_ready:
            ready[:k] = np.minimum(ready[:k], holder_ready)
        if t >= first_release + sc.join_delay:
            joined[k:] = np.minimum(joined[k:], first_release + sc.join_delay)

        leeching = (joined <= t) & ~np.isfinite(done_at) & ~is_holder
        serving = (serving_from <= t) | leeching  # a leecher shares what it has; a finished one after publish
        count = have.sum(1)
        # assign pieces to idle links whose uploader gained pieces since the last miss
        idle = (lp < 0) & serving[lu] & leeching[ld] & (count[lu] > tried)
        for li in np.flatnonzero(idle):
            u, d = lu[li], ld[li]
            cand = have[u] & ~have[d] & ~inprog[d]
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
        scale = np.where(want > down * dt, down * dt / np.maximum(want, 1e-9), 1.0)
        got = offer * scale[ld[links]]
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
                serving_from[d] = ready[d]  # torrent removed while hashing and publishing, re-added as a seed
                for li in np.flatnonzero(lu == d):  # its uploads stop meanwhile
                    if lp[li] >= 0:
                        inprog[ld[li], lp[li]] = False
                        lp[li] = -1
                        tried[ld == ld[li]] = -1
        if t > 100 * sc.limit + 1000:
            raise RuntimeError(f"simulation did not converge: {int(np.isfinite(ready).sum())}/{n} ready at {t:.0f}s")
    return SimResult(sc, float(ready.max()), sorted(float(r) for r in ready), k * sc.size,
                     [float(b) for b in peer_bytes])


def lab_scenario(n: int, size: float, **kw: float) -> Scenario:
    """The lab's settings: 1 MiB pieces (piece rule for a few hundred MB), 128 MiB shards, all peers known."""
    return Scenario(nodes=n, size=size, piece=1 << 20, node_rate=200 * MBIT, origin_rate=400 * MBIT,
                    file_size=128 << 20, **kw)  # type: ignore[arg-type]


def cluster_scenario(n: int, granularity: Granularity) -> Scenario:
    """140 GB, 16 MiB pieces, 5 GB shards, 25 Gb/s nodes, 100 Gb/s origin, 50 connections per node.

    build_rate 5 GB/s: the holder hashes its blobs with one thread per core from NVMe; verify_rate
    1.4 GB/s: sha256 of the last shard on one core (the others were hashed while the rest arrived).
    """
    return Scenario(nodes=n, size=140e9, piece=16 << 20, node_rate=25 * GBIT, origin_rate=100 * GBIT,
                    connections=50, file_size=5e9, build_rate=5e9, verify_rate=1.4e9, join_delay=1.0,
                    origin_setup=2.0, granularity=granularity, max_pieces=600)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--lab", help="JSON written by bench.swarm_lab --json: compare with the measured figures")
    ap.add_argument("--size", type=float, default=300e6, help="lab model bytes when no --lab is given")
    ap.add_argument("--nodes", default="100,1000", help="cluster-scale N")
    ap.add_argument("--quick", action="store_true", help="small cluster runs only (CI)")
    args = ap.parse_args(argv)
    measured = json.loads(Path(args.lab).read_text()) if args.lab else []
    lab_runs = [(r["nodes"], r["size"], r) for r in measured] or [(n, args.size, None) for n in (2, 4, 8)]
    print("lab scenarios (200 Mbit/s nodes, 400 Mbit/s origin):")
    for n, size, r in lab_runs:
        sim = simulate(lab_scenario(n, size))
        line = sim.line()
        if r is not None:
            lab_ratio = r["seconds"] / r["limit"]
            err = (sim.seconds - r["seconds"]) / r["seconds"]
            line += f" | lab {r['seconds']:.2f}s ratio {lab_ratio:.2f} origin/model {r['origin_bytes'] / r['size']:.2f}"
            line += f" | sim error {err:+.0%}"
        print("  " + line, flush=True)
    print("cluster (140 GB, 25 Gb/s nodes, 100 Gb/s origin, originConcurrency 1):")
    for n in (int(x) for x in args.nodes.split(",")):
        for g in ("model", "file", "piece"):
            sc = cluster_scenario(n, g)  # type: ignore[arg-type]
            if args.quick:
                sc = replace(sc, max_pieces=64)
            print("  " + simulate(sc).line(), flush=True)


if __name__ == "__main__":
    main()
