"""The CLI as a user runs it: exit codes, JSON output, one-line errors that name the bad flag, file or path."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agent.cache.layout import repo_folder_name
from agent.cache.store import Store
from agent.cli import build_parser
from agent.errors import SourceError
from agent.runtime.fill import describe_attempts
from tests.as_nobody import NOBODY, open_to_nobody, run_cli_as_nobody
from tests.conftest import PvcModel, agent_cmd

ROOT = str(Path(__file__).parents[1])


def run(*args: str, env: dict[str, str] | None = None, drop: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT, env={**base, **(env or {})},
                          timeout=120)


def one_line_error(r: subprocess.CompletedProcess[str] | tuple[int, str, str], code: int, *needles: str) -> str:
    """The run failed with ``code`` and printed exactly one 'error:' line (no traceback) holding every needle."""
    rc, _out, err = (r.returncode, r.stdout, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    plain = [line for line in err.splitlines() if line and not line.startswith("{")]  # JSON lines are logs
    assert rc == code, (rc, err)
    assert len(plain) == 1 and plain[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in plain[0], (n, plain[0])
    return plain[0]


# --------------------------------------------------------------------------------------- happy paths


def test_fill_status_verify_roundtrip(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = str(tmp_path / "c")
    r = run("fill", pvc_model.repo, "--revision", "v1.0", "--source", f"pvc:{pvc_model.root}",
            "--cache-dir", cache, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["commit"] == pvc_model.commit and out["level"] == "verified" and out["files"] == 10
    st = json.loads(run("status", "--cache-dir", cache, "--json").stdout)
    assert st[0]["repo"] == pvc_model.repo and st[0]["revisions"] == ["v1.0"] and st[0]["staged_bytes"] == 0
    assert st[0]["level"] == "verified" and st[0]["state"] == "ok" and st[0]["bytes"] == out["bytes"]
    assert "verified_at" in st[0]
    table = run("status", "--cache-dir", cache).stdout
    assert table.splitlines()[0].split()[:3] == ["REPO", "REVISIONS", "COMMIT"] and pvc_model.commit[:12] in table
    for mode in ([], ["--full"], ["--fast"]):
        v = run("verify", "--cache-dir", cache, *mode)
        assert v.returncode == 0 and v.stdout.startswith("ok"), v.stdout + v.stderr
    assert run("verify", pvc_model.repo, "--cache-dir", cache).returncode == 0


def test_verify_names_every_mismatch(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)).returncode == 0
    store = Store(cache)
    m = store.manifest(pvc_model.repo, pvc_model.commit)
    assert m is not None
    by = m.by_path()
    # same-size bit flip (only content hashing finds it) and a deleted blob
    blob = store.layout.blob_path(pvc_model.repo, by["config.json"].digest)
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    st = blob.stat()
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.layout.blob_path(pvc_model.repo, by["tokenizer.json"].digest).unlink()
    for mode in ([], ["--full"]):
        v = run("verify", "--cache-dir", str(cache), *mode)
        assert v.returncode == 1
        assert "mismatch: config.json" in v.stdout and "missing: tokenizer.json" in v.stdout
    st_json = json.loads(run("status", "--cache-dir", str(cache), "--json").stdout)
    assert st_json[0]["state"] == "damaged"


def test_cache_dir_from_env(pvc_model: PvcModel, tmp_path: Path) -> None:
    r = run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", env={"MODEL_CACHE_DIR": str(tmp_path / "e")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e" / "hub").is_dir()


def test_non_tty_logs_are_json_lines(pvc_model: PvcModel, tmp_path: Path) -> None:
    r = run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(tmp_path / "c"))
    events = [json.loads(line)["event"] for line in r.stderr.splitlines() if line.startswith("{")]
    assert "fill.start" in events and "fill.done" in events


def test_demo_runs_offline(tmp_path: Path) -> None:
    r = run("demo", "--size", "4M", "--dir", str(tmp_path / "d"),
            env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 warning(s)" in r.stdout and "verified" in r.stdout and "0 mismatches" in r.stdout


# -------------------------------------------------------------------------------- usage errors: exit 2


RUN = ["run", "--no-kubernetes", "--source", "hub", "--models-file", "/dev/null"]

USAGE_ERRORS: list[tuple[list[str], dict[str, str], str]] = [
    (["fill", "not-a-repo", "--source", "pvc:/x"], {}, "repo: 'not-a-repo' must be 'org/name'"),
    (["fill", "acme/x\n", "--source", "hub"], {}, "repo: 'acme/x\\n'"),
    (["fill", "acme/\uff58", "--source", "hub"], {}, "is not a valid Hub name part"),
    (["fill", "org/m", "--revision", "a..b", "--source", "pvc:/x"], {}, "--revision: 'a..b'"),
    (["fill", "org/m", "--revision", "main\n", "--source", "hub"], {}, "--revision: 'main\\n'"),
    (["fill", "org/m", "--revision", "a" * 40 + "\n", "--source", "hub"], {}, "is not a valid branch"),
    (["fill", "org/m", "--source", "ftp:/x"], {}, "unknown source type 'ftp'"),
    (["fill", "org/m", "--source", "pvc:"], {}, "pvc needs a path"),
    (["fill", "org/m", "--source", "pvc:/x\x01"], {}, "control character"),
    (["fill", "org/m", "--source", "hub", "--allow", "*.json\n"], {}, "--allow: '*.json\\n' holds a control"),
    (["fill", "org/m", "--source", "hub", "--lock-timeout", "nan"], {}, "--lock-timeout: 'nan' is not a finite"),
    (["fill", "org/m", "--source", "hub", "--lock-timeout=-1"], {}, "--lock-timeout: '-1' is out of range"),
    (["verify", "--cache-dir", "/nonexistent/cache"], {}, "--cache-dir /nonexistent/cache: does not exist"),
    (["verify", "--full", "--fast"], {}, "argument --fast: not allowed with argument --full"),
    (["status", "org/m\n"], {}, "repo: 'org/m\\n'"),
    (["--log-level", "loud", "status"], {}, "argument --log-level: invalid choice: 'loud'"),
    (["status"], {"LOG_LEVEL": "verbose"}, "LOG_LEVEL: 'verbose' is not a log level (debug, info, warning, error)"),
    (["run", "--no-kubernetes", "--source", "hub"], {}, "--models-file: required"),
    (["run", "--source", "hub"], {}, "NODE_NAME: required"),
    ([*RUN, "--check-interval", "nan"], {}, "--check-interval: 'nan' is not a finite number"),
    ([*RUN, "--scrub-interval", "inf"], {}, "--scrub-interval: 'inf' is not a finite number"),
    ([*RUN, "--disk-budget=-1G"], {}, "--disk-budget: '-1G' is not a size"),
    ([*RUN, "--metrics-port", "70000"], {}, "--metrics-port: '70000' is out of range (0 to 65535)"),
    ([*RUN, "--workers", "0"], {}, "--workers: '0' is out of range (1 to 64)"),
    ([*RUN, "--label-prefix", "modelcache.dev\n"], {}, "--label-prefix: 'modelcache.dev\\n' is not a DNS"),
    (["coverage", "--label-prefix", "Bad_Prefix"], {}, "--label-prefix: 'Bad_Prefix' is not a DNS"),
    (["demo", "--size", "lots"], {}, "--size: 'lots' is not a size"),
]


@pytest.mark.parametrize(("args", "env", "needle"), USAGE_ERRORS, ids=[" ".join(a)[:60] for a, _, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_in_one_line_naming_the_field(args: list[str], env: dict[str, str], needle: str,
                                                           tmp_path: Path) -> None:
    args = [a.replace("/dev/null", str(tmp_path / "m.yaml")) for a in args]
    (tmp_path / "m.yaml").write_text("[]\n")
    one_line_error(run(*args, env={"MODEL_CACHE_DIR": str(tmp_path / "c"), **env}, drop=["NODE_NAME"]), 2, needle)


def test_run_refuses_a_non_utf8_models_file_before_starting(tmp_path: Path) -> None:
    mf = tmp_path / "models.yaml"
    mf.write_bytes(b"- name: caf\xe9\n  repo: org/m\n")
    r = run("run", "--no-kubernetes", "--source", "hub", "--models-file", str(mf), "--cache-dir", str(tmp_path / "c"))
    one_line_error(r, 2, f"{mf}: not UTF-8 text (byte 0xe9 at offset 11)")


def test_run_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("[]\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("run", "--no-kubernetes", "--source", "hub", "--models-file", str(tmp_path / "m.yaml"),
                "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--cache-dir", str(tmp_path / "c"))
    one_line_error(r, 2, f"--metrics-port {port} on 127.0.0.1: cannot listen (Address already in use)")


def test_help_has_no_markup_and_every_option_says_its_default() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices  # type: ignore[attr-defined]
    for name, p in [("", parser), *subparsers.items()]:
        text = p.format_help()
        assert "``" not in text and ":class:" not in text, name
        for action in p._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert "default" in action.help or "(required)" in action.help, f"{name} {action.option_strings}"
    r = run("run", "--help")
    assert r.returncode == 0 and "manifests/examples/models.yaml" in r.stdout and "0.0.0.0" in r.stdout


# ----------------------------------------------------------------------------- cache roots a user gets wrong


def as_nobody(argv: list[str]) -> tuple[int, str, str]:
    code, err = run_cli_as_nobody(argv)
    return code, "", err


def test_default_cache_dir_that_cannot_be_created(pvc_model: PvcModel, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    open_to_nobody(tmp_path, [pvc_model.root])
    monkeypatch.delenv("MODEL_CACHE_DIR", raising=False)
    res = as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}"])
    if Path("/var/lib/model-cache").exists():
        one_line_error(res, 2, "/var/lib/model-cache", "the default", "Permission denied")
    else:
        one_line_error(res, 2, "cache dir (the default; set --cache-dir or MODEL_CACHE_DIR) /var/lib/model-cache: "
                               "cannot create /var/lib/model-cache (Permission denied)")


def test_unwritable_cache_dir(pvc_model: PvcModel, tmp_path: Path) -> None:
    open_to_nobody(tmp_path, [pvc_model.root])
    cache = tmp_path / "root-owned"
    cache.mkdir(mode=0o755)
    res = as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)])
    one_line_error(res, 2, f"--cache-dir {cache}: cannot create files in {cache} by uid {NOBODY} (Permission denied)")


def test_lock_file_that_cannot_be_created(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = open_to_nobody(tmp_path, [pvc_model.root])  # nobody's, except the locks folder
    (cache / ".agent").mkdir()
    os.chown(cache / ".agent", NOBODY, NOBODY)
    (cache / ".agent" / "locks").mkdir(mode=0o755)
    res = as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)])
    one_line_error(res, 2, f"cannot create files in {cache}/.agent/locks by uid {NOBODY} (Permission denied)")


def test_unreadable_pvc(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = open_to_nobody(tmp_path, [pvc_model.root])
    os.chmod(pvc_model.root, 0o700)
    res = as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)])
    one_line_error(res, 2, f"--source pvc:{pvc_model.root}: cannot read {pvc_model.root} as uid {NOBODY} "
                           "(Permission denied)")


def test_read_only_cache_dir(pvc_model: PvcModel, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for cmd in (["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}"],
                    ["run", "--no-kubernetes", "--source", "hub", "--models-file", str(tmp_path / "m.yaml")]):
            (tmp_path / "m.yaml").write_text("[]\n")
            one_line_error(run(*cmd, "--cache-dir", str(ro)), 2, f"--cache-dir {ro}: cannot create files in {ro} "
                                                                 "(Read-only file system)")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_cache_dir_that_is_a_file(pvc_model: PvcModel, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(f))
    one_line_error(r, 2, f"--cache-dir {f}: is not a directory")


def test_status_and_verify_need_an_agent_root(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)).returncode == 0
    for cmd in ("status", "verify"):
        one_line_error(run(cmd, "--cache-dir", str(cache / "hub")), 2,
                       f"--cache-dir {cache}/hub: this is a hub/ folder, not the agent root; use its parent {cache}")
        one_line_error(run(cmd, "--cache-dir", str(tmp_path / "missing")), 2, "does not exist")
        one_line_error(run(cmd, "org/elsewhere", "--cache-dir", str(cache)), 1,
                       f"org/elsewhere is not in the cache at {cache}")
    j = run("status", "org/elsewhere", "--cache-dir", str(cache), "--json")
    assert j.returncode == 1 and json.loads(j.stdout) == {"error": f"org/elsewhere is not in the cache at {cache}",
                                                           "exit": 1}
    empty = tmp_path / "empty"
    empty.mkdir()
    v = run("verify", "--cache-dir", str(empty))
    assert v.returncode == 0 and v.stdout == f"nothing to verify: no cached models in {empty}\n"
    (empty / "hub").mkdir()
    assert run("verify", "--cache-dir", str(empty)).stdout.startswith("nothing to verify")


# ------------------------------------------------------------------------------ failures print one line


def test_failed_fill_is_one_line_on_a_terminal(tmp_path: Path) -> None:
    empty = tmp_path / "pvc"
    empty.mkdir()
    primary, secondary = pty.openpty()
    p = subprocess.Popen(agent_cmd("fill", "org/absent", "--source", f"pvc:{empty}", "--source", f"pvc:{empty}/x",
                                   "--cache-dir", str(tmp_path / "c")),
                         stdin=secondary, stdout=secondary, stderr=secondary, cwd=ROOT)
    os.close(secondary)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child closed the terminal
        while chunk := os.read(primary, 65536):
            out += chunk
    os.close(primary)
    assert p.wait(30) == 1
    lines = [line for line in out.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: org/absent@main: all sources failed: "), lines
    assert lines[0].count("pvc: ") == 2 and f"{empty}/x" in lines[0]  # two attempts, each labelled once


def test_failed_fill_with_json_is_a_json_object_on_stdout(tmp_path: Path) -> None:
    (tmp_path / "pvc").mkdir()
    r = run("fill", "org/absent", "--source", f"pvc:{tmp_path / 'pvc'}", "--cache-dir", str(tmp_path / "c"), "--json")
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["exit"] == 1 and err["error"].startswith("org/absent@main: all sources failed: pvc: repo org/absent")
    assert not [line for line in r.stderr.splitlines() if not line.startswith("{")]  # only JSON log lines


def test_source_labels_do_not_nest_in_the_error() -> None:
    mx = "modelexpress:127.0.0.1:1"
    attempts = [(mx, SourceError(f"{mx}: EnsureModelDownloaded org/m@main: UNAVAILABLE: connection refused")),
                ("pvc:/mnt/x", SourceError("pvc: /mnt/x is not a directory (is the PVC mounted?)")),
                ("hub", SourceError("org/m@main at hub: ConnectError")),
                ("pvc:/y", SourceError("boom"))]
    text = describe_attempts(attempts)
    assert text.count(mx) == 1 and text.count("pvc:") == 2 and text.count("hub") == 1
    assert text.endswith("; pvc:/y: boom")


def test_internal_errors_are_one_line_and_a_traceback_only_with_debug(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    args = ("demo", "--size", "4M", "--dir", str(tmp_path / "file" / "d"))
    r = run(*args)
    one_line_error(r, 1, "Not a directory", "(--log-level debug shows the traceback)")
    d = run("--log-level", "debug", *args)
    assert d.returncode == 1 and "Traceback (most recent call last)" in d.stderr and "NotADirectoryError" in d.stderr


# ------------------------------------------------------------------------------- stopping and the lock


@pytest.fixture
def big_pvc(tmp_path: Path) -> Iterator[PvcModel]:
    """A PVC whose weights take seconds to copy: a 4 GiB sparse file (instant to make, real bytes to copy).

    A plain file in the snapshot (no blob name) has no expected digest, so nothing has to hash it first.
    The fill reads zeros, hashes and writes them; the test stops it long before it is done.
    """
    root = tmp_path / "bigpvc"
    commit = "b" * 40
    snap = root / "hub" / repo_folder_name("org/big") / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    with open(snap / "model.safetensors", "wb") as f:
        f.truncate(4 << 30)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    yield PvcModel(root, root / "hub", "org/big", commit)
    shutil.rmtree(tmp_path, ignore_errors=True)  # staged gigabytes must not outlive the test


def _start_fill(pvc: PvcModel, cache: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(agent_cmd("fill", pvc.repo, "--source", f"pvc:{pvc.root}", "--cache-dir", str(cache),
                                      *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fill_stops_within_2s_and_says_what_was_kept(big_pvc: PvcModel, tmp_path: Path,
                                                                    sig: signal.Signals, code: int) -> None:
    cache = tmp_path / "c"
    staging = cache / ".agent" / "staging" / repo_folder_name(big_pvc.repo)
    p = _start_fill(big_pvc, cache)
    def copying() -> bool:  # a .part file with bytes in it (small files finish and move away meanwhile)
        with contextlib.suppress(OSError):
            return any(f.stat().st_size > 0 for f in staging.rglob("*.part"))
        return False

    _wait_for(lambda: staging.is_dir() and copying())
    t0 = time.monotonic()
    p.send_signal(sig)
    _out, err = p.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert p.returncode == code, err[-2000:]
    assert elapsed < 2.0, elapsed
    line = one_line_error((p.returncode, _out, err), code, f"{big_pvc.repo}@main: stopped by {sig.name}; kept ",
                          f"staged in {staging} for the next fill")
    st = json.loads(run("status", "--cache-dir", str(cache), "--json").stdout)
    assert [(r["repo"], r["state"]) for r in st] == [(big_pvc.repo, "partial")] and st[0]["staged_bytes"] > 0, line
    assert "partial" in run("status", "--cache-dir", str(cache)).stdout


def test_second_fill_says_at_once_whom_it_waits_for(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    store = Store(cache)
    with store.lock(pvc_model.repo):  # holder: this pytest process
        p = _start_fill(pvc_model, cache)
        assert p.stderr is not None
        fd = p.stderr.fileno()
        seen = ""
        deadline = time.monotonic() + 20
        while "waiting for the lock" not in seen:
            assert time.monotonic() < deadline and p.poll() is None, seen
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 65536).decode()
        line = next(li for li in seen.splitlines() if "waiting for the lock" in li)
        assert line.startswith(f"waiting for the lock on {pvc_model.repo}: another fill holds it (pid {os.getpid()} ")
        assert p.poll() is None  # still waiting
    assert p.wait(60) == 0


def test_metrics_server_serves_only_metrics_healthz_readyz() -> None:
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry

    from agent.metrics import HealthServer

    ok = (True, "")
    server = HealthServer(CollectorRegistry(), "127.0.0.1", 0, alive=lambda: ok, ready=lambda: ok).start()
    try:
        def get(path: str, method: str = "GET") -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code

        assert [get(p) for p in ("/metrics", "/healthz", "/readyz", "/metrics?x=1")] == [200, 200, 200, 200]
        for path in ("/", "/metrics/", "/healthz/x", "/debug/pprof", "/../etc/passwd", "/favicon.ico"):
            assert get(path) == 404, path
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            assert get("/metrics", method) == 501, method
    finally:
        server.stop()


def test_a_corrupt_manifest_is_reported_not_hidden(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)).returncode == 0
    manifest = Store(cache).layout.manifest_path(pvc_model.repo, pvc_model.commit)
    manifest.write_text("{not json")
    v = run("verify", "--cache-dir", str(cache))
    assert v.returncode == 1 and v.stdout.startswith(f"CORRUPT  {pvc_model.repo}@{pvc_model.commit[:12]}: {manifest}")
    st = json.loads(run("status", "--cache-dir", str(cache), "--json").stdout)
    assert [(r["repo"], r["commit"], r["state"]) for r in st] == [(pvc_model.repo, pvc_model.commit, "corrupt")]
    assert run("verify", pvc_model.repo, "--cache-dir", str(cache)).returncode == 1
