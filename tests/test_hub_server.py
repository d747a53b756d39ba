"""The loopback Hub speaks the protocol huggingface_hub expects (so the hub source tests mean something)."""

from __future__ import annotations

import hashlib

import httpx2
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

import tests.peers.hub_fixtures as hub_fixtures
from tests.peers.hub_server import HubServer, git_blob_sha1, parse_range

hub = hub_fixtures.hub
hub_session = hub_fixtures.hub_session
hub_models = hub_fixtures.hub_models
HubModels = hub_fixtures.HubModels


def test_head_metadata_as_huggingface_hub_reads_it(hub: HubServer, hub_models: HubModels) -> None:
    config = (hub_models.src / "config.json").read_bytes()
    meta = get_hf_file_metadata(hf_hub_url("org/tiny", "config.json", revision="v1.0", endpoint=hub.url),
                                token=False)
    assert (meta.etag, meta.size, meta.commit_hash) == (git_blob_sha1(config), len(config), hub_models.commit)
    weights = (hub_models.src / "model.safetensors").read_bytes()
    meta = get_hf_file_metadata(hf_hub_url("org/cdn", "model.safetensors", endpoint=hub.url), token=False)
    assert meta.etag == hashlib.sha256(weights).hexdigest() and meta.size == len(weights)
    assert meta.location.startswith(hub.cdn_url + "/cdn/")  # a redirect to another origin


def test_ranges_and_416(hub: HubServer, hub_models: HubModels) -> None:
    data = (hub_models.src / "tokenizer.json").read_bytes()
    url = hf_hub_url("org/tiny", "tokenizer.json", endpoint=hub.url)
    with httpx2.Client() as c:
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.content, r.headers["Content-Range"]) == (206, data[10:20],
                                                                          f"bytes 10-19/{len(data)}")
        r = c.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert parse_range("bytes=-5", 10) == (5, 9) and parse_range("bytes=3-100", 10) == (3, 9)


def test_tree_is_paged_with_link_next(hub: HubServer, hub_models: HubModels) -> None:
    files = [f.path for f in HfApi(endpoint=hub.url, token=False).list_repo_tree("org/tiny", recursive=True)
             if f.__class__.__name__ == "RepoFile"]
    assert sorted(files) == sorted(p.relative_to(hub_models.src).as_posix()
                                   for p in hub_models.src.rglob("*") if p.is_file())
    pages = hub.requests(path="*/tree/*")
    assert len(pages) >= 3 and all("cursor=" in p.query for p in pages[1:])


@pytest.mark.parametrize(("repo", "rev", "code"), [
    ("org/nope", "main", "RepoNotFound"), ("org/tiny", "nope", "RevisionNotFound"),
    ("org/gated", "main", "GatedRepo"),
])
def test_error_codes(hub: HubServer, repo: str, rev: str, code: str) -> None:
    r = httpx2.get(f"{hub.url}/api/models/{repo}/revision/{rev}")
    assert r.headers["X-Error-Code"] == code and r.status_code == (401 if code == "GatedRepo" else 404)
    r = httpx2.head(hf_hub_url("org/tiny", "missing.bin", endpoint=hub.url))
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "EntryNotFound"


def test_faults_fire_count_times(hub: HubServer) -> None:
    hub.add_fault("status", "*/config.json", count=2, status=503, headers={"Retry-After": "7"})
    hub.add_fault("cut", "*/tokenizer.json", after=10)
    url = hf_hub_url("org/tiny", "config.json", endpoint=hub.url)
    codes = [httpx2.get(url).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(hf_hub_url("org/tiny", "tokenizer.json", endpoint=hub.url))
    assert [r.fault for r in hub.requests(path="*/tokenizer.json")] == ["cut"]
