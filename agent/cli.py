"""Command line: ``model-cache-agent run | fill | status | verify | demo | coverage``.

Exit codes: 0 success, 1 the operation found a problem (failed fill, mismatch), 2 usage or
configuration error. Errors are one line naming the bad flag, field or file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.errors import AgentError, ConfigError, SpecError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message, our format
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _cache_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="agent root (env MODEL_CACHE_DIR, default /var/lib/model-cache)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="model-cache-agent", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    ap.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a TTY")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    f = sub.add_parser("fill", help="fill the cache with one model and exit")
    f.add_argument("repo", help="org/name")
    f.add_argument("--revision", default="main", help="branch, tag or 40-hex commit (default main)")
    f.add_argument("--source", action="append",
                   help="pvc:PATH | hub | modelexpress[:ADDR]; repeat for fallbacks (default: hub, i.e. HF_ENDPOINT "
                        "or huggingface.co)")
    f.add_argument("--pvc-subpath", help="the model's folder under pvc:PATH, e.g. team/qwen3 (a `hf download "
                                         "--local-dir` folder or plain files; default: PATH/<org>/<name>)")
    f.add_argument("--allow", action="append", default=[], help="glob of files to include (repeatable)")
    f.add_argument("--ignore", action="append", default=[], help="glob of files to skip (repeatable)")
    f.add_argument("--token-file", help="file holding the Hub token (else HF_TOKEN or a mounted Secret)")
    f.add_argument("--lock-timeout", type=float, default=None, help="seconds to wait for another fill of the repo")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    _cache_dir_arg(f)

    v = sub.add_parser("verify", help="check cached snapshots against their manifests")
    v.add_argument("repo", nargs="?", help="only this org/name")
    v.add_argument("--full", action="store_true", help="recompute sha256 / git-sha1 (default: xxh3-128)")
    v.add_argument("--fast", action="store_true", help="stat only (size, mtime, inode, symlinks)")
    _cache_dir_arg(v)

    s = sub.add_parser("status", help="what the cache holds")
    s.add_argument("repo", nargs="?")
    s.add_argument("--json", action="store_true")
    _cache_dir_arg(s)

    d = sub.add_parser("demo", help="make a tiny model, fill a temp cache from a temp PVC, verify, show status")
    d.add_argument("--dir", help="work here instead of a temp dir (kept)")
    d.add_argument("--size", default="50M", help="weight bytes (default 50M)")
    d.add_argument("--keep", action="store_true")

    r = sub.add_parser("run", help="the node agent: reconcile desired models forever")
    _cache_dir_arg(r)
    r.add_argument("--config", help="YAML config file (keys: cacheDir, sources, labelPrefix, metricsPort, ...)")
    r.add_argument("--source", action="append", help="pvc:PATH | hub | modelexpress[:ADDR], preference order")
    r.add_argument("--no-kubernetes", action="store_true", help="no cluster: desired models from --models-file")
    r.add_argument("--models-file", help="YAML list of CachedModel objects or bare specs with a name")
    r.add_argument("--node-name", help="this node (default env NODE_NAME)")
    r.add_argument("--kube-host", help="API server URL (default: in-cluster config, then kubeconfig)")
    r.add_argument("--label-prefix", help="label/annotation prefix (default modelcache.dev)")
    r.add_argument("--metrics-port", type=int, default=None, help="/metrics, /healthz, /readyz (default 9400)")
    r.add_argument("--metrics-host", default="0.0.0.0")
    r.add_argument("--workers", type=int, default=None, help="models filled at once (default 2)")
    r.add_argument("--token-file")
    r.add_argument("--check-interval", type=float, default=None, help="seconds between stat checks")
    r.add_argument("--scrub-interval", type=float, default=None, help="seconds between xxh3 scrubs (0 = off)")
    r.add_argument("--scrub-rate", default=None, help="scrub read limit, bytes/s (e.g. 200M)")
    r.add_argument("--disk-budget", default=None, help="max bytes the cache may use (e.g. 500G; 0 = free space)")
    r.add_argument("--drain-grace", type=float, default=None,
                   help="seconds an unlabelled model must stay unused before its files are deleted (default 300)")
    r.add_argument("--in-use-file", default=None,
                   help="no cluster: file of model names in use by workers, one per line (never evicted)")

    c = sub.add_parser("coverage", help="models x nodes table of who is warm (reads Node labels)")
    c.add_argument("--kube-host")
    c.add_argument("--label-prefix", default="modelcache.dev")
    c.add_argument("--json", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent import log

    log.configure(level=args.log_level, json=args.log_json)
    try:
        return _dispatch(args)
    except (ConfigError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    return {"fill": cmd_fill, "verify": cmd_verify, "status": cmd_status, "demo": cmd_demo,
            "run": cmd_run, "coverage": cmd_coverage}[args.cmd](args)


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from agent.cache.store import Store
    from agent.config import cache_dir_from

    return Store(cache_dir_from(args.cache_dir, os.environ))


def cmd_fill(args: argparse.Namespace) -> int:
    from agent.config import parse_sources, source_settings
    from agent.core.spec import FileFilter, validate_repo_id, validate_revision, validate_subpath
    from agent.progress import for_terminal
    from agent.runtime.fill import FillFailed, fill_model
    from agent.sources.factory import for_model, open_sources

    validate_repo_id(args.repo, "repo")
    validate_revision(args.revision, "--revision")
    if args.pvc_subpath is not None:
        validate_subpath(args.pvc_subpath, "--pvc-subpath")
    if not args.source:
        print("fill: no --source given, using the default: hub (HF_ENDPOINT or huggingface.co)", file=sys.stderr)
    refs = parse_sources(args.source or ["hub"])
    sources = for_model(open_sources(list(refs), source_settings(os.environ, token_file=args.token_file)),
                        pvc_subpath=args.pvc_subpath)
    store = _store(args)
    try:
        res = fill_model(store, sources, args.repo, args.revision, FileFilter(tuple(args.allow), tuple(args.ignore)),
                         progress=for_terminal(args.repo), lock_timeout=args.lock_timeout)
    except FillFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        for s in sources:
            s.close()
    m = res.manifest
    out = {"repo": m.repo, "revision": args.revision, "commit": m.commit, "files": len(m.files),
           "bytes": m.total_bytes, "fetched_files": res.fetched_files, "fetched_bytes": res.fetched_bytes,
           "seconds": round(res.seconds, 3), "source": res.source, "level": m.level,
           "snapshot": str(store.layout.snapshot_dir(m.repo, m.commit))}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{m.repo}@{args.revision} -> {m.commit} ({len(m.files)} files, {m.total_bytes} bytes, "
              f"{m.level}) from {res.source} in {res.seconds:.2f}s")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    if not store.layout.root.is_dir():
        raise ConfigError(f"--cache-dir: {store.layout.root} does not exist")
    manifests = [m for m in store.manifests() if not args.repo or m.repo == args.repo]
    if args.repo and not manifests:
        raise ConfigError(f"repo: {args.repo} is not in {store.layout.root}")
    bad = 0
    for m in manifests:
        rep = store.check(m, deep=not args.fast, full=args.full)
        mode = "full" if args.full else ("fast" if args.fast else "xxh3")
        if rep.ok:
            print(f"ok       {m.repo}@{m.commit[:12]} ({len(m.files)} files, {mode})")
        else:
            bad += 1
            print(f"MISMATCH {m.repo}@{m.commit[:12]}:")
            for p in rep.problems():
                print(f"  {p}")
    return EXIT_PROBLEM if bad else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.status import format_table, status_rows

    store = _store(args)
    rows = status_rows(store, args.repo)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.config import parse_size
    from agent.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None, size=parse_size(args.size, "--size"), keep=args.keep)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_run_settings

    settings = load_run_settings(args, os.environ)
    from agent.runtime.agent import run_agent

    return run_agent(settings)


def format_coverage(nodes: list[tuple[str, dict[str, str]]], models: Sequence[str] = ()) -> str:
    """A models x nodes table: 'ready' where the Node carries the label, '-' elsewhere (pure)."""
    names = sorted({m for _, states in nodes for m in states} | set(models))
    if not names:
        return "no models labelled on any node"
    node_names = [n for n, _ in nodes]
    head = ["MODEL", *node_names, "READY"]
    rows = []
    for m in names:
        cells = ["ready" if states.get(m) == "ready" else "-" for _, states in nodes]
        rows.append([m, *cells, f"{cells.count('ready')}/{len(node_names)}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])


def cmd_coverage(args: argparse.Namespace) -> int:
    from agent.k8s.client import make_api
    from agent.k8s.coverage import read_coverage

    api = make_api(args.kube_host or os.environ.get("MODEL_CACHE_KUBE_HOST") or None)
    try:
        nodes = read_coverage(api, args.label_prefix)
    finally:
        api.close()
    if args.json:
        print(json.dumps({node: states for node, states in nodes}, indent=2, sort_keys=True))
    else:
        print(format_coverage(nodes))
    return EXIT_OK
