"""How much does verifying cost? ``model-cache-agent fill`` from a PVC vs ``cp -rL`` + ``sync``.

Run from the repo root: ``python -m bench.fill_pvc [--size 2G] [--files N] [--dir D] [--repeat R]``.

It generates a model of N files totalling about S bytes (safetensors shards + small json files)
in a temporary PVC folder in Hugging Face cache layout, then times, with the page cache cold and
warm: the baseline ``cp -rL <snapshot>`` followed by ``sync`` (same durability as the agent, no
verification), and the real CLI in a subprocess (whole command, plus the ``fill.done`` seconds it
logs). ``sha256sum`` of the blobs is timed as a reference. It prints figures; it is not a test.
Cold means ``sync; echo 3 > /proc/sys/vm/drop_caches`` right before the timed run (needs root;
when that fails the report says so, because then "cold" is really warm).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.cache.layout import repo_folder_name
from agent.modelgen import make_model_dir, write_hub_layout
from bench.common import drop_caches, parse_size

REPO = "bench/fill-pvc-model"
SMALL_FILES = 8  # make_model_dir's json/README files (7) + the shard index


def read_all(paths: Sequence[Path]) -> None:
    """Pull files into the page cache (the 'warm' state)."""
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def agent_exe() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m agent``."""
    exe = Path(sys.executable).with_name("model-cache-agent")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent"]


