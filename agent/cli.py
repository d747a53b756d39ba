"""Command line: ``model-cache-agent run | fill | status | verify | demo | coverage``.

Exit codes: 0 success, 1 the operation found a problem (failed fill, mismatch), 2 usage or
configuration error, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM). A failure is one line on
stderr naming the bad flag, field or file (with ``--json``: a JSON object on stdout); a traceback
is printed only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.config import DEFAULT_CACHE_DIR, LOG_LEVELS, RUN_NUMBERS, ConfigError
from agent.errors import AgentError, Cancelled, SpecError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
WEEK = 7 * 86400.0
STOP_GRACE = 1.2  # seconds a stopped fill gets to wind down before the process exits anyway
ONE_SHOT = ("fill", "verify", "status", "coverage")
SOURCES_HELP = "pvc:PATH | hub | modelexpress[:ADDR] | peers"
MODELS_EXAMPLE = "manifests/examples/models.yaml"

RUN_EPILOG = f"""\
models file: a YAML list of bare specs (name, repo, revision, files, sources, priority, nodeSelector) or \
of CachedModel objects, checked against the CachedModel CRD schema. An example with every field: \
{MODELS_EXAMPLE} in the source repository. Edits are picked up while running; a broken edit keeps the \
last good file in force and is logged once.

config file (--config) keys: cacheDir, sources, labelPrefix, {", ".join(n.key for n in RUN_NUMBERS.values())}. \
Precedence: flag > environment > config file > default.

/metrics, /healthz and /readyz (nothing else) are served on --metrics-host:--metrics-port, by default \
0.0.0.0:9400, that is on every interface of the node or pod: use --metrics-host 127.0.0.1 or a \
NetworkPolicy if the port must not be reachable from elsewhere.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, our format; argparse exits 2 too
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions and epilogs paragraph by paragraph (argparse would join the paragraphs)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
                           for p in text.split("\n\n"))


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _Formatter(prog, max_help_position=32, width=100)


def _num_help(attr: str, what: str) -> str:
    n = RUN_NUMBERS[attr]
    return f"{what} (config key {n.key}; default {n.default:g})"


def _cache_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"agent root holding hub/ and .agent/ (default: env MODEL_CACHE_DIR, else {DEFAULT_CACHE_DIR})")


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout (default: off)")


# -- peers source (issue 13) -------------------------------------------------------------------------


