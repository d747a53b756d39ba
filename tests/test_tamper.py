"""Tamper matrix: every kind of change under a ready model is detected, unlabelled within 2 s,
repaired from the source (only damaged blobs re-fetched), and relabelled only once verified."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from agent.cache.store import Store
from agent.modelgen import MiB, make_hub_model
from agent.runtime.scrub import Pacer
from tests.agent_harness import RunningAgent, running_agent, settings_for, wait_until

REPO = "org/tamper"
NAME = "tamper"


def changes_since(agent: RunningAgent, t0: float) -> list[dict]:
    """Label changes the agent published after ``t0`` (its no-cluster reporter keeps a history)."""
    return [c for c in agent.node_status().get("history", []) if c["at"] >= t0]


def _paths(store: Store) -> tuple[Path, Path, dict[str, str]]:
    m = store.manifests()[0]
    snap = store.layout.snapshot_dir(REPO, m.commit)
    return snap, store.layout.blobs_dir(REPO), {f.path: f.digest for f in m.files}


def bit_flip(store: Store) -> None:
    _, blobs, d = _paths(store)
    p = blobs / d["model.safetensors"]
    with open(p, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0x01]))


def truncate(store: Store) -> None:
    _, blobs, d = _paths(store)
    os.truncate(blobs / d["model.safetensors"], 100)


def delete_blob(store: Store) -> None:
    _, blobs, d = _paths(store)
    (blobs / d["tokenizer.json"]).unlink()


def delete_symlink(store: Store) -> None:
    snap, _, _ = _paths(store)
    (snap / "config.json").unlink()


def repoint_symlink(store: Store) -> None:
    snap, _, d = _paths(store)
    link = snap / "config.json"
    link.unlink()
    os.symlink(f"../../blobs/{d['tokenizer.json']}", link)


def extra_file(store: Store) -> None:
    snap, _, _ = _paths(store)
    (snap / "injected.py").write_text("print('hi')\n")


def ref_edit(store: Store) -> None:
    (store.layout.refs_dir(REPO) / "main").write_text("0" * 40)


TAMPERS: dict[str, Callable[[Store], None]] = {
    "bit_flip": bit_flip, "truncate": truncate, "delete_blob": delete_blob, "delete_symlink": delete_symlink,
    "repoint_symlink": repoint_symlink, "extra_file": extra_file, "ref_edit": ref_edit,
}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    make_hub_model(tmp_path / "pvc" / "hub", REPO, weight_bytes=4 * MiB, shards=1)
    mf = tmp_path / "models.yaml"
    mf.write_text(yaml.safe_dump([{"name": NAME, "repo": REPO}]))
    return tmp_path / "pvc", mf


@pytest.mark.parametrize("kind", list(TAMPERS))
def test_tamper_detected_unlabelled_repaired(kind: str, setup: tuple[Path, Path], tmp_path: Path) -> None:
    pvc, mf = setup
    cache = tmp_path / "cache"
    with running_agent(settings_for(cache, mf, [f"pvc:{pvc}"], check_interval=30.0)) as agent:
        wait_until(lambda: agent.ready() == {NAME}, 15)
        store = Store(cache)
        before = agent.metrics()
        fetched_before = before[("modelcache_fill_bytes_total", (("source", "pvc"),))]
        t0 = time.time()
        TAMPERS[kind](store)
        wait_until(lambda: NAME in agent.ready() and len(changes_since(agent, t0)) >= 2, 15)
        # the moment the label is back, everything verifies byte for byte
        m = store.manifests()[0]
        assert store.check(m, full=True).ok, store.check(m, full=True).problems()
        time.sleep(0.3)
        changes = changes_since(agent, t0)
        # exactly one removal then one re-add: detected, unlabelled, repaired, relabelled, no flapping
        assert [NAME in c["ready"] for c in changes] == [False, True], changes
        assert changes[0]["at"] - t0 < 2.0  # the bound; the periodic check is 30 s away
        after = agent.metrics()
        assert after[("modelcache_repairs_total", ())] == before[("modelcache_repairs_total", ())] + 1
        assert after[("modelcache_verify_failures_total", (("reason", "damaged"),))] >= 1
        refetched = after[("modelcache_fill_bytes_total", (("source", "pvc"),))] - fetched_before
        m = store.manifests()[0]
        if kind in ("bit_flip", "truncate"):
            assert refetched == m.by_path()["model.safetensors"].size  # only the damaged blob
        elif kind == "delete_blob":
            assert refetched == m.by_path()["tokenizer.json"].size
        else:
            assert refetched == 0  # tree or ref damage: blobs are fine, nothing re-downloaded
        assert sorted(p.name for p in store.layout.snapshots_dir(REPO).iterdir()) == [m.commit]
        assert store.read_ref(REPO, "main") == m.commit


def test_scrub_finds_silent_corruption(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Corruption that keeps size, mtime and inode (bit rot) is invisible to stat; the scrub finds it."""
    pvc, mf = setup
    cache = tmp_path / "cache"
    with running_agent(settings_for(cache, mf, [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {NAME}, 15)
    store = Store(cache)
    _, blobs, d = _paths(store)
    p = blobs / d["model.safetensors"]
    st = p.stat()
    bit_flip(store)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.check(store.manifests()[0]).ok  # stat-only check cannot see it
    with running_agent(settings_for(cache, mf, [f"pvc:{pvc}"], scrub_interval=0.5,
                                    scrub_bytes_per_second=1 << 30)) as agent:
        wait_until(lambda: agent.ready() == {NAME}, 5)  # fast restart trusts the manifest...
        wait_until(lambda: NAME not in agent.ready(), 10)  # ...until the scrub re-reads it
        wait_until(lambda: NAME in agent.ready(), 15)
        assert store.check(store.manifests()[0], full=True).ok
        assert agent.metrics()[("modelcache_scrub_bytes_total", ())] >= 4 * MiB


def test_pacer_holds_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pace = Pacer(100, clock=lambda: now[0], sleep=sleep)
    for _ in range(30):
        pace(10)
    assert abs(now[0] - 3.0) < 1e-6  # 300 bytes at 100 B/s
    assert Pacer(0, clock=lambda: 0.0, sleep=sleep)(10**9) is None


def test_repair_that_first_fails_is_still_a_repair(setup: tuple[Path, Path], tmp_path: Path) -> None:
    pvc, mf = setup
    cache = tmp_path / "cache"
    with running_agent(settings_for(cache, mf, [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {NAME}, 15)
        hidden = tmp_path / "pvc-away"
        pvc.rename(hidden)  # the source disappears...
        delete_blob(Store(cache))  # ...and the cache is damaged
        wait_until(lambda: agent.node_status()["models"][NAME]["state"] == "failed", 10)
        hidden.rename(pvc)  # the source is back: the next attempt repairs
        wait_until(lambda: agent.ready() == {NAME}, 15)
        assert agent.metrics()[("modelcache_repairs_total", ())] == 1