def children_cpu() -> float:
    """CPU seconds used by finished children: less sensitive than wall time to other load on the box."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Runs:
    cp: list[float] = field(default_factory=list)
    agent: list[float] = field(default_factory=list)
    agent_fill: list[float] = field(default_factory=list)
    cp_cpu: list[float] = field(default_factory=list)
    agent_cpu: list[float] = field(default_factory=list)
    sha256sum: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, work: Path, pvc: Path, snap: Path, blobs: list[Path], total: int) -> None:
        self.work = work
        self.pvc = pvc
        self.snap = snap
        self.blobs = blobs
        self.total = total
        self.cache_problem: str | None = None

    def _prepare(self, mode: str, dest: Path | None) -> None:
        """Untimed: remove the last copy, flush everything, then drop or warm the page cache."""
        if dest is not None and dest.exists():
            shutil.rmtree(dest)
        if mode == "cold":
            problem = drop_caches()
            if problem:
                self.cache_problem = problem
        else:
            os.sync()
            read_all(self.blobs)

    def cp(self, mode: str) -> tuple[float, float]:
        dest = self.work / "cp-dest"
        self._prepare(mode, dest)
        dest.mkdir()
        c0 = children_cpu()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-rL", str(self.snap), str(dest / "snapshot")], check=True)
        subprocess.run(["sync"], check=True)
        secs = time.perf_counter() - t0
        cpu = children_cpu() - c0
        shutil.rmtree(dest)
        return secs, cpu

    def agent(self, mode: str) -> tuple[float, float, float]:
        dest = self.work / "agent-cache"
        self._prepare(mode, dest)
        cmd = [*agent_exe(), "--log-json", "fill", REPO, "--source", f"pvc:{self.pvc}",
               "--cache-dir", str(dest), "--json"]
        c0 = children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        cpu = children_cpu() - c0
        if proc.returncode != 0:
            raise SystemExit(f"agent failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["level"] != "verified" or result["fetched_bytes"] != self.total:
            raise SystemExit(f"agent did not verify every byte: {result}")
        fill_secs = float("nan")
        for line in proc.stderr.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "fill.done":
                fill_secs = float(ev["seconds"])
        shutil.rmtree(dest)
        return secs, fill_secs, cpu

    def sha256sum(self, mode: str) -> float:
        self._prepare(mode, None)
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, self.blobs)], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def hashlib_rate(paths: Sequence[Path]) -> float:
    """Single-thread hashlib sha256 GB/s over warm files (what one agent hash thread can do)."""
    read_all(paths)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                h.update(view[:k])
                n += k
    return n / (time.perf_counter() - t0) / 1e9


def make_source(work: Path, size: int, files: int) -> tuple[Path, Path, list[Path], int]:
    """Generate the model and lay it out as a PVC; shards are written one at a time (bounded RAM)."""
    shards = max(files - SMALL_FILES, 1)
    gen = work / "gen"
    make_model_dir(gen, weight_bytes=size, shards=shards, seed=7)
    pvc = work / "pvc"
    write_hub_layout(gen, pvc / "hub", REPO, move=True)  # rename, no second copy
    shutil.rmtree(gen)
    return find_source(pvc)


def find_source(pvc: Path) -> tuple[Path, Path, list[Path], int]:
    repo_dir = pvc / "hub" / repo_folder_name(REPO)
    commit = (repo_dir / "refs" / "main").read_text().strip()
    blobs = sorted((repo_dir / "blobs").iterdir())
    return pvc, repo_dir / "snapshots" / commit, blobs, sum(b.stat().st_size for b in blobs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fill_pvc", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="total model bytes (default 2G)")
    ap.add_argument("--files", type=int, default=12, help="files in the model, 8 of them small (default 12)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: the system temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the median is shown (default 3)")
    ap.add_argument("--modes", default="cold,warm", help="comma list of cold,warm (default both)")
    ap.add_argument("--no-cp", action="store_true", help="skip the cp baseline and sha256sum (agent only)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (prints its path)")
    ap.add_argument("--pvc", type=Path, default=None, help="reuse the PVC folder of an earlier --keep run")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"cold", "warm"}:
        ap.error("--modes: cold and/or warm")

    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    need = 3 * args.size + (256 << 20)  # source + cp copy + agent copy (never both at once) + slack
    if free < need:
        print(f"error: {parent} has {free / 1e9:.1f} GB free; need {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-fill-pvc-", dir=parent))
    try:
        t0 = time.perf_counter()
        if args.pvc:
            pvc, snap, blobs, total = find_source(args.pvc)
        else:
            pvc, snap, blobs, total = make_source(work, args.size, args.files)
        n_files = sum(len(fs) for _, _, fs in os.walk(snap))
        print(f"source: {n_files} files, {total} bytes ({total / 2**30:.2f} GiB) in {pvc} "
              f"(ready in {time.perf_counter() - t0:.1f}s)")
        print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
              f"disk free {free / 1e9:.0f} GB under {parent}")
        print(f"load average before timing: {os.getloadavg()[0]:.1f} (other work on the box skews wall times)")
        bench = Bench(work, pvc, snap, blobs, total)
        results = {m: Runs() for m in modes}
        for mode in modes:
            r = results[mode]
            for i in range(args.repeat):
                order = ("cp", "agent") if i % 2 == 0 else ("agent", "cp")  # alternate to cancel drift
                for what in order:
                    if what == "cp" and not args.no_cp:
                        secs, cpu = bench.cp(mode)
                        r.cp.append(secs)
                        r.cp_cpu.append(cpu)
                    elif what == "agent":
                        secs, fill_secs, cpu = bench.agent(mode)
                        r.agent.append(secs)
                        r.agent_fill.append(fill_secs)
                        r.agent_cpu.append(cpu)
            if not args.no_cp:
                r.sha256sum.append(bench.sha256sum(mode))
        report(results, total, bench.cache_problem, blobs, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, Runs], total: int, cache_problem: str | None, blobs: list[Path],
           args: argparse.Namespace) -> None:
    gb = total / 1e9

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    def runs(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    if cache_problem and "cold" in results:
        print(f"WARNING: could not drop the page cache ({cache_problem}); 'cold' rows are NOT cold")
    print(f"load average after timing: {os.getloadavg()[0]:.1f}")
    print(f"\nmedian of {args.repeat}; GB = 1e9 bytes; agent = whole CLI process, fill = its fill.done seconds;"
          " cpu = user+sys of the child processes")
    print(f"{'mode':<5} {'cp+sync s':>9} {'agent s':>8} {'fill s':>7} {'agent/cp':>8} "
          f"{'cp GB/s':>8} {'agent GB/s':>10} {'cp cpu s':>8} {'agent cpu s':>11}")
    for mode, r in results.items():
        cp, ag, fl = med(r.cp), med(r.agent), med(r.agent_fill)
        print(f"{mode:<5} {cp:>9.2f} {ag:>8.2f} {fl:>7.2f} {ag / cp:>8.3f} {gb / cp:>8.2f} {gb / ag:>10.2f} "
              f"{med(r.cp_cpu):>8.2f} {med(r.agent_cpu):>11.2f}")
    print()
    for mode, r in results.items():
        print(f"{mode} runs: cp+sync [{runs(r.cp)}]  agent [{runs(r.agent)}]  fill.done [{runs(r.agent_fill)}]")
        if r.cp and r.agent:
            print(f"{mode} best: cp+sync {min(r.cp):.2f}s, agent {min(r.agent):.2f}s, "
                  f"ratio of minima {min(r.agent) / min(r.cp):.3f}")
        if r.sha256sum:
            s = r.sha256sum[0]
            print(f"{mode} sha256sum of the blobs (reference, coreutils, 1 thread): {s:.2f}s, {gb / s:.2f} GB/s")
    print(f"hashlib sha256, 1 thread, warm: {hashlib_rate(blobs):.2f} GB/s")


if __name__ == "__main__":
    raise SystemExit(main())
