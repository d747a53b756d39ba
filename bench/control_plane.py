"""Control plane at scale: N agents, one emulated API server, what each agent asks of it.

Each agent is the real thing minus what does not talk to the API server (metrics, scrub, hub
watcher): its own cache root, a PVC source holding one tiny model, the Reconciler, and the cluster
side exactly as ``run_agent`` wires it (``agent.k8s.wiring.start_cluster_parts``), with its own
client (User-Agent = node name, so the emulator counts per agent). ``--mode inproc`` runs the agents
as threads of this process (they share nothing but the API server); ``--mode process`` as one
process each (``python -m bench.control_plane agent ...``), killed with SIGKILL for the failover.

For each N it runs, and prints per node:

1. rollout (real timings): create one CachedModel (revision ``main``, so a pin is needed) selecting
   all N nodes; requests by verb and resource per node, watch events per node, Node writes per node,
   CachedModel status writes, conflicts, time from create to ``status.readyNodes == N``;
2. failover (real timings): kill the leader (SIGKILL, or cut off + stopped in-process); time until
   another agent holds the Lease, and whether ``readyNodes`` ever left N or the status was rewritten;
3. steady state, one hour compressed ``--compress k`` times (every timer divided by k: Lease
   timings, watch session length, aggregate and status intervals, bookmarks; the QPS limit
   multiplied by k); counts per node per (compressed) hour.

``--baseline`` also runs main's agents (``git archive main``, ``python -m agent run``) for the same
rollout and a steady minute at the smallest N: the ratios are against that.

    nice -n 10 .venv/bin/python -m bench.control_plane --nodes 10,25,50
    .venv/bin/python -m bench.control_plane --ci          # N=3, seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.cache.store import Store
from agent.core.retry import RetryPolicy
from agent.k8s.client import make_api
from agent.k8s.settings import KubeSettings
from agent.k8s.wiring import ClusterParts, LoopHooks, start_cluster_parts
from agent.modelgen import make_hub_model
from agent.runtime.loop import Loop
from agent.sources.base import SourceRef, SourceSettings
from agent.sources.factory import open_sources
from tests.peers.kube_emulator import KubeEmulator

ROOT = Path(__file__).resolve().parents[1]
P = "modelcache.dev"
NS = "model-cache"
GPU = "nvidia.com/gpu.present"
GROUP, PLURAL = "modelcache.dev", "cachedmodels"
REPO = "org/tiny"
LEASE = "model-cache-agent-leader"


def scaled(k: float, base: KubeSettings | None = None) -> KubeSettings:
    """Every timer divided by k, the QPS limit multiplied by k: one hour of this is 3600/k seconds."""
    b = base or KubeSettings(lease_namespace=NS)
    return replace(b, qps=b.qps * k, burst=b.burst, lease_duration=b.lease_duration / k,
                   lease_renew_period=b.lease_renew_period / k, lease_renew_deadline=b.lease_renew_deadline / k,
                   lease_acquire_jitter=b.lease_acquire_jitter / k, aggregate_interval=b.aggregate_interval / k,
                   node_status_interval=b.node_status_interval / k, watch_timeout=max(1.0, b.watch_timeout / k),
                   retry=RetryPolicy(attempts=b.retry.attempts, base=b.retry.base / k, cap=b.retry.cap / k))


# ---- one agent ----------------------------------------------------------------------------------------


def run_node_agent(node: str, kube_url: str, cache: Path, pvc: Path, ks: KubeSettings, stop: threading.Event,
                   *, check_interval: float = 60.0, parts_out: list[ClusterParts] | None = None) -> None:
    """An agent as run_agent wires it in cluster mode, without metrics/scrub/hub watcher. Returns on stop."""
    store = Store(cache)
    store.ensure_dirs()
    store.sweep_all()
    sources = open_sources([SourceRef("pvc", str(pvc))], SourceSettings())
    box: list[Loop] = []
    # on_in_use: nothing consumes it yet (issue 14), but the pod watch is part of what every agent costs.
    hooks = LoopHooks(on_desired=lambda d: box[0].set_desired(d), on_in_use=lambda _in_use: None)
    api = make_api(kube_url, request_timeout=ks.request_timeout, qps=ks.qps, burst=ks.burst, user_agent=node,
                   retry=ks.retry)
    parts = start_cluster_parts(ks, hooks, stop, node_name=node, prefix=P, api=api, start=False)
    if parts is None:
        return
    loop = Loop(store, sources, parts.reporter, workers=1, check_interval=check_interval)
    box.append(loop)
    if parts_out is not None:
        parts_out.append(parts)
    parts.start()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True, name=f"loop-{node}")
    thread.start()
    stop.wait()
    loop.wake()
    loop.shutdown(2.0)
    parts.close(2.0)
    for s in sources:
        s.close()


@dataclass
class Agent:
    node: str
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None
    parts: list[ClusterParts] = field(default_factory=list)

    def kill(self, kube: KubeEmulator) -> None:
        """Die without a word: SIGKILL, or (in-process) cut off from the API and stopped."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            return
        kube.partition(f"^{re.escape(self.node)}$", 3600)
        self.stop.set()

    def close(self) -> None:
        self.stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.thread is not None:
            self.thread.join(10)


