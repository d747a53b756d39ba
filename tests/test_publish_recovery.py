"""Issue 10 item 11: a kill between the manifest and the tree swap is an unfinished fill, never damage.

A publish writes ``<commit>.json.pending``, swaps the snapshot tree in, then renames the pending file
over the manifest. These tests stop it by hand at each point and check what ``verify`` and the next
sweep make of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from agent.cache.manifest import Manifest, ManifestFile, manifest_bytes
from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import fill_model
from agent.sources.pvc import PvcSource
from tests.conftest import agent_cmd

REPO = "org/pending"


def verify(cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd("verify", "--cache-dir", str(cache)), capture_output=True, text=True,
                          cwd=str(Path(__file__).parents[1]), timeout=60)


def narrow_then_pending_widen(tmp_path: Path) -> tuple[Store, Manifest, Path]:
    """A *.json fill, published; then a pending manifest for every file as a killed widening leaves it."""
    make_hub_model(tmp_path / "pvc" / "hub", REPO, weight_bytes=MiB // 2)
    store = Store(tmp_path / "cache")
    src = PvcSource(tmp_path / "pvc")
    narrow = fill_model(store, [src], REPO, "main", FileFilter(allow=("*.json",))).manifest
    full_plan = src.resolve(REPO, "main", FileFilter())
    extra = [ManifestFile(e.path, e.size, e.algo, e.digest or "", "0" * 32, 0, 0, True)
             for e in full_plan.files if e.path not in narrow.by_path()]
    wide = Manifest(REPO, narrow.commit, [*narrow.files, *extra], narrow.refs)
    pending = store.layout.pending_manifest_path(REPO, narrow.commit)
    pending.write_bytes(manifest_bytes(wide))
    return store, narrow, pending


def test_killed_before_the_tree_swap_verify_sees_no_damage_and_the_sweep_drops_it(tmp_path: Path) -> None:
    store, narrow, pending = narrow_then_pending_widen(tmp_path)
    proc = verify(store.layout.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout
    with store.lock(REPO):
        store.sweep_staging(REPO)
    assert not pending.exists()
    m = store.manifest(REPO, narrow.commit)
    assert m is not None and [f.path for f in m.files] == [f.path for f in narrow.files]
    assert store.check(m).ok


def test_killed_after_the_tree_swap_the_sweep_rolls_the_manifest_forward(tmp_path: Path) -> None:
    make_hub_model(tmp_path / "pvc" / "hub", REPO, weight_bytes=MiB // 2)
    store = Store(tmp_path / "cache")
    m = fill_model(store, [PvcSource(tmp_path / "pvc")], REPO, "main").manifest
    final = store.layout.manifest_path(REPO, m.commit)
    pending = store.layout.pending_manifest_path(REPO, m.commit)
    os.replace(final, pending)  # as if killed between the tree swap and the rename
    assert verify(store.layout.root).returncode in (0, 1)  # nothing to check yet is not a crash
    with store.lock(REPO):
        store.sweep_staging(REPO)
    assert not pending.exists() and final.exists()
    rolled = store.manifest(REPO, m.commit)
    assert rolled is not None and store.check(rolled, full=True).ok


def test_a_corrupt_pending_manifest_is_dropped_not_trusted(tmp_path: Path) -> None:
    store, narrow, pending = narrow_then_pending_widen(tmp_path)
    pending.write_text(json.dumps({"version": 1, "repo": REPO}))
    with store.lock(REPO):
        store.sweep_staging(REPO)
    assert not pending.exists() and store.manifest(REPO, narrow.commit) is not None