def _peer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peers source (--source peers)")
    g.add_argument("--peer", action="append", metavar="HOST:PORT",
                   help="another agent's p2p port; repeatable (default: none; env MODEL_CACHE_PEERS)")
    g.add_argument("--p2p-port", metavar="PORT",
                   help="BitTorrent port; the torrent index listens on PORT+1 (default: 6881)")
    g.add_argument("--p2p-upload-rate", metavar="BYTES",
                   help="upload limit per second, e.g. 500M (default: 0, unlimited)")
    g.add_argument("--p2p-download-rate", metavar="BYTES",
                   help="download limit per second (default: 0, unlimited)")
    g.add_argument("--origin-concurrency", metavar="N",
                   help="nodes per model filling from the other sources at once, each its own stripe (default: 2)")
    g.add_argument("--origin-slots-dir", metavar="DIR",
                   help="directory shared by the agents of one host for origin slots (default: this process only)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="model-cache-agent", formatter_class=_formatter,
                 description="Keep Hugging Face models warm in a node-local cache and label the node.")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, metavar="{" + ",".join(LOG_LEVELS) + "}",
                    help="log level; debug also prints tracebacks (default: env LOG_LEVEL, else info; "
                         "error for one-shot commands on a terminal)")
    ap.add_argument("--log-json", action="store_true", default=None,
                    help="JSON log lines even on a terminal (default: JSON unless stderr is a terminal)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    f = sub.add_parser("fill", help="fill the cache with one model and exit", formatter_class=_formatter,
                       description="Fill the cache with one model, verify every file, publish it, exit. "
                                   "Ctrl-C or SIGTERM stops within 2 s, keeping what was staged.")
    f.add_argument("repo", help="Hugging Face repo id, org/name")
    f.add_argument("--revision", default="main", help="branch, tag or 40-hex commit (default: main)")
    f.add_argument("--source", action="append", metavar="SOURCE",
                   help=f"{SOURCES_HELP}; repeat for fallbacks in preference order (default: hub, i.e. "
                        "HF_ENDPOINT or huggingface.co)")
    f.add_argument("--pvc-subpath", metavar="PATH",
                   help="the model's folder under pvc:PATH, e.g. team/qwen3 (an 'hf download --local-dir' folder "
                        "or plain files; default: PATH/<org>/<name>)")
    f.add_argument("--allow", action="append", default=[], metavar="GLOB",
                   help="only files matching this glob; repeatable (default: every file)")
    f.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip files matching this glob; repeatable (default: none)")
    f.add_argument("--token-file", metavar="FILE",
                   help="file holding the Hub token (default: env HF_TOKEN, else the mounted Secret)")
    f.add_argument("--lock-timeout", metavar="SECONDS",
                   help="give up after waiting this long for another fill of the repo (default: wait)")
    _json_arg(f, "the result (or the error)")
    _peer_args(f)
    _cache_dir_arg(f)

    v = sub.add_parser("verify", help="check cached snapshots against their manifests", formatter_class=_formatter,
                       description="Check cached snapshots against their verified manifests. "
                                   "Exit 0 clean, 1 a mismatch, 2 usage error.")
    v.add_argument("repo", nargs="?", help="only this org/name (default: every cached repo)")
    mode = v.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="re-read every byte and recompute sha256 / git-sha1 (default: re-read with xxh3-128)")
    mode.add_argument("--fast", action="store_true",
                      help="stat only: size, mtime, inode, symlinks (default: re-read with xxh3-128)")
    _cache_dir_arg(v)

    s = sub.add_parser("status", help="what the cache holds (and what is staged)", formatter_class=_formatter,
                       description="What the cache holds: per repo its revisions, commit, size, verification "
                                   "level, state, and bytes staged by an unfinished fill.")
    s.add_argument("repo", nargs="?", help="only this org/name (default: every repo)")
    _json_arg(s, "the rows")
    _cache_dir_arg(s)

    d = sub.add_parser("demo", help="make a tiny model, fill a temp cache from a temp PVC, verify, show status",
                       formatter_class=_formatter)
    d.add_argument("--dir", help="work in this folder and keep it (default: a temporary folder, removed)")
    d.add_argument("--size", default="50M", help="bytes of weights, e.g. 8M (default: 50M)")
    d.add_argument("--keep", action="store_true", help="keep the temporary folder (default: off)")

    r = sub.add_parser("run", help="the node agent: reconcile desired models until stopped",
                       formatter_class=_formatter, epilog=RUN_EPILOG,
                       description="The node agent: keep the desired models (CachedModel objects, or a models "
                                   "file with --no-kubernetes) filled, verified and labelled until SIGTERM.")
    _cache_dir_arg(r)
    r.add_argument("--config", metavar="FILE", help="YAML settings file, keys below (default: none)")
    r.add_argument("--source", action="append", metavar="SOURCE",
                   help=f"{SOURCES_HELP}, repeat in preference order (default: env MODEL_CACHE_SOURCES, "
                        "comma-separated, else config key sources)")
    r.add_argument("--no-kubernetes", action="store_true",
                   help="no cluster: desired models from --models-file, labels to .agent/node-status.json "
                        "(default: off)")
    r.add_argument("--models-file", metavar="FILE",
                   help=f"YAML list of models, watched for changes; example: {MODELS_EXAMPLE} (default: none)")
    r.add_argument("--node-name", metavar="NAME", help="this node's name (default: env NODE_NAME)")
    r.add_argument("--kube-host", metavar="URL",
                   help="API server URL (default: env MODEL_CACHE_KUBE_HOST, else in-cluster config, else kubeconfig)")
    r.add_argument("--label-prefix", metavar="PREFIX",
                   help="label and annotation prefix (default: env MODEL_CACHE_LABEL_PREFIX, else modelcache.dev)")
    r.add_argument("--metrics-port", metavar="PORT", dest="metrics_port",
                   help=_num_help("metrics_port", "port for /metrics, /healthz, /readyz; 0 picks a free one"))
    r.add_argument("--metrics-host", default="0.0.0.0", metavar="ADDR",
                   help="address the metrics port binds (default: 0.0.0.0, every interface)")
    r.add_argument("--workers", metavar="N", help=_num_help("workers", "models filled at once"))
    r.add_argument("--token-file", metavar="FILE",
                   help="file holding the Hub token (default: env HF_TOKEN, else the mounted Secret)")
    r.add_argument("--check-interval", metavar="SECONDS",
                   help=_num_help("check_interval", "seconds between stat checks of every ready model"))
    r.add_argument("--scrub-interval", metavar="SECONDS",
                   help=_num_help("scrub_interval", "seconds between xxh3 re-reads of everything; 0 = off"))
    r.add_argument("--scrub-rate", metavar="BYTES", dest="scrub_bytes_per_second",
                   help="scrub read limit per second, e.g. 200M; 0 = unlimited "
                        "(config key scrubBytesPerSecond; default 200M)")
    r.add_argument("--disk-budget", metavar="BYTES", dest="disk_budget_bytes",
                   help="most bytes the cache may use, e.g. 500G; 0 = the free space "
                        "(config key diskBudgetBytes; default 0)")
    r.add_argument("--drain-grace", metavar="SECONDS",
                   help=_num_help("drain_grace", "seconds an unlabelled model must stay unused before its files "
                                                 "are deleted"))
    r.add_argument("--in-use-file", metavar="FILE",
                   help="no cluster: file of model names in use by workers, one per line, never evicted "
                        "(default: none)")
    _peer_args(r)

    c = sub.add_parser("coverage", help="READY n/m per model over the nodes it is meant for",
                       formatter_class=_formatter,
                       description="Per model: how many of the nodes its CachedModel selects carry the ready "
                                   "label (READY n/m), and which nodes. Read from the API server.")
    c.add_argument("--kube-host", metavar="URL",
                   help="API server URL (default: env MODEL_CACHE_KUBE_HOST, else in-cluster config, else kubeconfig)")
    c.add_argument("--label-prefix", default="modelcache.dev", metavar="PREFIX",
                   help="label prefix (default: modelcache.dev)")
    _json_arg(c, "the coverage")
    return ap


