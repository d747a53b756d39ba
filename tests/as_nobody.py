"""Run the CLI as 'nobody' in a forked child, so file permissions apply (root bypasses them).

Used by the tests of unreadable PVC files and folders. The child never returns into pytest, and a
child that hangs (the failure such tests look for on a broken build) is killed after ``timeout``.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

NOBODY = 65534


def open_to_nobody(tmp_path: Path, trees: Iterable[Path]) -> Path:
    """Make ``tmp_path``'s parents traversable and ``trees`` readable by others; return a cache dir nobody owns."""
    cache = tmp_path / "cache-nobody"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    for parent in [tmp_path, *tmp_path.parents]:
        if parent == Path(parent.anchor):
            break
        os.chmod(parent, parent.stat().st_mode | 0o011)
    for top in trees:
        for p in [top, *top.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return cache


def run_cli_as_nobody(argv: list[str], *, timeout: float = 30.0) -> tuple[int, str]:
    """(exit code, stderr) of ``model-cache-agent ARGV`` run as nobody; -1 when it had to be killed."""
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.dup2(err_w, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            from agent.cli import main

            code = main(argv)
        except BaseException:
            import traceback

            os.write(err_w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(err_w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout  # keep it inside pytest-timeout, so the kill below runs
    while time.monotonic() < deadline:
        ready, _, _ = select.select([err_r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready or not (data := os.read(err_r, 65536)):
            break
        chunks.append(data)
    os.close(err_r)
    done, status = os.waitpid(pid, os.WNOHANG)
    while done == 0 and time.monotonic() < deadline:  # EOF comes a moment before the child can be reaped
        time.sleep(0.01)
        done, status = os.waitpid(pid, os.WNOHANG)
    text = b"".join(chunks).decode(errors="replace")
    if done == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return -1, text + f"\n(killed: still running after {timeout:g} s)"
    return os.waitstatus_to_exitcode(status), text
