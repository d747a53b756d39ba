"""A PVC that changes, lies or misbehaves while we read it: nothing wrong is published, nothing hangs,
every failure names the file and lets ``fill_model`` move on to the next source.

Faults are real filesystem states (FIFOs, swapped folders, unreadable folders, a writer rewriting a
file during the copy); only the I/O errors a local disk cannot produce on demand (EIO, ESTALE) come
through ``PvcSource(read_fn=...)``, the read-side twin of the store's ``write_fn`` seam.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import structlog

from agent.cache.layout import repo_folder_name
from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.errors import Cancelled, SourceError, UnsafePathError
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import FillFailed, fill_model
from agent.sources.base import NullProgress
from agent.sources.pvc import PvcSource
from tests.as_nobody import open_to_nobody, run_cli_as_nobody
from tests.conftest import PvcModel, agent_cmd

ROOT = str(Path(__file__).parents[1])
REPO = "org/plain"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture
def plain_hub(tmp_path: Path) -> tuple[Path, Path]:
    """An HF cache whose snapshot holds plain files (no blob names: nothing but our checks protects it)."""
    hub = tmp_path / "pvc" / "hub"
    commit = make_hub_model(hub, REPO, weight_bytes=12 * MiB, symlinks=False, seed=5)
    return hub, hub / repo_folder_name(REPO) / "snapshots" / commit


def published(store: Store, repo: str) -> list[str]:
    snaps = store.layout.snapshots_dir(repo)
    return sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []


class OnStart(NullProgress):
    """Runs ``action`` after the plan is made and before any byte is fetched (fill_model calls start there)."""

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action = action

    def start(self, total_bytes: int, files: int) -> None:
        self.action()


# -- 1. torn reads -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_file_rewritten_during_every_copy_fails_naming_it(plain_hub: tuple[Path, Path], tmp_path: Path) -> None:
    """A writer keeps rewriting the weights in place while `fill` copies them: never published (exit 1)."""
    hub, snap = plain_hub
    victim = snap / "model.safetensors"
    size = victim.stat().st_size
    stop = threading.Event()

    def writer() -> None:
        fd = os.open(victim, os.O_WRONLY)
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, bytes([i % 256]) * 4096, (i * 7919 * 4096) % (size - 4096))
                i += 1
                time.sleep(0.0005)
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        r = cli("fill", REPO, "--source", f"pvc:{hub}", "--cache-dir", str(tmp_path / "c"), "--allow", "*.safetensors")
    finally:
        stop.set()
        t.join()
    assert r.returncode == 1, r.stderr
    assert "model.safetensors changed while it was copied, twice" in r.stderr
    assert published(Store(tmp_path / "c"), REPO) == []


def test_file_rewritten_once_during_the_copy_is_copied_again(plain_hub: tuple[Path, Path], store: Store) -> None:
    hub, snap = plain_hub
    victim = snap / "model.safetensors"
    new = bytes(reversed(victim.read_bytes()))  # same size, other bytes: what the writer leaves in the end
    calls = [0]

    def read_while_rewritten(fd: int, bufs: list) -> int:  # type: ignore[type-arg]
        calls[0] += 1
        if calls[0] == 2:  # mid-copy of the 12 MiB file: a writer replaces its content in place
            victim.write_bytes(new)
        return os.readv(fd, bufs)

    with structlog.testing.capture_logs() as events:
        res = fill_model(store, [PvcSource(hub, max_workers=1, read_fn=read_while_rewritten)], REPO, "main",
                         FileFilter(allow=("*.safetensors",)))
    assert [e["path"] for e in events if e["event"] == "pvc.torn_read"] == [f"{victim}"]
    blob = store.layout.blob_path(REPO, res.manifest.by_path()["model.safetensors"].digest)
    assert blob.read_bytes() == new  # the content that really existed, never a mix
    assert store.check(res.manifest, full=True).ok


# -- 2. a tree swapped after planning --------------------------------------------------------------


def test_snapshot_swapped_for_a_symlink_after_planning_is_refused(plain_hub: tuple[Path, Path], tmp_path: Path,
                                                                  store: Store) -> None:
    hub, snap = plain_hub
    outside = tmp_path / "outside"
    shutil.copytree(snap, outside)
    for p in outside.rglob("*"):
        if p.is_file():
            p.write_bytes(b"X" * p.stat().st_size)  # same sizes, attacker's bytes

    def swap() -> None:
        snap.rename(snap.with_name("moved-away"))
        os.symlink(outside, snap)

    with pytest.raises(FillFailed) as ei:
        fill_model(store, [PvcSource(hub)], REPO, "main", progress=OnStart(swap))
    err = ei.value.attempts[0][1]
    assert isinstance(err, UnsafePathError) and str(snap) in str(err)
    assert published(store, REPO) == []
    assert not any(store.layout.blobs_dir(REPO).glob("*")) if store.layout.blobs_dir(REPO).exists() else True


def test_blobs_folder_swapped_after_planning_is_refused(pvc_model: PvcModel, tmp_path: Path, store: Store) -> None:
    blobs = pvc_model.hub / repo_folder_name(pvc_model.repo) / "blobs"

    def swap() -> None:
        other = tmp_path / "other-blobs"
        shutil.copytree(blobs, other)  # same names, same bytes even: still not the folder we planned
        blobs.rename(blobs.with_name("blobs-old"))
        other.rename(blobs)

    with pytest.raises(FillFailed, match="was replaced since the fill was planned"):
        fill_model(store, [PvcSource(pvc_model.root)], pvc_model.repo, "main", progress=OnStart(swap))
    assert published(store, pvc_model.repo) == []


# -- 3. FIFOs and other non-regular files ----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["plain file in the snapshot", "blob behind a symlink"])
def test_fifo_is_refused_and_never_hangs(pvc_model: PvcModel, tmp_path: Path, where: str) -> None:
    snap = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit
    if where == "plain file in the snapshot":
        os.mkfifo(snap / "extra.json")
    else:
        blob = (snap / "config.json").resolve()
        blob.unlink()
        os.mkfifo(blob)
    cache = tmp_path / "c"
    try:
        r = cli("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("fill hung on a FIFO")
    assert r.returncode == 1
    assert "is a FIFO, not a regular file" in r.stderr, r.stderr
    assert published(Store(cache), pvc_model.repo) == []


# -- issue 9, bug 3: a folder that cannot be listed ------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_unlistable_folder_fails_the_fill_naming_it(pvc_model: PvcModel, tmp_path: Path) -> None:
    """os.walk used to skip it silently and publish a 'verified' model without original/params.json."""
    cache = open_to_nobody(tmp_path, [pvc_model.root])
    folder = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit / "original"
    os.chmod(folder, 0o700)  # root's; 'nobody' cannot list it
    code, stderr = run_cli_as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}",
                                   "--cache-dir", str(cache)])
    assert code == 1, stderr
    assert re.search(f"cannot (list|open folder) {re.escape(str(folder))}: Permission denied", stderr), stderr
    assert not (cache / "hub" / repo_folder_name(pvc_model.repo) / "snapshots").exists()


# -- issue 9, bug 7: I/O errors fall back to the next source ---------------------------------------


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_io_error_while_copying_falls_back_to_the_next_source(pvc_model: PvcModel, tmp_path: Path, store: Store,
                                                              code: int) -> None:
    second = tmp_path / "pvc2"
    shutil.copytree(pvc_model.root, second, symlinks=True)

    def failing(fd: int, bufs: list) -> int:  # type: ignore[type-arg]
        raise OSError(code, os.strerror(code))

    flaky = PvcSource(pvc_model.root, read_fn=failing)
    res = fill_model(store, [flaky, PvcSource(second)], pvc_model.repo, "main")
    assert res.source == f"pvc:{second}" and store.check(res.manifest, full=True).ok
    with pytest.raises(FillFailed) as ei:
        fill_model(Store(tmp_path / "c2"), [flaky], pvc_model.repo, "main")
    err = ei.value.attempts[0][1]
    assert isinstance(err, SourceError) and not err.permanent and os.strerror(code) in str(err)
    assert str(pvc_model.hub) in str(err)  # names the file it could not read


# -- issue 9, bug 8: the copy honours the stop event -----------------------------------------------


def test_stop_is_honoured_between_chunks(plain_hub: tuple[Path, Path], store: Store) -> None:
    hub, _snap = plain_hub
    stop = threading.Event()

    class StopAfterFirstChunk(NullProgress):
        def advance(self, nbytes: int) -> None:
            stop.set()  # SIGTERM arrives while the first 8 MiB chunk of the 12 MiB file is written

    with pytest.raises(Cancelled):
        fill_model(store, [PvcSource(hub, max_workers=1)], REPO, "main", FileFilter(allow=("*.safetensors",)),
                   progress=StopAfterFirstChunk(), stop=stop)
    assert published(store, REPO) == []