# ------------------------------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent import log

    try:
        level = args.log_level or _env_log_level()
    except ConfigError as e:
        return _fail(args, str(e), EXIT_USAGE)
    if level is None:
        level = "error" if args.cmd in ONE_SHOT and sys.stderr.isatty() else "info"
    args.log_level = level
    log.configure(level=level, json=args.log_json)
    try:
        return _dispatch(args)
    except (ConfigError, SpecError) as e:
        return _fail(args, str(e), EXIT_USAGE)
    except AgentError as e:
        return _fail(args, str(e), EXIT_PROBLEM)
    except KeyboardInterrupt:
        return _fail(args, "interrupted (SIGINT)", 128 + signal.SIGINT)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return _fail(args, f"{e.strerror or e}{where}", EXIT_PROBLEM, exc=e)
    except Exception as e:
        return _fail(args, f"internal error: {type(e).__name__}: {e}", EXIT_PROBLEM, exc=e)


def _env_log_level() -> str | None:
    from agent.config import log_level

    return log_level(os.environ.get("LOG_LEVEL") or None, "LOG_LEVEL")


def _fail(args: argparse.Namespace, message: str, code: int, *, exc: BaseException | None = None,
          **extra: Any) -> int:
    """The one line a failure prints: plain on stderr, or a JSON object on stdout with --json."""
    if exc is not None:
        if args.log_level == "debug":
            traceback.print_exception(exc, file=sys.stderr)
        elif not getattr(args, "json", False):
            message += " (--log-level debug shows the traceback)"
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit": code, **extra}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    return {"fill": cmd_fill, "verify": cmd_verify, "status": cmd_status, "demo": cmd_demo,
            "run": cmd_run, "coverage": cmd_coverage}[args.cmd](args)


def _usage(field: str, fn: Any, *a: Any) -> Any:
    """Run a core validator; its SpecError is a usage error naming ``field``."""
    try:
        return fn(*a)
    except SpecError as e:
        raise ConfigError(f"{field}: {str(e)[len(e.field) + 2:]}") from None


def _root(args: argparse.Namespace) -> tuple[Path, str]:
    from agent.config import cache_dir_from, cache_dir_origin

    return cache_dir_from(args.cache_dir, os.environ), cache_dir_origin(args.cache_dir, os.environ)


