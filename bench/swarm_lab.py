"""Swarm lab: N agents, each in its own network namespace, fill one model from a rate-limited origin Hub.

Run as root from the repo root: ``nice -n 10 python -m bench.swarm_lab [--nodes 2,4,8] [--size 300M]
[--node-rate 200] [--origin-rate 400] [--shards 16] [--origin-concurrency 2] [--json out.json]``.

    netns mcp<pid>o (origin: loopback Hub server, egress shaped to --origin-rate Mbit/s)
    netns mcp<pid>n<i> (agent i: PeerService on :6881, index :6882; eth0 egress = upload limit)
          \\ veth /
    netns mcp<pid>b: bridge br0; the bridge side of each node's veth shapes its download (tbf)

Every agent runs the real fill path: sources ``[peers, hub]`` with origin slots in a directory all agents
share (``--origin-concurrency``, default 2 as in the product): the slot holders read their byte-balanced
stripes of the model from the Hub and share each file as soon as it is verified; everyone else takes each
file from the swarm as it appears; each seeds after publishing. The model has ``--shards`` weight files
(default 16: a 140 GB model has about 30 shards of 5 GB). Printed per N: time until all N are ready, the Kumar-Ross
limit max(F/u_s, F/d, N*F/(u_s + N*u)) for those rates and the ratio, origin bytes / model size (what
the Hub sent), bytes each agent got from peers, and what each uploaded and downloaded on the wire.
``LAB_TUNING='{...}'`` merges libtorrent settings in every agent (experiments); ``LAB_LOG=info`` with
``--logs DIR`` keeps each agent's log. Namespaces, veths and processes are removed whatever
happens. Without the privileges for namespaces it says why and runs on loopback instead, with
libtorrent's own rate limits for the nodes (the origin is then not shaped).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import parse_size

REPO = "lab/swarm-model"
P2P_PORT = 6881
MBIT = 1_000_000 / 8  # bytes/s per Mbit/s


def kumar_ross(size: int, n: int, node_up: float, node_down: float, origin_up: float) -> float:
    """Minimum time to give N nodes F bytes: max(F/u_s, F/d, N*F/(u_s + N*u)) (rates in bytes/s)."""
    return max(size / origin_up, size / node_down, n * size / (origin_up + n * node_up))


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat: is the lab measuring the protocol or the box?"""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(a: tuple[int, int], b: tuple[int, int]) -> float:
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# -- processes inside the namespaces -------------------------------------------------------------------


def run_origin(args: argparse.Namespace) -> None:
    """The Hub (HubServer from tests/peers) on the origin namespace's address."""
    from tests.peers.hub_server import HubServer

    server = HubServer(host=args.host).start()
    commit = server.add_repo(REPO, Path(args.src))
    emit({"url": server.url, "commit": commit})
    for line in sys.stdin:
        if line.strip() == "stats":
            reqs = server.requests(method="GET")
            emit({"file_bytes": sum(r.bytes_sent for r in reqs if "/resolve/" in r.path or r.origin == "cdn"),
                  "requests": len(server.requests())})
        else:
            break
    server.stop()


def run_node(args: argparse.Namespace) -> None:
    """One agent: what the runtime does for a model (fill with [peers, hub], retry a transient failure, seed)."""
    from agent import log
    from agent.cache.store import Store
    from agent.runtime.fill import FillFailed, fill_model
    from agent.sources.base import SourceSettings
    from agent.sources.hub import HubSource
    from agent.sources.peers.service import PeerService
    from agent.sources.peers.settings import PeerSettings, parse_peer_addr
    from agent.sources.peers.slots import SlottedSource
    from agent.sources.peers.source import PeerSource

    log.configure(level=os.environ.get("LAB_LOG", "warning"), stream=sys.stderr)
    ps = PeerSettings(listen_host=args.host, port=args.port, index_port=args.index_port or None,
                      peers=tuple(parse_peer_addr(p) for p in args.peer or []),
                      upload_rate=args.rate, download_rate=args.rate, origin_concurrency=args.slots_cap,
                      slots_dir=Path(args.slots), poll_interval=0.5, stall_timeout=30, disk_io="pread")
    service = PeerService(ps, tuning=json.loads(os.environ.get("LAB_TUNING") or "{}")).start()
    hub = HubSource(SourceSettings(hf_endpoint=args.hub, timeout=60))
    sources = [PeerSource(service, [hub]), SlottedSource(hub, service.gate, service)]
    store = Store(Path(args.cache))
    emit({"ready": True})
    sys.stdin.readline()  # go
    t0 = time.time()
    attempts = 0
    while True:
        attempts += 1
        try:
            res = fill_model(store, sources, REPO, "main")
            break
        except FillFailed as e:
            if e.permanent or attempts > 20:
                raise
            time.sleep(0.2)  # the runtime's backoff: here only "slots held, no torrent yet" can get us here
    done = time.time()
    service.seed(store, res.manifest).result()
    emit({"t0": t0, "done": done, "source": res.source, "bytes": res.fetched_bytes, "attempts": attempts,
          "level": res.manifest.level})
    for line in sys.stdin:
        if line.strip() == "stats":
            emit(service.stats())
        else:
            break
    service.stop()