def start_agent(mode: str, node: str, kube: KubeEmulator, tmp: Path, pvc: Path, ks: KubeSettings,
                check_interval: float) -> Agent:
    cache = tmp / f"cache-{node}"
    a = Agent(node)
    if mode == "inproc":
        a.thread = threading.Thread(target=run_node_agent, args=(node, kube.url, cache, pvc, ks, a.stop),
                                    kwargs={"check_interval": check_interval, "parts_out": a.parts},
                                    daemon=True, name=f"agent-{node}")
        a.thread.start()
        return a
    cmd = [sys.executable, "-m", "bench.control_plane", "agent", "--node", node, "--kube", kube.url,
           "--cache", str(cache), "--pvc", str(pvc), "--check-interval", str(check_interval),
           "--settings", json.dumps(settings_to_json(ks))]
    log = (tmp / f"agent-{node}.log").open("wb")
    a.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return a


def settings_to_json(ks: KubeSettings) -> dict[str, Any]:
    d = {k: v for k, v in ks.__dict__.items() if k != "retry"}
    d["retry"] = [ks.retry.attempts, ks.retry.base, ks.retry.cap]
    return d


def settings_from_json(d: dict[str, Any]) -> KubeSettings:
    attempts, base, cap = d.pop("retry")
    return KubeSettings(**d, retry=RetryPolicy(attempts=attempts, base=base, cap=cap))


# ---- the cluster ------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    kube: KubeEmulator
    agents: list[Agent]
    tmp: Path

    @property
    def nodes(self) -> list[str]:
        return [a.node for a in self.agents]

    def status(self) -> dict[str, Any]:
        return (self.kube.get(PLURAL, "m", group=GROUP) or {}).get("status") or {}

    def holder(self) -> str:
        lease = self.kube.get("leases", LEASE, group="coordination.k8s.io", namespace=NS) or {}
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    def started(self) -> bool:
        return all(f"{P}/status" in self.kube.node_annotations(n) for n in self.nodes) and bool(self.holder())

    def close(self) -> None:
        for a in self.agents:
            a.stop.set()
        for a in self.agents:
            a.close()


@contextlib.contextmanager
def cluster(n: int, mode: str, ks: KubeSettings, *, bookmark: float, check_interval: float,
            tmp: Path, pvc: Path) -> Iterator[Cluster]:
    kube = KubeEmulator(bookmark_interval=bookmark, history=max(1000, 40 * n)).start()
    for i in range(n):
        kube.create_node(f"node-{i:04d}", {GPU: "true", "kubernetes.io/hostname": f"node-{i:04d}"})
    run_tmp = Path(tempfile.mkdtemp(dir=tmp))
    c = Cluster(kube, [], run_tmp)
    try:
        for i in range(n):
            c.agents.append(start_agent(mode, f"node-{i:04d}", kube, run_tmp, pvc, ks, check_interval))
        if not kube.wait_for(c.started, timeout=60 + 2 * n, interval=0.2):
            raise RuntimeError(f"{n} agents did not start within {60 + 2 * n}s")
        yield c
    finally:
        c.close()
        kube.stop()
        shutil.rmtree(run_tmp, ignore_errors=True)


def cachedmodel() -> dict[str, Any]:
    return {"metadata": {"name": "m"},
            "spec": {"repo": REPO, "revision": "main", "nodeSelector": {"matchLabels": {GPU: "true"}}}}


def agent_counts(kube: KubeEmulator, since: float = 0.0) -> Counter[tuple[str, str]]:
    return kube.counts(client="^node-", since=since)