def _check_writable(root: Path, origin: str) -> None:
    """Every folder the store writes can be created and written (else one line naming it, exit 2)."""
    from agent.cache.layout import CacheLayout
    from agent.config import check_writable_root

    lay = CacheLayout(root)
    check_writable_root(root, [lay.hub, lay.staging_root, lay.manifests_root, lay.locks_root, lay.records_root],
                        origin)


# -------------------------------------------------------------------------------------------------- fill


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set ``stop``; yields the list of signals caught."""
    caught: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        caught.append(signum)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _check_pvc_readable(path: str) -> None:
    """A PVC mount we may not list is a setup problem: say so (a missing one is the source's to report)."""
    try:
        os.listdir(path)
    except PermissionError as e:
        raise ConfigError(f"--source pvc:{path}: cannot read {path} as uid {os.getuid()} ({e.strerror})") from None
    except OSError:
        pass


def cmd_fill(args: argparse.Namespace) -> int:
    from agent.cache.store import Store
    from agent.config import number, parse_sources, peer_settings, source_settings
    from agent.core.spec import FileFilter, validate_glob, validate_repo_id, validate_revision, validate_subpath
    from agent.progress import for_terminal
    from agent.runtime.fill import FillFailed, fill_model
    from agent.sources.factory import for_model, open_sources

    _usage("repo", validate_repo_id, args.repo)
    _usage("--revision", validate_revision, args.revision)
    flt = FileFilter(tuple(_usage("--allow", validate_glob, g, "--allow") for g in args.allow),
                     tuple(_usage("--ignore", validate_glob, g, "--ignore") for g in args.ignore))
    lock_timeout = None if args.lock_timeout is None else number(args.lock_timeout, "--lock-timeout", lo=0, hi=WEEK)
    if args.pvc_subpath is not None:
        _usage("--pvc-subpath", validate_subpath, args.pvc_subpath)
    if not args.source:
        print("fill: no --source given, using the default: hub (HF_ENDPOINT or huggingface.co)", file=sys.stderr)
    refs = parse_sources(args.source or ["hub"])
    for ref in refs:
        if ref.kind == "pvc":
            _check_pvc_readable(ref.arg)
    root, origin = _root(args)
    _check_writable(root, origin)
    store = Store(root)
    settings = source_settings(os.environ, token_file=args.token_file, peers=peer_settings(args, os.environ, {}))
    sources = for_model(open_sources(list(refs), settings), pvc_subpath=args.pvc_subpath)
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = fill_model(store, sources, args.repo, args.revision, flt,
                                           progress=for_terminal(args.repo), lock_timeout=lock_timeout, stop=stop,
                                           on_lock_wait=lambda holder: print(
                                               f"waiting for the lock on {args.repo}: another fill holds it "
                                               f"({holder})", file=sys.stderr, flush=True))
        except BaseException as e:  # handed to the main thread, which reports it
            outcome["error"] = e

    worker = threading.Thread(target=work, name="fill", daemon=True)
    with _stop_on_signals(stop) as caught:
        worker.start()
        while worker.is_alive() and not caught:
            worker.join(0.1)  # short waits: the main thread must stay free to run signal handlers
        if caught:
            worker.join(STOP_GRACE)
    err = outcome.get("error")
    if caught and (worker.is_alive() or isinstance(err, Cancelled)):
        return _stopped(args, store, caught[0], finished=not worker.is_alive())
    for s in sources:  # finished (or failed) before the signal could stop it: report that as usual
        s.close()
    if isinstance(err, FillFailed):
        return _fail(args, str(err),
                     EXIT_PROBLEM)
    if err is not None:
        raise err
    res = outcome["result"]
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


def _stopped(args: argparse.Namespace, store: Any, signum: int, *, finished: bool) -> int:
    """One line saying what a stopped fill kept; exits at once if the fill did not wind down in time."""
    from agent.status import human_bytes

    code = 128 + signum
    staged = store.layout.staging_dir(args.repo)
    kept = store.staged_bytes(args.repo)
    name = signal.Signals(signum).name
    what = (f"kept {human_bytes(kept)} staged in {staged} for the next fill" if kept
            else "nothing was staged yet")
    if sys.stderr.isatty():
        sys.stderr.write("\n")  # leave the progress bar's line
    _fail(args, f"{args.repo}@{args.revision}: stopped by {name}; {what}", code, signal=name, staged_bytes=kept)
    if not finished:  # a source that does not check the stop flag yet: exiting is as safe as a crash
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# --------------------------------------------------------------------------------------- verify, status


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.cache.store import Store
    from agent.config import check_readable_root
    from agent.status import corrupt_manifests

    if args.repo:
        _usage("repo", _validate_repo, args.repo)
    root, origin = _root(args)
    has_content = check_readable_root(root, origin)
    store = Store(root)
    manifests = store.manifests(args.repo) if has_content else []
    corrupt = corrupt_manifests(store, args.repo) if has_content else []
    if args.repo and not manifests and not corrupt:
        return _fail(args, f"{args.repo} is not in the cache at {root}", EXIT_PROBLEM)
    if not manifests and not corrupt:
        print(f"nothing to verify: no cached models in {root}")
        return EXIT_OK
    bad = len(corrupt)
    for repo, commit, err in corrupt:
        print(f"CORRUPT  {repo}@{commit[:12]}: {err}")
    mode = "full" if args.full else ("fast" if args.fast else "xxh3")
    for m in manifests:
        rep = store.check(m, deep=not args.fast, full=args.full)
        if rep.ok:
            print(f"ok       {m.repo}@{m.commit[:12]} ({len(m.files)} files, {mode})")
        else:
            bad += 1
            print(f"MISMATCH {m.repo}@{m.commit[:12]}:")
            for p in rep.problems():
                print(f"  {p}")
    return EXIT_PROBLEM if bad else EXIT_OK


def _validate_repo(repo: str) -> str:
    from agent.core.spec import validate_repo_id

    return validate_repo_id(repo)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cache.store import Store
    from agent.config import check_readable_root
    from agent.status import format_table, status_rows

    if args.repo:
        _usage("repo", _validate_repo, args.repo)
    root, origin = _root(args)
    has_content = check_readable_root(root, origin)
    rows = status_rows(Store(root), args.repo) if has_content else []
    if args.repo and not rows:
        return _fail(args, f"{args.repo} is not in the cache at {root}", EXIT_PROBLEM)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return EXIT_OK


# ------------------------------------------------------------------------------------------- demo, run


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.config import parse_size
    from agent.demo import run_demo

    size = parse_size(args.size, "--size", lo=4096, hi=64 << 30)
    return run_demo(Path(args.dir) if args.dir else None, size=size, keep=args.keep)


def check_port(host: str, port: int) -> None:
    """The metrics port can be bound (as the server will: SO_REUSEADDR); else one line naming it."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--metrics-host {host!r}: not an address ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            hint = " (another agent or program uses it?)" if e.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"--metrics-port {port} on {host}: cannot listen ({e.strerror}){hint}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import cache_dir_origin, load_run_settings

    settings = load_run_settings(args, os.environ)
    from_file = None if settings.cache_dir == Path(DEFAULT_CACHE_DIR) else str(settings.cache_dir)
    _check_writable(settings.cache_dir, cache_dir_origin(args.cache_dir, os.environ, from_file))
    if settings.models_file is not None and not settings.kubernetes:
        from agent.models_file import ModelsFileProvider

        ModelsFileProvider(settings.models_file, lambda _s: None).load()  # a bad file: exit 2 before starting
    check_port(settings.metrics_host, settings.metrics_port)
    from agent.runtime.agent import run_agent

    return run_agent(settings)


# -------------------------------------------------------------------------------------------- coverage


def cmd_coverage(args: argparse.Namespace) -> int:
    import logging

    from agent.core.spec import validate_label_prefix
    from agent.k8s.client import make_api
    from agent.k8s.coverage import coverage_json, format_coverage, read_coverage

    _usage("--label-prefix", validate_label_prefix, args.label_prefix)
    host = args.kube_host or os.environ.get("MODEL_CACHE_KUBE_HOST") or None
    api = make_api(host, request_timeout=10.0)
    if args.log_level != "debug":  # after make_api: the client's Configuration resets this logger's level
        logging.getLogger("urllib3").setLevel(logging.CRITICAL)  # its retry warnings: our one line says it all
    try:
        cov = read_coverage(api, args.label_prefix)
    finally:
        api.close()
    print(json.dumps(coverage_json(cov), indent=2, sort_keys=True) if args.json else format_coverage(cov))
    return EXIT_OK