# -- the network ---------------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


@dataclass
class Net:
    """Namespaces and links of one lab run; ``close`` removes all of them (idempotent)."""

    tag: str
    nodes: int
    node_rate_mbit: float
    origin_rate_mbit: float
    namespaces: list[str] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"mcp{self.tag}{name}"

    def ip(self, i: int) -> str:
        return f"10.77.0.{i + 1}"

    @property
    def origin_ip(self) -> str:
        return "10.77.0.250"

    def nsexec(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def up(self) -> None:
        br = self.ns("b")
        self._add_ns(br)
        sh(*self.nsexec(br, "ip", "link", "add", "br0", "type", "bridge"))
        sh(*self.nsexec(br, "ip", "link", "set", "br0", "up"))
        for i in range(self.nodes):
            self._attach(self.ns(f"n{i}"), f"{i}", self.ip(i), self.node_rate_mbit, self.node_rate_mbit)
        self._attach(self.ns("o"), "o", self.origin_ip, self.origin_rate_mbit, 0)

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh(*self.nsexec(name, "ip", "link", "set", "lo", "up"))

    def _attach(self, ns: str, short: str, ip: str, up_mbit: float, down_mbit: float) -> None:
        self._add_ns(ns)
        a, b = f"mcp{self.tag}{short}a"[-15:], f"mcp{self.tag}{short}b"[-15:]
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", ns)
        sh("ip", "link", "set", b, "netns", self.ns("b"))
        sh(*self.nsexec(ns, "ip", "link", "set", a, "name", "eth0"))
        sh(*self.nsexec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0"))
        sh(*self.nsexec(ns, "ip", "link", "set", "eth0", "up"))
        sh(*self.nsexec(self.ns("b"), "ip", "link", "set", b, "master", "br0"))
        sh(*self.nsexec(self.ns("b"), "ip", "link", "set", b, "up"))
        if up_mbit:
            self._shape(ns, "eth0", up_mbit)  # what this host sends
        if down_mbit:
            self._shape(self.ns("b"), b, down_mbit)  # what the bridge sends to this host

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        burst = max(64 * 1024, int(mbit * MBIT / 100))  # 10 ms worth
        sh(*self.nsexec(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                        "burst", str(burst), "latency", "50ms"))

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def netns_problem() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    name = f"mcpprobe{os.getpid()}"
    r = sh("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    sh("ip", "netns", "del", name, check=False)
    return None


# -- one lab run ---------------------------------------------------------------------------------------


class Worker:
    def __init__(self, argv: list[str], prefix: list[str] | None = None, log: Path | None = None) -> None:
        self.err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
        self.p = subprocess.Popen([*(prefix or []), sys.executable, "-m", "bench.swarm_lab", *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  cwd=str(Path(__file__).resolve().parent.parent))

    def read(self, timeout: float = 600) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.p.args[-8:]} exited with {self.p.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(text + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass

    def stop(self) -> None:
        self.send("exit")
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        if self.err is not subprocess.DEVNULL:
            self.err.close()


@dataclass
class LabResult:
    nodes: int
    size: int
    seconds: float  # go -> the last node ready
    limit: float
    origin_bytes: int
    peer_bytes: list[int]
    sources: list[str]
    ready_at: list[float]  # seconds after go, per node, sorted
    mode: str  # "netns" | "loopback"
    cpu_busy: float = 0.0  # share of the machine's CPU time busy from go to the last node ready
    cores: int = os.cpu_count() or 1
    node_mbit: float = 0.0
    origin_mbit: float = 0.0

    @property
    def ratio(self) -> float:
        return self.seconds / self.limit

    def line(self) -> str:
        mb = [round(b / 1e6) for b in self.peer_bytes]
        return (f"N={self.nodes:3d}  all ready {self.seconds:7.2f}s  limit {self.limit:6.2f}s  "
                f"ratio {self.ratio:5.2f}  origin/model {self.origin_bytes / self.size:5.2f}  from peers MB {mb}  "
                f"origin fills {sum(1 for s in self.sources if not s.startswith('peers'))}  "
                f"cpu busy {self.cpu_busy:.0%}")


def make_model(work: Path, size: int, shards: int) -> Path:
    from agent.modelgen import make_model_dir

    src = work / f"model-{size}-{shards}"
    if not src.is_dir():
        make_model_dir(src, weight_bytes=size, shards=shards)
    return src


def run_lab(n: int, src: Path, work: Path, *, node_rate: float, origin_rate: float, netns: bool,
            logs: Path | None = None, slots: int = 2) -> LabResult:
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    tag = f"{os.getpid() % 100000}"
    run_dir = Path(tempfile.mkdtemp(prefix=f"lab{n}-", dir=work))
    (run_dir / "slots").mkdir()
    net = Net(tag, n, node_rate, origin_rate)
    workers: list[Worker] = []
    atexit.register(net.close)

    def log_for(name: str) -> Path | None:
        return logs / f"n{n}-{name}.log" if logs else None

    try:
        if netns:
            net.up()
            origin = Worker(["origin", "--src", str(src), "--host", net.origin_ip], net.nsexec(net.ns("o")),
                            log_for("origin"))
            hosts = [(net.ip(i), P2P_PORT, 0) for i in range(n)]
            prefixes = [net.nsexec(net.ns(f"n{i}")) for i in range(n)]
            rate = 0
        else:
            origin = Worker(["origin", "--src", str(src), "--host", "127.0.0.1"], None, log_for("origin"))
            base = 20000 + (os.getpid() % 2000) * 10
            hosts = [(f"127.0.0.{i + 2}", base, base + 1) for i in range(n)]
            prefixes = [[] for _ in range(n)]
            rate = int(node_rate * MBIT)
        workers.append(origin)
        url = origin.read()["url"]
        nodes = []
        for i, (host, port, index_port) in enumerate(hosts):
            peers = [f"{h}:{p}" for j, (h, p, _) in enumerate(hosts) if j != i]
            argv = ["node", "--host", host, "--port", str(port), "--index-port", str(index_port),
                    "--hub", url, "--cache", str(run_dir / f"n{i}"), "--slots", str(run_dir / "slots"),
                    "--rate", str(rate), "--slots-cap", str(slots)]
            for p in peers:
                argv += ["--peer", p]
            w = Worker(argv, prefixes[i], log_for(f"node{i}"))
            workers.append(w)
            nodes.append(w)
        for w in nodes:
            w.read()
        cpu0 = cpu_times()
        go = time.time()
        for w in nodes:
            w.send("go")
        done = [w.read() for w in nodes]
        busy = cpu_busy(cpu0, cpu_times())
        stats = []
        for w in nodes:
            w.send("stats")
            stats.append(w.read())
        origin.send("stats")
        served = origin.read()
        ready = sorted(d["done"] - go for d in done)
        print("  uploaded MB per node (wire):", [round(x.get("uploaded_bytes", 0) / 1e6) for x in stats],
              "downloaded:", [round(x.get("downloaded_bytes", 0) / 1e6) for x in stats], flush=True)
        return LabResult(
            nodes=n, size=size, seconds=ready[-1],
            limit=kumar_ross(size, n, node_rate * MBIT, node_rate * MBIT, origin_rate * MBIT),
            origin_bytes=served["file_bytes"], peer_bytes=[x.get("verified_bytes", 0) for x in stats],
            sources=[d["source"] for d in done], ready_at=ready, mode="netns" if netns else "loopback",
            cpu_busy=busy, node_mbit=node_rate, origin_mbit=origin_rate)
    finally:
        for w in workers:
            w.stop()
        net.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("origin")
    o.add_argument("--src")
    o.add_argument("--host")
    nd = sub.add_parser("node")
    for flag in ("--host", "--hub", "--cache", "--slots"):
        nd.add_argument(flag)
    nd.add_argument("--port", type=int)
    nd.add_argument("--index-port", type=int, default=0)
    nd.add_argument("--rate", type=int, default=0)
    nd.add_argument("--peer", action="append")
    nd.add_argument("--slots-cap", type=int, default=2)
    ap.add_argument("--nodes", default="2,4,8")
    ap.add_argument("--size", type=parse_size, default=parse_size("300M"))
    ap.add_argument("--node-rate", type=float, default=200.0, help="Mbit/s up and down per node")
    ap.add_argument("--origin-rate", type=float, default=400.0, help="Mbit/s out of the origin")
    ap.add_argument("--shards", type=int, default=16, help="weight files of the model")
    ap.add_argument("--origin-concurrency", type=int, default=2, help="origin slots per model")
    ap.add_argument("--dir", help="work dir (the model is kept here between runs)")
    ap.add_argument("--loopback", action="store_true", help="skip namespaces even when available")
    ap.add_argument("--logs", help="write each process's stderr here")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.cmd == "origin":
        run_origin(args)
        return
    if args.cmd == "node":
        run_node(args)
        return
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="swarm-lab-"))
    work.mkdir(parents=True, exist_ok=True)
    problem = "--loopback given" if args.loopback else netns_problem()
    if problem:
        print(f"network namespaces not used ({problem}): loopback with libtorrent rate limits; origin not shaped")
    logs = Path(args.logs) if args.logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    src = make_model(work, args.size, args.shards)
    results = []
    print(f"model {sum(p.stat().st_size for p in src.rglob('*') if p.is_file()) / 1e6:.0f} MB; node "
          f"{args.node_rate:g} Mbit/s up+down, origin {args.origin_rate:g} Mbit/s; {args.shards} shards, "
          f"originConcurrency {args.origin_concurrency}; load {os.getloadavg()[0]:.2f}")
    for n in (int(x) for x in args.nodes.split(",")):
        res = run_lab(n, src, work, node_rate=args.node_rate, origin_rate=args.origin_rate, netns=problem is None,
                      logs=logs, slots=args.origin_concurrency)
        results.append(res)
        print(res.line(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
