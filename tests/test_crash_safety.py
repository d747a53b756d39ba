"""kill -9 at random instants of a real fill process, disk full, and concurrent fills.

After every kill the visible cache must be either the old state or a complete new one: every
snapshot file resolves to a blob whose bytes match its name, every ref points at a complete
snapshot, and no temp file is visible under hub/. A rerun must finish and leave no staging debris.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.cache.hashing import hash_file
from agent.cache.layout import repo_folder_name
from agent.cache.store import Store
from agent.core.plan import algo_for_blob_name
from agent.errors import DiskFullError
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import fill_model
from agent.sources.pvc import PvcSource
from tests.conftest import agent_cmd

REPO = "org/crashy"


def _expected_files(pvc_hub: Path, commit: str) -> set[str]:
    snap = pvc_hub / repo_folder_name(REPO) / "snapshots" / commit
    return {p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir()}


def assert_consistent(cache: Path, expected: set[str], commit: str) -> str:
    """Check the visible state; returns 'empty' or 'complete'."""
    repo_dir = cache / "hub" / repo_folder_name(REPO)
    if not repo_dir.exists():
        return "empty"
    assert {p.name for p in repo_dir.iterdir()} <= {"blobs", "snapshots", "refs", "trees"}
    blobs = repo_dir / "blobs"
    for b in blobs.iterdir() if blobs.exists() else []:
        algo = algo_for_blob_name(b.name)
        assert algo is not None, f"temp or foreign file visible in blobs/: {b.name}"
        assert hash_file(b, algo).digest == b.name, f"blob {b.name} has bytes that do not match its name"
    snaps = repo_dir / "snapshots"
    state = "empty"
    for snap in snaps.iterdir() if snaps.exists() else []:
        files = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir()}
        assert files == expected, f"partial snapshot visible: {sorted(expected - files)} missing"
        for f in files:
            assert (snap / f).is_symlink() and (snap / f).resolve().exists(), f
        state = "complete"
    refs = repo_dir / "refs"
    for r in refs.rglob("*") if refs.exists() else []:
        if r.is_file():
            assert r.name == "main" and r.read_text() == commit
            assert (snaps / commit).is_dir(), "ref visible before its snapshot"
    return state


@pytest.fixture
def crash_pvc(tmp_path: Path) -> tuple[Path, str]:
    hub = tmp_path / "pvc" / "hub"
    commit = make_hub_model(hub, REPO, weight_bytes=48 * MiB, shards=8)
    return hub, commit


def _start_fill(pvc_hub: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        agent_cmd("--log-json", "fill", REPO, "--source", f"pvc:{pvc_hub}", "--cache-dir", str(cache)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(Path(__file__).parents[1]),
    )


def test_kill_minus_9_at_random_points(crash_pvc: tuple[Path, str], tmp_path: Path) -> None:
    pvc_hub, commit = crash_pvc
    expected = _expected_files(pvc_hub, commit)
    rng = random.Random(1234)
    # how long the fill phase itself takes (after start-up), measured once in this run
    probe = subprocess.run(
        agent_cmd("--log-json", "fill", REPO, "--source", f"pvc:{pvc_hub}", "--cache-dir", str(tmp_path / "probe")),
        check=True, capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    fill_secs = next(json.loads(x)["seconds"] for x in probe.stderr.splitlines() if '"fill.done"' in x)
    killed_mid_fill = 0
    iterations = 12
    for i in range(iterations):
        cache = tmp_path / f"cache{i}"
        for _kill in range(2):
            proc = _start_fill(pvc_hub, cache)
            assert proc.stderr is not None
            for line in proc.stderr:  # wait until the fill itself begins, then kill somewhere inside it
                if '"fill.start"' in line:
                    break
            time.sleep(rng.uniform(0, fill_secs * 0.9))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_fill += 1
            proc.wait()
            state = assert_consistent(cache, expected, commit)
            assert state in ("empty", "complete")
        done = subprocess.run(
            agent_cmd("fill", REPO, "--source", f"pvc:{pvc_hub}", "--cache-dir", str(cache)),
            capture_output=True, text=True, cwd=str(Path(__file__).parents[1]),
        )
        assert done.returncode == 0, done.stderr
        assert assert_consistent(cache, expected, commit) == "complete"
        store = Store(cache)
        m = store.manifest(REPO, commit)
        assert m is not None and store.check(m, full=True).ok
        staging = store.layout.staging_dir(REPO)
        assert not staging.exists() or not list(staging.iterdir()), list(staging.rglob("*"))
    assert killed_mid_fill >= iterations // 2  # many kills really landed inside a running fill


def _write_fault(fail_after: int):  # type: ignore[no-untyped-def]
    written = 0

    def write(fd: int, data: memoryview) -> int:
        nonlocal written
        if written + len(data) > fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += len(data)
        return os.write(fd, data)

    return write


def test_enospc_at_write_layer_cleans_up_and_keeps_old(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    make_hub_model(pvc, "org/first", weight_bytes=1 * MiB)
    make_hub_model(pvc, "org/second", weight_bytes=4 * MiB, shards=2, seed=3)
    good = fill_model(Store(tmp_path / "c"), [PvcSource(pvc)], "org/first", "main").manifest
    faulty = Store(tmp_path / "c", write_fn=_write_fault(3 * MiB))
    with pytest.raises(DiskFullError, match="disk full while writing"):
        fill_model(faulty, [PvcSource(pvc)], "org/second", "main")
    store = Store(tmp_path / "c")
    assert store.check(good, full=True).ok
    assert not store.layout.repo_dir("org/second").joinpath("snapshots").exists()
    assert not store.layout.staging_dir("org/second").joinpath("files").exists()
    assert not any(store.layout.staging_dir("org/second").rglob("*.part"))
    # and once space is back, the fill completes
    assert fill_model(store, [PvcSource(pvc)], "org/second", "main").manifest.level == "verified"


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_on_small_filesystem(tmp_path: Path, tiny_fs: Path) -> None:
    pvc = tmp_path / "pvc"
    make_hub_model(pvc, "org/first", weight_bytes=1 * MiB)
    make_hub_model(pvc, "org/big", weight_bytes=8 * MiB, shards=2, seed=5)
    good = fill_model(Store(tiny_fs), [PvcSource(pvc)], "org/first", "main").manifest
    # the pre-check refuses before writing a byte, naming sizes
    with pytest.raises(DiskFullError, match=r"needs \d+ bytes .* only \d+ free"):
        fill_model(Store(tiny_fs), [PvcSource(pvc)], "org/big", "main")
    # with the pre-check defeated, the kernel's ENOSPC is caught at the write layer
    with pytest.raises(DiskFullError):
        fill_model(Store(tiny_fs, reserve_bytes=-(1 << 40)), [PvcSource(pvc)], "org/big", "main")
    store = Store(tiny_fs)
    assert store.check(good, full=True).ok
    assert not store.layout.repo_dir("org/big").joinpath("snapshots").exists()
    assert not any(store.layout.staging_root.rglob("*.part"))
    free_after = store.free_bytes()
    assert free_after > 4 * MiB  # staging really released its space


def test_concurrent_fills_of_same_repo(crash_pvc: tuple[Path, str], tmp_path: Path) -> None:
    pvc_hub, commit = crash_pvc
    cache = tmp_path / "shared-cache"
    procs = [_start_fill(pvc_hub, cache) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    store = Store(cache)
    m = store.manifest(REPO, commit)
    assert m is not None and store.check(m, full=True).ok
    # exactly one process moved bytes; the others found the blobs already there
    starts = [line for o in outs for line in o[1].splitlines() if '"fill.start"' in line]
    needed = sorted(json.loads(line)["needed_files"] for line in starts)
    assert needed[:2] == [0, 0] and needed[2] == len(m.files)


def test_lock_timeout_names_the_other_fill(crash_pvc: tuple[Path, str], tmp_path: Path) -> None:
    pvc_hub, _ = crash_pvc
    store = Store(tmp_path / "c")
    with store.lock(REPO):
        r = subprocess.run(
            agent_cmd("fill", REPO, "--source", f"pvc:{pvc_hub}", "--cache-dir", str(tmp_path / "c"),
                      "--lock-timeout", "0.3"),
            capture_output=True, text=True, cwd=str(Path(__file__).parents[1]),
        )
    assert r.returncode == 1 and "being filled by another process" in r.stderr


@pytest.mark.parametrize("inodes", [6, 9, 12, 15, 18, 21, 24, 27, 30, 34, 38, 44])
def test_running_out_of_inodes_at_any_step_is_one_clear_line(tmp_path: Path, inodes: int) -> None:
    """Issue 10 item 5: ENOSPC from mkdir, the .part create, the manifest temp, a symlink or a ref.

    A tmpfs with only ``inodes`` inodes makes a different metadata step of the fill run out each time;
    the user must see one line naming the disk, never a traceback, and nothing half-published.
    """
    pvc = tmp_path / "pvc"
    make_hub_model(pvc / "hub", REPO, weight_bytes=64 * 1024, shards=2)
    mnt = tmp_path / "inodes"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=32m,nr_inodes={inodes}", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        proc = subprocess.run(agent_cmd("fill", REPO, "--source", f"pvc:{pvc}", "--cache-dir", str(mnt / "c")),
                              capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[1]))
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if proc.returncode != 0:
            assert proc.returncode == 1, proc.stderr[-2000:]
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            assert len(lines) == 1 and "disk full" in lines[0], proc.stderr[-2000:]
        if (mnt / "c" / "hub").is_dir():
            snap = pvc / "hub" / repo_folder_name(REPO) / "snapshots"
            commit = next(snap.iterdir()).name
            assert assert_consistent(mnt / "c", _expected_files(pvc / "hub", commit), commit) in ("empty", "complete")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
