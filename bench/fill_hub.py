"""Benchmark: our verified Hub fill vs huggingface_hub's snapshot_download, same server, same run.

    python -m bench.fill_hub [--size 2G] [--shards 4] [--repeat 3] [--cdn] [--workdir DIR]

Generates a sharded safetensors model, serves it from the loopback Hub (tests/peers/hub_server.py),
then downloads it into two empty caches: ``snapshot_download`` (HF_HUB_DISABLE_XET=1, its defaults:
8 threads, one stream per file, size check only) and ours (HubSource + Store: hf_transfer for large
files, sha256 of every byte checked, fsync, stage-verify-publish). Prints both times and ours/official
(target <= 1.0, medians over --repeat alternating runs). Both read the same page-cached files
from the same server process; the page cache is flushed (sync) before every run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from huggingface_hub import snapshot_download

from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.modelgen import make_model_dir
from agent.sources.base import NullProgress, SourceSettings
from agent.sources.hub import HubSource
from bench.common import parse_size
from tests.peers.hub_server import HubServer

REPO = "bench/model"


def run_official(url: str, cache: Path) -> float:
    t0 = time.perf_counter()
    snapshot_download(REPO, revision="main", cache_dir=cache, endpoint=url, token=False)
    return time.perf_counter() - t0


def run_ours(url: str, root: Path, workers: int) -> float:
    t0 = time.perf_counter()
    src = HubSource(SourceSettings(hf_endpoint=url, max_workers=workers))
    store = Store(root)
    try:
        plan = src.resolve(REPO, "main", FileFilter())
        with store.lock(REPO):
            fill = store.begin(plan)
            src.fetch(plan, fill.needed(), fill, NullProgress())
            manifest = fill.publish()
    finally:
        src.close()
    elapsed = time.perf_counter() - t0
    assert manifest.level == "verified" and store.check(manifest).ok
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G", help="total weight bytes, e.g. 512M, 2G")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4, help="our files in flight (SourceSettings.max_workers)")
    ap.add_argument("--cdn", action="store_true", help="serve LFS bytes through a 302 to another origin")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating which goes first")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=args.workdir))
    try:
        src = work / "model"
        t0 = time.perf_counter()
        make_model_dir(src, weight_bytes=size, shards=args.shards, nested=True)
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        files = sum(1 for p in src.rglob("*") if p.is_file())
        print(f"model: {files} files, {total / 2**20:.0f} MiB ({args.shards} shards), "
              f"generated in {time.perf_counter() - t0:.1f}s")
        official: list[float] = []
        ours: list[float] = []
        with HubServer() as hub:
            hub.add_repo(REPO, src, cdn=args.cdn)
            for i in range(args.repeat):
                order = ("official", "ours") if i % 2 == 0 else ("ours", "official")
                for who in order:
                    dest = work / f"{who}-{i}"
                    os.sync()  # the previous run's dirty pages must not be flushed on this run's clock
                    if who == "official":
                        official.append(run_official(hub.url, dest))
                    else:
                        ours.append(run_ours(hub.url, dest, args.workers))
                    shutil.rmtree(dest, ignore_errors=True)
                print(f"run {i + 1}: official {official[-1]:6.2f} s   ours {ours[-1]:6.2f} s   "
                      f"ratio {ours[-1] / official[-1]:.2f}")
        mib = total / 2**20
        o, u = statistics.median(official), statistics.median(ours)
        print(f"official snapshot_download : {o:7.2f} s  {mib / o:8.0f} MiB/s  (median; size check only)")
        print(f"ours (hub source + store)  : {u:7.2f} s  {mib / u:8.0f} MiB/s  (median; sha256 verified, fsync)")
        print(f"ratio ours/official        : {u / o:7.2f}  (ratio of the medians; target <= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