def per_node(c: Counter[tuple[str, str]], n: int, scale: float = 1.0) -> dict[str, float]:
    return {f"{verb} {res}": round(v * scale / n, 2) for (verb, res), v in sorted(c.items())}


# ---- phases --------------------------------------------------------------------------------------------------


def rollout(c: Cluster, n: int, settle: float) -> dict[str, Any]:
    kube = c.kube
    kube.reset_counters()
    t0 = time.monotonic()
    kube.create(PLURAL, cachedmodel(), group=GROUP)
    ready_at: list[float] = []
    if not kube.wait_for(lambda: c.status().get("readyNodes") == n and (ready_at.append(time.monotonic()) or True),
                         timeout=120 + n, interval=0.02):
        raise RuntimeError(f"readyNodes stuck at {c.status().get('readyNodes')}/{n}")
    time.sleep(settle)  # writes that trail the last ready node
    counts = agent_counts(kube)
    status_writes = [r for r in kube.requests_matching("PATCH", "/cachedmodels/m/status$") if r.status == 200]
    return {
        "ready_seconds": round(ready_at[0] - t0, 2),
        "requests_per_node": per_node(counts, n),
        "requests_per_node_total": round(sum(counts.values()) / n, 2),
        "node_writes_per_node": round(counts[("patch", "nodes")] / n, 2),
        "watch_events_per_node": round(sum(kube.events_delivered(client="^node-").values()) / n, 2),
        "cachedmodel_status_writes": len(status_writes),
        "conflicts": sum(kube.counts(status=lambda s: s == 409).values()),
        "errors": sum(kube.counts(client="^node-", status=lambda s: s >= 400).values()),
    }


def failover(c: Cluster, ks: KubeSettings) -> dict[str, Any]:
    kube = c.kube
    old = c.holder()
    victim = next(a for a in c.agents if a.node == old)
    writes_before = len(kube.requests_matching("PATCH", "/cachedmodels/m/status$"))
    ready = c.status().get("readyNodes")
    dips: list[Any] = []
    t0 = time.monotonic()
    victim.kill(kube)

    def replaced() -> bool:
        st = c.status()
        if st.get("readyNodes") != ready:
            dips.append(st.get("readyNodes"))
        return c.holder() not in ("", old)

    ok = kube.wait_for(replaced, timeout=3 * ks.lease_duration, interval=0.02)
    took = time.monotonic() - t0
    time.sleep(2 * ks.aggregate_interval)
    c.agents.remove(victim)
    return {
        "failover_seconds": round(took, 2) if ok else None,
        "lease_duration": ks.lease_duration,
        "ready_changed_during_failover": dips,
        "status_writes_after_failover": len(kube.requests_matching("PATCH", "/cachedmodels/m/status$")) - writes_before,
    }


def steady(c: Cluster, n: int, k: float, window: float | None = None) -> dict[str, Any]:
    """Counts over one compressed hour (3600/k s), or over ``window`` s scaled up to the hour."""
    kube = c.kube
    kube.reset_counters()
    hour = 3600.0 / k
    window = window or hour
    transitions = lease_transitions(c)
    time.sleep(window)
    scale = hour / window
    counts = agent_counts(kube)
    events = kube.events_delivered(client="^node-")
    bookmarks = kube.events_delivered(client="^node-", bookmarks=True)
    leader = c.holder()
    leader_total = sum(kube.counts(client=f"^{re.escape(leader)}$").values())
    return {
        "window_seconds": round(window, 1),
        "hour_seconds": round(hour, 1),
        "requests_per_node_hour": round(sum(counts.values()) * scale / n, 1),
        "by_verb_resource_per_node_hour": per_node(counts, n, scale),
        "leader_requests_hour": round(leader_total * scale, 1),
        "follower_requests_per_node_hour": round((sum(counts.values()) - leader_total) * scale / max(1, n - 1), 1),
        "watch_events_per_node_hour": {k_: round(v * scale / n, 1) for k_, v in sorted(events.items())},
        "bookmarks_per_node_hour": round(sum(bookmarks.values()) * scale / n, 1),
        "cachedmodel_status_writes": len(kube.requests_matching("PATCH", "/cachedmodels/m/status$")),
        "node_writes": counts[("patch", "nodes")],
        "conflicts": sum(kube.counts(status=lambda s: s == 409).values()),
        "leader_changes": lease_transitions(c) - transitions,
    }


