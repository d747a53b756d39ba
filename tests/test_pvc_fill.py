"""Filling from a PVC: byte-exact HF layout, verification levels, and every bad input named."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download

from agent.cache.layout import repo_folder_name
from agent.cache.store import Store
from agent.core.plan import algo_for_blob_name
from agent.core.spec import FileFilter
from agent.errors import IntegrityError, NotFoundError, SourceError, UnsafePathError
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import FillFailed, fill_model
from agent.sources.pvc import PvcSource
from tests.as_nobody import open_to_nobody, run_cli_as_nobody
from tests.conftest import PvcModel


def _published(store: Store, repo: str) -> list[str]:
    snaps = store.layout.snapshots_dir(repo)
    return sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []


def _assert_nothing_visible(store: Store, repo: str) -> None:
    assert _published(store, repo) == []
    refs = store.layout.refs_dir(repo)
    assert not refs.exists() or not any(refs.rglob("*"))


def test_fill_is_byte_exact_hf_layout(pvc_model: PvcModel, store: Store) -> None:
    res = fill_model(store, [PvcSource(pvc_model.root)], pvc_model.repo, "main")
    m = res.manifest
    assert m.commit == pvc_model.commit and m.level == "verified" and m.refs == ["main"]
    hub = store.layout.hub
    scan = scan_cache_dir(hub)
    assert scan.warnings == []
    assert [r.repo_id for r in scan.repos] == [pvc_model.repo]
    path = snapshot_download(pvc_model.repo, revision="main", cache_dir=hub, local_files_only=True)
    src_snap = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit
    ours = sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(src_snap).as_posix() for p in src_snap.rglob("*") if p.is_file())
    assert ours == theirs and "original/params.json" in ours
    for rel in ours:
        assert filecmp.cmp(Path(path) / rel, src_snap / rel, shallow=False), rel
        # symlink text identical to what huggingface_hub writes (relative into blobs)
        assert os.readlink(Path(path) / rel) == os.readlink(src_snap / rel)
    # blob names: sha256 for LFS files, git-sha1 for the rest
    for f in m.files:
        assert algo_for_blob_name(f.digest) == f.algo
    assert {f.algo for f in m.files} == {"sha256", "git-sha1"}
    # workers of any UID can read
    for blob in store.layout.blobs_dir(pvc_model.repo).iterdir():
        assert blob.stat().st_mode & 0o004
    assert store.check(m, full=True).ok


def test_hf_home_or_hub_dir_both_accepted(pvc_model: PvcModel, tmp_path: Path) -> None:
    for i, root in enumerate([pvc_model.root, pvc_model.hub]):
        s = Store(tmp_path / f"c{i}")
        assert fill_model(s, [PvcSource(root)], pvc_model.repo, "main").manifest.commit == pvc_model.commit


def test_revisions_share_blobs_and_refill_is_noop(pvc_model: PvcModel, store: Store) -> None:
    src = PvcSource(pvc_model.root)
    first = fill_model(store, [src], pvc_model.repo, "main")
    second = fill_model(store, [src], pvc_model.repo, "v1.0")
    third = fill_model(store, [src], pvc_model.repo, pvc_model.commit)
    assert first.fetched_files == len(first.manifest.files)
    assert second.fetched_files == 0 and third.fetched_files == 0
    assert store.read_ref(pvc_model.repo, "v1.0") == pvc_model.commit
    assert sorted(store.manifest(pvc_model.repo, pvc_model.commit).refs) == ["main", "v1.0"]  # type: ignore[union-attr]
    n_blobs = len(list(store.layout.blobs_dir(pvc_model.repo).iterdir()))
    assert n_blobs == len(first.manifest.files)


def test_allow_ignore_and_widening_the_filter(pvc_model: PvcModel, store: Store) -> None:
    src = PvcSource(pvc_model.root)
    small = fill_model(store, [src], pvc_model.repo, "main", FileFilter(allow=("*.json",), ignore=("original/*",)))
    paths = {f.path for f in small.manifest.files}
    assert paths and all(p.endswith(".json") and not p.startswith("original/") for p in paths)
    full = fill_model(store, [src], pvc_model.repo, "main")
    assert full.fetched_files == len(full.manifest.files) - len(paths)
    assert scan_cache_dir(store.layout.hub).warnings == []
    assert store.check(full.manifest, full=True).ok


def test_plain_files_pvc_is_computed_not_verified(tmp_path: Path, store: Store) -> None:
    hub = tmp_path / "plain" / "hub"
    commit = make_hub_model(hub, "org/plain", weight_bytes=1 * MiB, symlinks=False)
    res = fill_model(store, [PvcSource(hub)], "org/plain", "main")
    assert res.manifest.level == "computed" and res.manifest.commit == commit
    by = res.manifest.by_path()
    assert by["model.safetensors"].algo == "sha256" and by["config.json"].algo == "git-sha1"
    assert scan_cache_dir(store.layout.hub).warnings == []
    assert store.check(res.manifest, full=True).ok


def test_trusted_digest_from_second_source_upgrades_level(tmp_path: Path, store: Store) -> None:
    """A plain-file source streams bytes; a blob-named PVC vouches for them (same commit)."""
    plain = tmp_path / "plain" / "hub"
    named = tmp_path / "named" / "hub"
    c1 = make_hub_model(plain, "org/m", weight_bytes=1 * MiB, symlinks=False, seed=7)
    c2 = make_hub_model(named, "org/m", weight_bytes=1 * MiB, symlinks=True, seed=7)
    assert c1 == c2
    res = fill_model(store, [PvcSource(plain), PvcSource(named)], "org/m", "main")
    assert res.source == f"pvc:{plain}" and res.manifest.level == "verified"


def test_trusted_digest_catches_bad_bytes_from_stream_source(tmp_path: Path, store: Store) -> None:
    plain = tmp_path / "plain" / "hub"
    named = tmp_path / "named" / "hub"
    make_hub_model(plain, "org/m", weight_bytes=1 * MiB, symlinks=False, seed=7)
    make_hub_model(named, "org/m", weight_bytes=1 * MiB, symlinks=True, seed=7)
    snap = next((plain / "models--org--m" / "snapshots").iterdir())
    data = bytearray((snap / "config.json").read_bytes())
    data[5] ^= 1
    (snap / "config.json").write_bytes(bytes(data))
    # first source fails integrity twice, second (trusted) source fills it
    res = fill_model(store, [PvcSource(plain), PvcSource(named)], "org/m", "main")
    assert res.source == f"pvc:{named}"
    assert store.check(res.manifest, full=True).ok


def test_wrong_bytes_under_blob_name_fail_and_publish_nothing(pvc_model: PvcModel, store: Store) -> None:
    blobs = pvc_model.hub / repo_folder_name(pvc_model.repo) / "blobs"
    victim = next(b for b in blobs.iterdir() if len(b.name) == 64)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(FillFailed) as ei:
        fill_model(store, [PvcSource(pvc_model.root)], pvc_model.repo, "main")
    err = ei.value.attempts[0][1]
    assert isinstance(err, IntegrityError) and err.path.endswith(".safetensors")
    assert "sha256" in str(err)
    _assert_nothing_visible(store, pvc_model.repo)
    assert not any(store.layout.staging_dir(pvc_model.repo).rglob("*.part"))


def test_symlink_outside_root_rejected(pvc_model: PvcModel, store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    link = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit / "config.json"
    link.unlink()
    os.symlink(secret, link)
    with pytest.raises(UnsafePathError, match=r"config\.json points outside the PVC root"):
        PvcSource(pvc_model.root).resolve(pvc_model.repo, "main", FileFilter())
    with pytest.raises(FillFailed, match="outside the PVC root"):
        fill_model(store, [PvcSource(pvc_model.root)], pvc_model.repo, "main")
    _assert_nothing_visible(store, pvc_model.repo)


def test_missing_blob_named(pvc_model: PvcModel, store: Store) -> None:
    snap = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit
    target = (snap / "tokenizer.json").resolve()
    target.unlink()
    with pytest.raises(NotFoundError, match=r"tokenizer\.json points to a missing blob"):
        PvcSource(pvc_model.root).resolve(pvc_model.repo, "main", FileFilter())


@pytest.mark.parametrize(
    ("repo", "rev", "msg"),
    [("org/absent", "main", "repo org/absent not found"),
     ("org/tiny-model", "nope", "revision 'nope' of org/tiny-model not found"),
     ("org/tiny-model", "f" * 40, f"commit {'f' * 40} of org/tiny-model not found")],
)
def test_unknown_repo_or_revision(pvc_model: PvcModel, store: Store, repo: str, rev: str, msg: str) -> None:
    with pytest.raises(FillFailed, match=msg):
        fill_model(store, [PvcSource(pvc_model.root)], repo, rev)
    assert not store.layout.repo_dir(repo).exists()


def test_pvc_not_mounted(tmp_path: Path, store: Store) -> None:
    with pytest.raises(NotFoundError, match="is not a directory"):
        PvcSource(tmp_path / "nope").resolve("org/m", "main", FileFilter())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_unreadable_file_named_and_nothing_published(pvc_model: PvcModel, tmp_path: Path) -> None:
    """As 'nobody' (root bypasses file permissions), through the CLI."""
    cache = open_to_nobody(tmp_path, [pvc_model.root])
    snap = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit
    os.chmod((snap / "tokenizer.json").resolve(), 0o600)
    code, stderr = run_cli_as_nobody(["fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}",
                                      "--cache-dir", str(cache)])
    assert code == 1, stderr
    assert re.search(r"tokenizer\.json \(-> \S+/blobs/[0-9a-f]{40}\) is not readable", stderr), stderr
    assert not (cache / "hub" / repo_folder_name(pvc_model.repo) / "snapshots").exists()


def test_source_error_falls_through_to_next(pvc_model: PvcModel, store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = fill_model(store, [PvcSource(empty), PvcSource(pvc_model.root)], pvc_model.repo, "main")
    assert res.source == f"pvc:{pvc_model.root}"


def test_symlinked_directory_not_followed(pvc_model: PvcModel, tmp_path: Path) -> None:
    snap = pvc_model.hub / repo_folder_name(pvc_model.repo) / "snapshots" / pvc_model.commit
    inside = pvc_model.root / "elsewhere"  # inside the PVC root: still a folder we never follow
    inside.mkdir()
    (inside / "x.json").write_text("{}")
    os.symlink("../../../../elsewhere", snap / "linked")
    with pytest.raises(UnsafePathError, match="symlinked directory"):
        PvcSource(pvc_model.root).resolve(pvc_model.repo, "main", FileFilter())


def test_bad_ref_content_is_a_clear_error(pvc_model: PvcModel) -> None:
    (pvc_model.hub / repo_folder_name(pvc_model.repo) / "refs" / "main").write_text("not-a-commit")
    with pytest.raises(SourceError, match="not a 40-hex commit"):
        PvcSource(pvc_model.root).resolve(pvc_model.repo, "main", FileFilter())


def test_republish_keeps_old_snapshot_until_swap(pvc_model: PvcModel, store: Store) -> None:
    """Widening a snapshot swaps the whole tree: the old files stay readable throughout."""
    src = PvcSource(pvc_model.root)
    fill_model(store, [src], pvc_model.repo, "main", FileFilter(allow=("config.json",)))
    snap = store.layout.snapshot_dir(pvc_model.repo, pvc_model.commit)
    fd = os.open(snap, os.O_RDONLY)  # a reader holding the old tree open
    try:
        fill_model(store, [src], pvc_model.repo, "main")
        assert (snap / "config.json").read_bytes()
        assert (snap / "model-00001-of-00002.safetensors").exists()
    finally:
        os.close(fd)
    assert not list(store.layout.staging_dir(pvc_model.repo).glob("trash-*"))
    shutil.rmtree(store.layout.root)


def test_repair_from_hashless_source_keeps_verified_level(tmp_path: Path, store: Store) -> None:
    """Digests verified earlier on this node stay the expectation when re-filling from a plain-file source."""
    plain = tmp_path / "plain" / "hub"
    named = tmp_path / "named" / "hub"
    make_hub_model(plain, "org/m", weight_bytes=1 * MiB, symlinks=False, seed=7)
    make_hub_model(named, "org/m", weight_bytes=1 * MiB, symlinks=True, seed=7)
    first = fill_model(store, [PvcSource(named)], "org/m", "main").manifest
    assert first.level == "verified"
    store.layout.blob_path("org/m", first.by_path()["config.json"].digest).unlink()
    again = fill_model(store, [PvcSource(plain)], "org/m", "main")
    assert again.fetched_files == 1 and again.manifest.level == "verified"
    # and a wrong byte from the hashless source is now caught
    snap = next((plain / "models--org--m" / "snapshots").iterdir())
    data = bytearray((snap / "config.json").read_bytes())
    data[3] ^= 1
    (snap / "config.json").write_bytes(bytes(data))
    store.layout.blob_path("org/m", first.by_path()["config.json"].digest).unlink()
    with pytest.raises(FillFailed) as ei:
        fill_model(store, [PvcSource(plain)], "org/m", "main")
    assert isinstance(ei.value.attempts[0][1], IntegrityError) and ei.value.attempts[0][1].path == "config.json"
