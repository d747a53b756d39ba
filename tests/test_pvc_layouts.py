"""`--source pvc:PATH` with every common shape of shared PVC, as a user runs `fill`.

    hf-cache    covered in test_pvc_fill.py
    local-dir   written by huggingface_hub itself (``snapshot_download(local_dir=...)`` against the
                loopback Hub, i.e. what ``hf download --local-dir`` does): verified against each etag
    plain       a folder of files per model: computed, named by the listing id (or the given commit)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, snapshot_download

import tests.peers.hub_fixtures as hub_fixtures
from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.errors import NotFoundError, SourceError
from agent.modelgen import MiB, make_model_dir, read_files
from agent.runtime.fill import FillFailed, fill_model
from agent.sources.pvc import PvcSource
from agent.sources.pvc.layouts import listing_id
from tests.conftest import agent_cmd
from tests.peers.hub_server import HubServer

hub = hub_fixtures.hub
hub_session = hub_fixtures.hub_session
hub_models = hub_fixtures.hub_models
HubModels = hub_fixtures.HubModels
ROOT = str(Path(__file__).parents[1])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})  # no Hub behind it


def local_dir_download(hub: HubServer, dest: Path, revision: str = "main", **kw: object) -> Path:
    """Exactly what `hf download org/tiny --local-dir DEST` writes (same library, same code path)."""
    snapshot_download("org/tiny", revision=revision, local_dir=dest, endpoint=hub.url, token=False, **kw)
    return dest


def snapshot_files(cache: Path, repo: str, commit: str) -> dict[str, bytes]:
    return read_files(Store(cache).layout.snapshot_dir(repo, commit))


# -- local-dir ---------------------------------------------------------------------------------------


def test_local_dir_download_fills_verified_at_its_commit(hub: HubServer, hub_models: HubModels,
                                                         tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    local_dir_download(hub, pvc / "org" / "tiny")
    assert (pvc / "org/tiny/.cache/huggingface/download/config.json.metadata").is_file()  # the shape under test
    cache = tmp_path / "cache"
    r = run("fill", "org/tiny", "--source", f"pvc:{pvc}", "--cache-dir", str(cache), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["commit"], out["level"]) == (hub_models.commit, "verified")
    assert snapshot_files(cache, "org/tiny", out["commit"]) == read_files(hub_models.src)
    assert Store(cache).read_ref("org/tiny", "main") == hub_models.commit
    # blob names are the Hub's etags, and huggingface_hub reads the result offline as its own cache
    assert sorted(b.name for b in Store(cache).layout.blobs_dir("org/tiny").iterdir()) == sorted(
        f.etag for f in hub.files("org/tiny", hub_models.commit).values())
    assert scan_cache_dir(cache / "hub").warnings == []
    offline = snapshot_download("org/tiny", cache_dir=cache / "hub", local_files_only=True)
    assert read_files(Path(offline)) == read_files(hub_models.src)
    assert (Store(cache).layout.trees_path("org/tiny", hub_models.commit)).is_file()  # listing kept, as hf does


def test_local_dir_file_that_does_not_match_its_etag_fails_the_fill(hub: HubServer, tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    model = local_dir_download(hub, pvc / "org" / "tiny")
    victim = model / "tokenizer.json"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1  # same size, one bit: only the etag can tell
    victim.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    r = run("fill", "org/tiny", "--source", f"pvc:{pvc}", "--cache-dir", str(cache))
    assert r.returncode == 1
    assert "tokenizer.json" in r.stderr and "git-sha1" in r.stderr, r.stderr
    assert not (cache / "hub" / "models--org--tiny" / "snapshots").exists()


def test_local_dir_named_by_subpath_and_commit(hub: HubServer, hub_models: HubModels, tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    local_dir_download(hub, pvc / "team" / "tiny-dev", revision="dev")
    cache = tmp_path / "cache"
    r = run("fill", "org/tiny", "--revision", hub_models.commit_dev, "--source", f"pvc:{pvc}",
            "--pvc-subpath", "team/tiny-dev", "--cache-dir", str(cache), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["commit"] == hub_models.commit_dev
    # the folder holds dev: asking for another commit is "not found", naming what it holds
    src = PvcSource(pvc, subpath="team/tiny-dev")
    with pytest.raises(NotFoundError, match=f"holds commit {hub_models.commit_dev}"):
        src.resolve("org/tiny", hub_models.commit, FileFilter())


def test_local_dir_refuses_mixed_commits_and_files_without_metadata(hub: HubServer, hub_models: HubModels,
                                                                    tmp_path: Path) -> None:
    model = local_dir_download(hub, tmp_path / "pvc" / "org" / "tiny")
    src = PvcSource(tmp_path / "pvc")
    (model / "notes.txt").write_text("added by hand")
    with pytest.raises(SourceError, match=r"notes\.txt has no download metadata"):
        src.resolve("org/tiny", "main", FileFilter())
    assert src.resolve("org/tiny", "main", FileFilter(ignore=("notes.txt",))).commit == hub_models.commit
    (model / "notes.txt").unlink()
    # a later download of another revision, narrowed to the json files: two commits in one folder
    local_dir_download(hub, model, revision="dev", allow_patterns=["*.json"])
    with pytest.raises(SourceError, match="mixes files of 2 commits"):
        src.resolve("org/tiny", "main", FileFilter())


# -- plain folder ----------------------------------------------------------------------------------


@pytest.fixture
def plain_pvc(tmp_path: Path) -> Path:
    pvc = tmp_path / "pvc"
    make_model_dir(pvc / "acme" / "plain", weight_bytes=1 * MiB, seed=3)
    return pvc


def test_plain_folder_is_computed_and_named_by_its_listing(plain_pvc: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = run("fill", "acme/plain", "--source", f"pvc:{plain_pvc}", "--cache-dir", str(cache), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["level"] == "computed"
    model = plain_pvc / "acme" / "plain"
    items = [(p.relative_to(model).as_posix(), "-", p.stat().st_size, p.stat().st_mtime_ns)
             for p in model.rglob("*") if p.is_file()]
    assert out["commit"] == listing_id(items)
    assert snapshot_files(cache, "acme/plain", out["commit"]) == read_files(model)
    # unchanged folder: same name, nothing copied again
    again = json.loads(run("fill", "acme/plain", "--source", f"pvc:{plain_pvc}", "--cache-dir", str(cache),
                           "--json").stdout)
    assert (again["commit"], again["fetched_files"]) == (out["commit"], 0)
    # a file rewritten in place with the same size is a new state: a new snapshot, the ref moves to it
    cfg = model / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"2", b"3", 1))
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 1_000_000_000))
    third = json.loads(run("fill", "acme/plain", "--source", f"pvc:{plain_pvc}", "--cache-dir", str(cache),
                           "--json").stdout)
    assert third["commit"] != out["commit"]
    assert Store(cache).read_ref("acme/plain", "main") == third["commit"]
    assert snapshot_files(cache, "acme/plain", third["commit"])["config.json"] == cfg.read_bytes()
    # a node given the old id as its pin (cluster mode) must not fill the new bytes under the old name
    src = PvcSource(plain_pvc)
    assert src.resolve("acme/plain", third["commit"], FileFilter()).commit == third["commit"]
    with pytest.raises(NotFoundError, match=f"changed since it was pinned as {out['commit']}"):
        src.resolve("acme/plain", out["commit"], FileFilter())


def test_plain_folder_with_a_given_commit_and_a_subpath(plain_pvc: Path, store: Store) -> None:
    commit = "c" * 40
    shutil.move(plain_pvc / "acme" / "plain", plain_pvc / "v2")
    src = PvcSource(plain_pvc, subpath="v2")
    res = fill_model(store, [src], "acme/plain", commit)
    assert res.manifest.commit == commit and res.manifest.level == "computed" and res.manifest.refs == []
    assert store.check(res.manifest, full=True).ok
    # .git and huggingface_hub's bookkeeping are never model files
    (plain_pvc / "v2" / ".git").mkdir()
    (plain_pvc / "v2" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    plan = src.resolve("acme/plain", commit, FileFilter())
    assert not any(f.path.startswith(".git") for f in plan.files)


def test_nothing_found_names_every_layout_tried(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    (pvc / "hub").mkdir(parents=True)
    r = run("fill", "acme/absent", "--source", f"pvc:{pvc}", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 1
    for place in (f"HF cache {pvc}/hub/models--acme--absent", f"HF cache {pvc}/models--acme--absent",
                  f"local-dir download or plain folder {pvc}/acme/absent"):
        assert place in r.stderr, r.stderr


def test_fill_without_source_says_the_default_is_hub(tmp_path: Path) -> None:
    r = run("fill", "acme/absent", "--cache-dir", str(tmp_path / "c"))
    assert "no --source given, using the default: hub" in r.stderr
    assert r.returncode == 1 and "hub:http://127.0.0.1:9" in r.stderr  # it really tried the Hub (HF_ENDPOINT)
    assert "default: hub" in run("fill", "--help").stdout


def test_spec_pvc_subpath_reaches_the_source(plain_pvc: Path, store: Store) -> None:
    from agent.core.spec import parse_model_spec
    from agent.sources.factory import for_model

    shutil.move(plain_pvc / "acme" / "plain", plain_pvc / "shared-models" / "p1")
    spec = parse_model_spec({"name": "p", "repo": "acme/plain", "pvcSubpath": "shared-models/p1"})
    sources = for_model([PvcSource(plain_pvc)], pvc_subpath=spec.pvc_subpath)
    assert fill_model(store, sources, spec.repo, spec.revision).manifest.level == "computed"
    with pytest.raises(FillFailed, match=r"plain folder .*/acme/plain"):
        fill_model(store, [PvcSource(plain_pvc)], spec.repo, spec.revision)