def lease_transitions(c: Cluster) -> int:
    lease = c.kube.get("leases", LEASE, group="coordination.k8s.io", namespace=NS) or {}
    return int((lease.get("spec") or {}).get("leaseTransitions") or 0)


# ---- main's agents, as the baseline ---------------------------------------------------------------------------


def baseline(n: int, tmp: Path, pvc: Path, steady_seconds: float) -> dict[str, Any] | None:
    """The same rollout and a steady window with the agents on main (per-agent CAS status writes, 30 s GETs)."""
    src = tmp / "main-src"
    if not src.exists():
        src.mkdir()
        archive = subprocess.run(["git", "archive", "main", "agent"], cwd=ROOT, capture_output=True, check=False)
        if archive.returncode:
            print(f"baseline skipped: git archive main failed: {archive.stderr.decode()[:200]}")
            return None
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    kube = KubeEmulator(bookmark_interval=60.0, history=2000).start()
    procs = []
    try:
        for i in range(n):
            kube.create_node(f"node-{i:04d}", {GPU: "true"})
        for i in range(n):
            node = f"node-{i:04d}"
            cmd = [sys.executable, "-m", "agent", "run", "--kube-host", kube.url, "--node-name", node,
                   "--source", f"pvc:{pvc}", "--cache-dir", str(tmp / f"base-cache-{node}"), "--metrics-host",
                   "127.0.0.1", "--metrics-port", "0", "--scrub-interval", "0"]
            env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
            log = (tmp / f"base-{node}.log").open("wb")
            procs.append(subprocess.Popen(cmd, cwd=str(tmp), env=env, stdout=log, stderr=subprocess.STDOUT))
        kube.wait_for(lambda: all(kube.requests_matching("GET", f"/nodes/node-{i:04d}$") for i in range(n)), 120)
        time.sleep(3)
        kube.reset_counters()
        t0 = time.monotonic()
        kube.create(PLURAL, cachedmodel(), group=GROUP)
        ok = kube.wait_for(lambda: ((kube.get(PLURAL, "m", group=GROUP) or {}).get("status") or {})
                           .get("readyNodes") == n, 120 + n, 0.02)
        took = time.monotonic() - t0
        time.sleep(2)
        counts = kube.counts()
        roll = {
            "ready_seconds": round(took, 2) if ok else None,
            "requests_per_node_total": round(sum(counts.values()) / n, 2),
            "node_writes_per_node": round(counts[("patch", "nodes")] / n, 2),
            "cachedmodel_status_writes": len([r for r in kube.requests_matching("PATCH", "/cachedmodels/m/status$")
                                              if r.status == 200]),
            "conflicts": sum(kube.counts(status=lambda s: s == 409).values()),
            "watch_events_per_node": round(sum(kube.events_delivered().values()) / n, 2),
        }
        kube.reset_counters()
        time.sleep(steady_seconds)
        counts = kube.counts()
        st = {"requests_per_node_hour": round(sum(counts.values()) / n * 3600 / steady_seconds, 1),
              "by_verb_resource_per_node_hour": per_node(counts, n, 3600 / steady_seconds),
              "window_seconds": steady_seconds}
        return {"n": n, "rollout": roll, "steady": st}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        kube.stop()


# ---- reporting -------------------------------------------------------------------------------------------------


def measure(n: int, mode: str, tmp: Path, pvc: Path, *, k_rollout: float = 1.0, k_steady: float = 10.0,
            steady_window: float | None = None, failover_run: bool = True) -> dict[str, Any]:
    """Rollout and failover with timers divided by ``k_rollout`` (1: real), steady state by ``k_steady``."""
    ks = scaled(k_rollout)
    out: dict[str, Any] = {"n": n, "mode": mode, "k_rollout": k_rollout, "k_steady": k_steady}
    with cluster(n, mode, ks, bookmark=60.0 / k_rollout, check_interval=60.0 / k_rollout, tmp=tmp, pvc=pvc) as c:
        out["rollout"] = rollout(c, n, settle=2 * ks.aggregate_interval)
        if failover_run:
            out["failover"] = failover(c, ks)
    ks = scaled(k_steady)
    with cluster(n, mode, ks, bookmark=60.0 / k_steady, check_interval=60.0 / k_steady, tmp=tmp, pvc=pvc) as c:
        c.kube.create(PLURAL, cachedmodel(), group=GROUP)
        if not c.kube.wait_for(lambda: c.status().get("readyNodes") == n, 120 + n, 0.1):
            raise RuntimeError("steady-state cluster did not converge")
        time.sleep(2 * ks.aggregate_interval + ks.node_status_interval)
        out["steady"] = steady(c, n, k_steady, steady_window)
    return out


