"""Issue 6: is the scrub as fast as ``xxhsum``, does its pacing hold, how fast does a restart relabel?

Run from the repo root: ``python -m bench.scrub [--size 2G] [--models 50] [--files 10000] [--dir D]``.

Part 1 fills a cache (real manifests, via ``fill_model`` from a generated PVC folder) with one model
of ``--size`` bytes in several shards, then times ``xxhsum -H128`` over its blobs against
``Store.check(manifest, deep=True)`` (the scrub's code path), warm (second of two runs) and cold
(``echo 3 > /proc/sys/vm/drop_caches`` first, needs root), and runs the ``Scrubber`` at the default
200 MiB/s to show the pacing holds. Part 2 builds a warm cache of ``--models`` models with
``--files`` files in all, starts ``python -m agent run --no-kubernetes`` against an empty PVC (so
nothing can be refilled), and times process start -> every model labelled, plus one loop pass.
It prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import xxhash
import yaml

from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core.desired import DesiredState
from agent.core.spec import ModelSpec
from agent.log import configure
from agent.modelgen import make_model_dir, write_hub_layout
from agent.runtime.fill import fill_model
from agent.runtime.loop import Loop
from agent.runtime.scrub import Scrubber
from agent.sources.pvc import PvcSource
from bench.common import drop_caches, parse_size

MiB = 1 << 20
BIG_REPO = "bench/scrub-model"
DEFAULT_RATE = 200 * MiB  # RunSettings.scrub_bytes_per_second

# Fallback baseline when Debian's xxhash package is missing: the same xxh3-128 in a fresh process.
PY_XXHSUM = (
    "import sys, xxhash\n"
    "buf = bytearray(1 << 20)\n"
    "for p in sys.argv[1:]:\n"
    "    h = xxhash.xxh3_128()\n"
    "    with open(p, 'rb', buffering=0) as f:\n"
    "        while n := f.readinto(buf):\n"
    "            h.update(memoryview(buf)[:n])\n"
    "    print(h.hexdigest(), p)\n"
)


def gib_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / (1 << 30):6.2f} GiB/s" if seconds > 0 else "   inf"


# -- part 1: throughput ----------------------------------------------------------------------------


def build_big(work: Path, size: int, shards: int) -> tuple[Store, Manifest, list[Path]]:
    """One model of ``size`` bytes filled through the real PVC path (the blobs are the agent's own)."""
    gen, pvc = work / "gen", work / "pvc"
    make_model_dir(gen, weight_bytes=size, shards=shards, seed=6)
    write_hub_layout(gen, pvc / "hub", BIG_REPO, move=True)
    shutil.rmtree(gen, ignore_errors=True)
    store = Store(work / "cache")
    m = fill_model(store, [PvcSource(pvc)], BIG_REPO, "main").manifest
    shutil.rmtree(pvc, ignore_errors=True)  # keep the disk (and the page cache) to the cache's copy
    blobs = sorted({store.layout.blob_path(m.repo, f.digest) for f in m.files})
    return store, m, blobs


class Baseline:
    """``xxhsum -H128`` over the blobs, or the same hash in a ``python -c`` when it is missing."""

    def __init__(self) -> None:
        exe = shutil.which("xxhsum")
        self.cmd = [exe, "-H128"] if exe else [sys.executable, "-c", PY_XXHSUM]
        self.name = "xxhsum -H128" if exe else "python -c xxhash.xxh3_128 (xxhsum not installed)"

    def run(self, blobs: Sequence[Path], m: Manifest, store: Store) -> float:
        t0 = time.perf_counter()
        out = subprocess.run([*self.cmd, *map(str, blobs)], check=True, capture_output=True, text=True).stdout
        dt = time.perf_counter() - t0
        want = {str(store.layout.blob_path(m.repo, f.digest)): f.xxh3 for f in m.files}
        for line in out.splitlines():  # same digests as the manifest, or the comparison is meaningless
            digest, path = line.split(maxsplit=1)
            if want.get(path) != digest:
                raise SystemExit(f"baseline digest {digest} for {path} differs from manifest {want.get(path)}")
        return dt


def time_check(store: Store, m: Manifest) -> float:
    t0 = time.perf_counter()
    rep = store.check(m, deep=True)
    dt = time.perf_counter() - t0
    if not rep.ok:
        raise SystemExit(f"deep check failed: {rep.problems()[:3]}")
    return dt


def in_memory_xxh3(nbytes: int = 256 * MiB) -> float:
    """xxh3-128 over a buffer already in memory: the ceiling with no read syscalls at all."""
    buf = os.urandom(16 * MiB)
    h = xxhash.xxh3_128()
    t0 = time.perf_counter()
    for _ in range(nbytes // len(buf)):
        h.update(buf)
    return nbytes / (time.perf_counter() - t0)


def paced_scrub(store: Store, rate: int) -> tuple[int, float, float]:
    """One paced ``scrub_once``: bytes, seconds, and the busiest 1 s window (bytes/s)."""
    marks: list[tuple[float, int]] = []
    done = [0]

    def count(n: int) -> None:
        done[0] += n
        marks.append((time.perf_counter(), done[0]))

    scr = Scrubber(store, lambda repo, blobs: None, rate=rate, on_bytes=count)
    t0 = time.perf_counter()
    reports = scr.scrub_once()
    dt = time.perf_counter() - t0
    if not all(r.ok for r in reports):
        raise SystemExit("paced scrub found damage in a fresh cache")
    peak = 0.0
    j = 0
    points = [(t0, 0), *marks]
    for i in range(1, len(points)):  # most bytes completed within any 1 s window (ending at a chunk)
        while points[i][0] - points[j][0] > 1.0:
            j += 1
        peak = max(peak, float(points[i][1] - points[j][1]))
    return done[0], dt, peak


def part_throughput(work: Path, size: int, shards: int, rate: int, cold_runs: int) -> None:
    t0 = time.perf_counter()
    store, m, blobs = build_big(work / "big", size, shards)
    total = sum(b.stat().st_size for b in blobs)
    print(f"== scrub throughput: {len(m.files)} files, {len(blobs)} blobs, {total / (1 << 30):.2f} GiB "
          f"({shards} shards), built in {time.perf_counter() - t0:.1f}s")
    base = Baseline()
    print(f"   baseline: {base.name}; in-memory xxh3-128 ceiling {gib_s(1, 1 / in_memory_xxh3())}")
    problem = None
    base_run, check_run = (lambda: base.run(blobs, m, store)), (lambda: time_check(store, m))
    base_run(), check_run()  # warm the page cache; the second run of each is the warm figure
    warm = (base_run(), check_run())
    cold: tuple[list[float], list[float]] = ([], [])
    for _ in range(cold_runs):  # interleaved: a virtual disk's speed drifts between runs
        for runs, fn in zip(cold, (base_run, check_run), strict=True):
            problem = drop_caches() or problem
            runs.append(fn())
    if problem:
        print(f"   WARNING: could not drop caches ({problem}): 'cold' below is really warm")
    tb, tc = warm
    print(f"   warm (2nd run): baseline {tb:5.2f}s {gib_s(total, tb)} | Store.check(deep) {tc:5.2f}s "
          f"{gib_s(total, tc)} | ours/baseline throughput {tb / tc:.2f}x")
    tb, tc = statistics.median(cold[0]), statistics.median(cold[1])
    print(f"   cold (median of {cold_runs}): baseline {tb:5.2f}s {gib_s(total, tb)} | Store.check(deep) {tc:5.2f}s "
          f"{gib_s(total, tc)} | ours/baseline throughput {tb / tc:.2f}x")
    print(f"      cold runs: baseline {' '.join(f'{t:.2f}' for t in cold[0])} s; "
          f"check {' '.join(f'{t:.2f}' for t in cold[1])} s")
    drop_caches()
    nbytes, dt, peak = paced_scrub(store, rate)
    print(f"   Scrubber.scrub_once at {rate / MiB:.0f} MiB/s (cold start): {nbytes / MiB:.0f} MiB in {dt:.2f}s = "
          f"{nbytes / dt / MiB:.1f} MiB/s average, busiest 1 s window {peak / MiB:.1f} MiB/s")
    shutil.rmtree(work / "big", ignore_errors=True)


# -- part 2: restart -> relabel --------------------------------------------------------------------


def build_many(work: Path, models: int, files: int) -> tuple[Store, list[str]]:
    """``models`` filled models of ``files // models`` small json files each (real manifests and links)."""
    per = max(files // models, 1)
    pvc = work / "pvc"
    repos = []
    for i in range(models):
        repo = f"bench/relabel-{i:03d}"
        gen = work / "gen" / str(i)
        for j in range(per):
            sub = gen / (f"shard{j % 4}" if j % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"file-{j:04d}.json").write_text(json.dumps({"model": i, "file": j, "pad": "x" * (j % 97)}))
        write_hub_layout(gen, pvc / "hub", repo, move=True)
        repos.append(repo)
    shutil.rmtree(work / "gen", ignore_errors=True)
    store = Store(work / "cache", fsync=False)  # fsync changes nothing a restart reads, only build time
    src = PvcSource(pvc)
    for i, repo in enumerate(repos):
        fill_model(store, [src], repo, "main", record_as=f"m{i:03d}")  # the names relabel_subprocess uses
    shutil.rmtree(pvc)
    return Store(work / "cache"), repos


def relabel_subprocess(work: Path, store: Store, repos: list[str]) -> tuple[float, float, float]:
    """Start the CLI; seconds from spawn to the status file first listing every model (wall, by history)."""
    empty = work / "empty-pvc"
    (empty / "hub").mkdir(parents=True, exist_ok=True)
    mf = work / "models.yaml"
    mf.write_text(yaml.safe_dump([{"name": f"m{i:03d}", "repo": r} for i, r in enumerate(repos)]))
    status = store.layout.agent_dir / "node-status.json"
    status.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "agent", "run", "--no-kubernetes", "--cache-dir", str(store.layout.root),
           "--models-file", str(mf), "--source", f"pvc:{empty}", "--metrics-port", "0", "--node-name", "bench",
           "--scrub-interval", "0", "--check-interval", "60"]
    t_spawn = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"agent exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                doc = json.loads(status.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                doc = {}
            if len(doc.get("labels", {})) == len(repos):
                polled = time.perf_counter() - t0
                break
            if time.perf_counter() - t0 > 120:
                raise SystemExit("agent did not label every model within 120 s")
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    hist = doc["history"]
    first = next(h["at"] for h in hist if len(h["ready"]) == len(repos))
    return polled, first - t_spawn, hist[0]["at"] - t_spawn


class _QuietReporter:
    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        self.ready = ready

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        pass

    def pin(self, name: str, commit: str, revision: str) -> str:
        return commit


def loop_pass(work: Path, store: Store, repos: list[str]) -> tuple[float, float, float]:
    """One ``Loop.run_once`` (fresh process state, warm disk); also all fast checks alone."""
    rep = _QuietReporter()
    rec = Loop(store, [PvcSource(work / "empty-pvc")], rep, workers=1)
    specs = {f"m{i:03d}": ModelSpec(name=f"m{i:03d}", repo=r) for i, r in enumerate(repos)}
    rec.set_desired(DesiredState(models=specs, synced=True))
    t0 = time.perf_counter()
    rec.run_once()
    dt_pass = time.perf_counter() - t0
    rec.shutdown(1.0)
    if len(rep.ready) != len(repos):
        raise SystemExit(f"run_once labelled {len(rep.ready)} of {len(repos)}")
    t0 = time.perf_counter()
    ms = store.manifests()
    dt_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert all(store.check(m).ok for m in ms)
    return dt_pass, dt_load, time.perf_counter() - t0


def part_relabel(work: Path, models: int, files: int) -> None:
    t0 = time.perf_counter()
    store, repos = build_many(work / "many", models, files)
    n = sum(len(m.files) for m in store.manifests())
    print(f"== restart -> relabel: {models} models, {n} files, built in {time.perf_counter() - t0:.1f}s")
    for mode in ("warm", "warm", "warm", "cold"):
        problem = drop_caches() if mode == "cold" else None  # cold: as after a node reboot (dentries too)
        polled, by_hist, first = relabel_subprocess(work / "many", store, repos)
        print(f"   {mode}: process spawn -> all {models} labelled: {by_hist:.3f}s by history timestamp "
              f"({polled:.3f}s polled; first label write at {first:.3f}s)"
              + (f" [could not drop caches: {problem}]" if problem else ""))
    passes = [loop_pass(work / "many", store, repos) for _ in range(3)]
    for dt_pass, dt_load, dt_check in passes:
        print(f"   Loop.run_once over {models} models: {dt_pass * 1000:.0f} ms "
              f"(Store.manifests() {dt_load * 1000:.0f} ms + Store.check() x{models} {dt_check * 1000:.0f} ms)")
    shutil.rmtree(work / "many", ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrub", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="model size for part 1 (2G)")
    ap.add_argument("--shards", type=int, default=0, help="safetensors shards (default: one per 512 MiB, >= 4)")
    ap.add_argument("--models", type=int, default=50, help="models for part 2 (50)")
    ap.add_argument("--files", type=int, default=10000, help="files over all models for part 2 (10000)")
    ap.add_argument("--cold-runs", type=int, default=5, help="cold runs of each, interleaved; median shown (5)")
    ap.add_argument("--rate", type=parse_size, default=DEFAULT_RATE, help="scrub pacing to check (200M)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--skip", choices=("throughput", "relabel"), action="append", default=[])
    args = ap.parse_args(argv)
    configure(level="warning")  # the fills' info lines would bury the figures
    shards = args.shards or max(4, args.size // (512 * MiB))
    work = Path(tempfile.mkdtemp(prefix="bench-scrub-", dir=args.dir or "/var/tmp"))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work dir {work}, "
          f"xxhash {xxhash.VERSION} (libxxhash {xxhash.XXHASH_VERSION})")
    try:
        if "throughput" not in args.skip:
            part_throughput(work, args.size, shards, args.rate, args.cold_runs)
        if "relabel" not in args.skip:
            part_relabel(work, args.models, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

