"""Issue 9: does the loop cost what the models cost? N tiny models in file mode, one agent process.

Run from the repo root: ``python -m bench.many_models [--n 10 100 300 1000] [--workers 2] [--idle 10]``.

For each N it generates N tiny real models (config, tokenizer, 2 safetensors shards + index: 9 files)
in one PVC folder, starts ``python -m agent run --no-kubernetes`` on an empty cache with a models
file listing all N, and prints: seconds from spawn to every model labelled, fills per model (from
the agent's own ``modelcache_fill_duration_seconds_count``: every model must be filled exactly once),
the agent's CPU over ``--idle`` seconds after that (idle CPU %), its RSS, and the baseline the same
run measures: ``cp -rL`` of all N snapshot folders into a fresh folder (the bytes a fill must move).
Goals (issue 9): time grows linearly in N, one fill per model, idle CPU < 1 %, RSS < 150 MB at 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from agent.modelgen import make_hub_model

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
    return out


def one(work: Path, n: int, workers: int, idle: float) -> dict[str, float]:
    pvc = work / f"pvc-{n}"
    for i in range(n):
        make_hub_model(pvc / "hub", f"many/m{i:04d}", weight_bytes=8 * 1024, shards=2, seed=i)
    mf = work / f"models-{n}.yaml"
    mf.write_text(yaml.safe_dump([{"name": f"m{i:04d}", "repo": f"many/m{i:04d}"} for i in range(n)]))
    cache = work / f"cache-{n}"
    status = cache / ".agent" / "node-status.json"
    t0 = time.perf_counter()
    subprocess.run(["cp", "-rL", str(pvc / "hub"), str(work / f"cp-{n}")], check=True)
    cp_secs = time.perf_counter() - t0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t_spawn = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--log-json", "--log-level", "warning", "run", "--no-kubernetes",
         "--models-file", str(mf), "--source", f"pvc:{pvc}", "--cache-dir", str(cache), "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--workers", str(workers), "--scrub-interval", "0"],
        stdout=subprocess.DEVNULL, stderr=open(work / f"agent-{n}.log", "w"), env=env)  # noqa: SIM115
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"agent exited {proc.returncode}; see {work}/agent-{n}.log")
            try:
                doc = json.loads(status.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                doc = {}
            if len(doc.get("labels", {})) == n:
                break
            if time.perf_counter() - t_spawn > 1800:
                raise SystemExit(f"not all {n} ready within 30 min")
            time.sleep(0.05)
        all_ready = time.perf_counter() - t_spawn
        time.sleep(2.0)  # let the last passes settle
        c0, w0 = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(idle)
        idle_cpu = (cpu_seconds(proc.pid) - c0) / (time.perf_counter() - w0) * 100
        rss = rss_mb(proc.pid)
        m = metrics(port)
        fills = sum(v for k, v in m.items() if k.startswith("modelcache_fill_duration_seconds_count"))
        failures = sum(v for k, v in m.items() if k.startswith("modelcache_fill_failures_total"))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(pvc, ignore_errors=True)
    shutil.rmtree(work / f"cp-{n}", ignore_errors=True)
    return {"n": n, "all_ready_s": all_ready, "per_model_ms": all_ready / n * 1000, "fills": fills,
            "fills_per_model": fills / n, "failures": failures, "idle_cpu_pct": idle_cpu, "rss_mb": rss,
            "cp_s": cp_secs}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.many_models", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 300, 1000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured after all ready (10)")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="many-models-", dir=args.dir or "/var/tmp"))
    rows = []
    try:
        print(f"{'N':>5} {'all ready':>10} {'per model':>10} {'fills/model':>11} {'failures':>8} "
              f"{'idle CPU':>8} {'RSS':>8} {'cp -rL':>8} {'vs cp':>6}")
        for n in args.n:
            r = one(work, n, args.workers, args.idle)
            rows.append(r)
            print(f"{n:>5} {r['all_ready_s']:>9.2f}s {r['per_model_ms']:>8.1f}ms {r['fills_per_model']:>11.2f} "
                  f"{r['failures']:>8.0f} {r['idle_cpu_pct']:>7.2f}% {r['rss_mb']:>6.0f}MB {r['cp_s']:>7.2f}s "
                  f"{r['all_ready_s'] / max(r['cp_s'], 1e-9):>5.1f}x", flush=True)
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            growth = (b["all_ready_s"] / a["all_ready_s"]) / (b["n"] / a["n"])
            print(f"time growth vs linear from N={a['n']} to N={b['n']}: {growth:.2f} (1.00 = linear)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