def summary(results: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    head = ["N", "ready s", "req/node", "node writes/node", "watch ev/node", "CM writes", "conflicts",
            "failover s", "steady req/node/h", "follower req/h", "leader req/h", "steady ev/node/h", "steady 409"]
    rows = [head]
    for r in results:
        ro, st, fo = r["rollout"], r["steady"], r.get("failover") or {}
        rows.append([str(r["n"]), str(ro["ready_seconds"]), str(ro["requests_per_node_total"]),
                     str(ro["node_writes_per_node"]), str(ro["watch_events_per_node"]),
                     str(ro["cachedmodel_status_writes"]), str(ro["conflicts"]), str(fo.get("failover_seconds")),
                     str(st["requests_per_node_hour"]), str(st["follower_requests_per_node_hour"]),
                     str(st["leader_requests_hour"]), str(round(sum(st["watch_events_per_node_hour"].values()), 1)),
                     str(st["conflicts"])])
    if base is not None:
        ro, st = base["rollout"], base["steady"]
        rows.append([f"main@{base['n']}", str(ro["ready_seconds"]), str(ro["requests_per_node_total"]),
                     str(ro["node_writes_per_node"]), str(ro["watch_events_per_node"]),
                     str(ro["cachedmodel_status_writes"]), str(ro["conflicts"]), "-",
                     str(st["requests_per_node_hour"]), "-", "-", "-", "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd")
    ag = sub.add_parser("agent", help="one agent process (used by --mode process)")
    ag.add_argument("--node", required=True)
    ag.add_argument("--kube", required=True)
    ag.add_argument("--cache", required=True)
    ag.add_argument("--pvc", required=True)
    ag.add_argument("--check-interval", type=float, default=60.0)
    ag.add_argument("--settings", required=True)
    ap.add_argument("--nodes", default="10,25,50")
    ap.add_argument("--mode", choices=("inproc", "process"), default="inproc")
    ap.add_argument("--compress", type=float, default=10.0, help="steady state: one hour in 3600/k seconds")
    ap.add_argument("--baseline", action="store_true", help="also run main's agents at the smallest N")
    ap.add_argument("--baseline-steady", type=float, default=60.0)
    ap.add_argument("--ci", action="store_true", help="N=3, timers /3 and /10, 10 s of steady state: proves it works")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    if args.cmd == "agent":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        run_node_agent(args.node, args.kube, Path(args.cache), Path(args.pvc),
                       settings_from_json(json.loads(args.settings)), stop, check_interval=args.check_interval)
        return 0
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only: N agents log a lot
    ns = [3] if args.ci else [int(x) for x in args.nodes.split(",")]
    k = 10.0 if args.ci else args.compress
    tmp = Path(tempfile.mkdtemp(prefix="control-plane-"))
    try:
        pvc = tmp / "pvc"
        make_hub_model(pvc / "hub", REPO, weight_bytes=64 * 1024, seed=1, workdir=tmp / "gen")
        print(f"# cluster sizes {ns}, mode {args.mode}, steady state compressed {k}x; "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus", flush=True)
        results = []
        for n in ns:
            r = measure(n, args.mode, tmp, pvc, k_rollout=3.0 if args.ci else 1.0, k_steady=k,
                        steady_window=10.0 if args.ci else None)
            results.append(r)
            print(json.dumps(r, sort_keys=True), flush=True)
        base = baseline(min(ns), tmp, pvc, args.baseline_steady) if args.baseline else None
        if base is not None:
            print(json.dumps({"baseline_main": base}, sort_keys=True), flush=True)
        print()
        print(summary(results, base))
        if base is not None:
            ours = next(r for r in results if r["n"] == base["n"])
            ratio = base["steady"]["requests_per_node_hour"] / max(0.1, ours["steady"]["requests_per_node_hour"])
            print(f"\nvs main at N={base['n']}: steady requests/node/h {ratio:.1f}x"
                  f" fewer; rollout CachedModel writes {base['rollout']['cachedmodel_status_writes']} -> "
                  f"{ours['rollout']['cachedmodel_status_writes']}; conflicts {base['rollout']['conflicts']} -> "
                  f"{ours['rollout']['conflicts']}")
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "baseline": base}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
