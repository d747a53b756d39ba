"""HubSource against a real loopback Hub (tests/peers/hub_server.py) with real huggingface_hub and
hf_transfer: happy paths, byte-for-byte layout identity with snapshot_download, and every fault the
source must survive or report (5xx, 429 + Retry-After, cut, stall, corrupt body, 404s, 401, CDN auth)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from pathlib import Path

import httpx2
import pytest
import structlog
from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

import tests.peers.hub_fixtures as hub_fixtures
from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core.retry import RetryPolicy
from agent.core.spec import FileFilter
from agent.errors import AuthError, IntegrityError, NotFoundError, TransientSourceError
from agent.modelgen import MiB
from agent.sources.base import NullProgress, SourceRef, SourceSettings
from agent.sources.hub import HubSource, open_source
from tests.peers.hub_server import HubServer, git_blob_sha1, wait_for

hub = hub_fixtures.hub
hub_session = hub_fixtures.hub_session
hub_models = hub_fixtures.hub_models
HubModels = hub_fixtures.HubModels
TOKEN = hub_fixtures.TOKEN
WEIGHTS = "model.safetensors"
CHUNK = 4 * MiB  # hf_transfer chunk in tests: the 11 MiB file is 3 chunks


def make_source(hub: HubServer, *, token: str | None = TOKEN, timeout: float = 5.0, retries: int = 4,
                hf_transfer: bool = False) -> HubSource:
    settings = SourceSettings(hf_endpoint=hub.url, hf_token=token, timeout=timeout, max_workers=4,
                              retry=RetryPolicy(attempts=retries, base=0.01, cap=0.05, jitter=0.1))
    if hf_transfer:
        return HubSource(settings, hf_transfer_min_size=CHUNK, hf_transfer_chunk_size=CHUNK)
    return HubSource(settings)


def fill(src: HubSource, store: Store, repo: str, revision: str = "main",
         files: FileFilter | None = None) -> Manifest:
    plan = src.resolve(repo, revision, files or FileFilter())
    with store.lock(repo):
        f = store.begin(plan)
        src.fetch(plan, f.needed(), f, NullProgress())
        return f.publish()


def snapshot_bytes(store: Store, repo: str, commit: str) -> dict[str, bytes]:
    snap = store.layout.snapshot_dir(repo, commit)
    return {p.relative_to(snap).as_posix(): p.read_bytes() for p in sorted(snap.rglob("*")) if p.is_file()}


def source_bytes(src: Path) -> dict[str, bytes]:
    return {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}


def tree_state(folder: Path) -> dict[str, tuple[str, str]]:
    """Every entry under a repo folder: ('link', target) | ('file', sha256 of bytes) | ('dir', '')."""
    out: dict[str, tuple[str, str]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", "")
        else:
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def weights_gets(hub: HubServer, origin: str | None = None) -> list:
    return [r for r in hub.requests(origin=origin, method="GET") if r.path.endswith(WEIGHTS)
            or r.path.startswith("/cdn/")]


# -- happy paths -------------------------------------------------------------------------------------


def test_resolve_branch_tag_and_pinned_commit(hub: HubServer, hub_models: HubModels) -> None:
    src = make_source(hub)
    main = src.resolve("org/tiny", "main", FileFilter())
    assert (main.commit, main.ref, main.level) == (hub_models.commit, "main", "verified")
    data = source_bytes(hub_models.src)
    assert {e.path for e in main.files} == set(data) and "original/params.json" in data
    for e in main.files:
        if e.path == WEIGHTS:
            assert (e.algo, e.digest) == ("sha256", hashlib.sha256(data[e.path]).hexdigest())
        else:
            assert (e.algo, e.digest) == ("git-sha1", git_blob_sha1(data[e.path]))
        assert e.size == len(data[e.path])
    tag = src.resolve("org/tiny", "v1.0", FileFilter())
    assert (tag.commit, tag.ref) == (hub_models.commit, "v1.0")
    dev = src.resolve("org/tiny", "dev", FileFilter())
    assert (dev.commit, dev.ref) == (hub_models.commit_dev, "dev")
    hub.clear()
    pinned = src.resolve("org/tiny", hub_models.commit_dev, FileFilter())
    assert (pinned.commit, pinned.ref) == (hub_models.commit_dev, None)
    assert not hub.requests(path="*/revision/*"), "a 40-hex commit needs no resolution"
    # the listing is paged (page_size=4): every page was followed
    assert len(hub.requests(path="*/tree/*")) >= 3
    assert any("cursor=" in r.query for r in hub.requests(path="*/tree/*"))
    src.close()


def test_fill_publishes_verified_snapshot_with_nested_paths(hub: HubServer, hub_models: HubModels,
                                                            store: Store) -> None:
    src = make_source(hub)
    m = fill(src, store, "org/tiny", "v1.0")
    assert m.level == "verified" and m.refs == ["v1.0"]
    assert store.check(m, full=True).ok
    assert snapshot_bytes(store, "org/tiny", m.commit) == source_bytes(hub_models.src)
    assert store.read_ref("org/tiny", "v1.0") == hub_models.commit
    # a second branch at another commit shares nothing but fills alongside
    m2 = fill(src, store, "org/tiny", "dev")
    assert snapshot_bytes(store, "org/tiny", m2.commit) == source_bytes(hub_models.src_dev)
    src.close()


def test_allow_and_ignore_globs(hub: HubServer, store: Store) -> None:
    src = make_source(hub)
    flt = FileFilter(allow=("*.json", "original/"), ignore=("tokenizer*",))
    m = fill(src, store, "org/tiny", "main", flt)
    assert sorted(f.path for f in m.files) == [
        "config.json", "generation_config.json", "original/params.json", "special_tokens_map.json"]
    assert not [r for r in hub.requests(method="GET") if r.path.endswith((WEIGHTS, "tokenizer.json"))]
    with pytest.raises(NotFoundError, match="no file matches"):
        src.resolve("org/tiny", "main", FileFilter(allow=("*.gguf",)))
    src.close()


@pytest.mark.parametrize("hf_transfer", [False, True], ids=["http", "hf_transfer"])
def test_layout_identical_to_snapshot_download(hub: HubServer, tmp_path: Path, hf_transfer: bool) -> None:
    """Same repo, same commit, same server: our tree == huggingface_hub's tree, entry for entry."""
    official = tmp_path / "official"
    for rev in ("main", "v1.0"):
        snapshot_download("org/tiny", revision=rev, cache_dir=official, endpoint=hub.url, token=False)
    store = Store(tmp_path / "ours")
    src = make_source(hub, token=None, hf_transfer=hf_transfer)
    for rev in ("main", "v1.0"):
        fill(src, store, "org/tiny", rev)
    ours_dir = store.layout.repo_dir("org/tiny")
    theirs, ours = tree_state(official / ours_dir.name), tree_state(ours_dir)
    assert ours == theirs
    assert any(k.startswith("trees/") for k in ours) and "refs/v1.0" in ours
    assert any(v[0] == "link" and "/" in k.split("/", 2)[2] for k, v in ours.items())  # nested symlink
    # and huggingface_hub reads our cache offline as its own
    offline = snapshot_download("org/tiny", revision="main", cache_dir=store.layout.hub, local_files_only=True)
    assert Path(offline) == store.layout.snapshot_dir("org/tiny", store.read_ref("org/tiny", "main") or "")
    info = scan_cache_dir(store.layout.hub)
    assert not info.warnings and [r.repo_id for r in info.repos] == ["org/tiny"]
    src.close()


# -- transient faults --------------------------------------------------------------------------------


def test_5xx_bursts_are_retried_on_metadata_and_bytes(hub: HubServer, store: Store) -> None:
    hub.add_fault("status", "*/revision/*", count=2, status=503)
    hub.add_fault("status", "*/resolve/*/config.json", count=2, status=502)
    src = make_source(hub)
    m = fill(src, store, "org/tiny")
    assert store.check(m, full=True).ok
    assert [r.status for r in hub.requests(path="*/revision/*")] == [503, 503, 200]
    assert [r.status for r in hub.requests(method="GET", path="*/config.json")] == [502, 502, 200]
    src.close()


def test_5xx_that_never_ends_is_a_transient_error(hub: HubServer) -> None:
    hub.add_fault("status", "*/revision/*", count=100, status=500)
    src = make_source(hub, retries=3)
    with pytest.raises(TransientSourceError) as ei:
        src.resolve("org/tiny", "main", FileFilter())
    assert not ei.value.permanent and isinstance(ei.value.__cause__, HfHubHTTPError)
    assert len(hub.requests(path="*/revision/*")) == 3
    src.close()


def test_connection_refused_is_retried_then_transient() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slept: list[float] = []
    policy = RetryPolicy(attempts=3, base=0.5, factor=2.0, cap=8.0, jitter=0.25)
    src = HubSource(SourceSettings(hf_endpoint=f"http://127.0.0.1:{port}", retry=policy),
                    wait=lambda s: slept.append(s) or False)
    with pytest.raises(TransientSourceError, match="ConnectError") as ei:
        src.resolve("org/tiny", "main", FileFilter())
    assert isinstance(ei.value.__cause__, httpx2.ConnectError)
    assert len(slept) == 2 and 0.375 <= slept[0] <= 0.625 and 0.75 <= slept[1] <= 1.25  # backoff + jitter
    src.close()


def test_429_retry_after_is_honoured(hub: HubServer, store: Store) -> None:
    hub.add_fault("status", "*/resolve/*/tokenizer.json", count=1, status=429, headers={"Retry-After": "1"})
    src = make_source(hub)  # its own backoff is 10 ms: only Retry-After explains a 1 s wait
    t0 = time.monotonic()
    m = fill(src, store, "org/tiny")
    assert time.monotonic() - t0 >= 1.0
    assert [r.status for r in hub.requests(method="GET", path="*/tokenizer.json")] == [429, 200]
    assert store.check(m, full=True).ok
    src.close()


def test_cut_connection_resumes_with_range(hub: HubServer, store: Store, hub_models: HubModels) -> None:
    hub.add_fault("cut", f"*/resolve/*/{WEIGHTS}", after=3 * MiB)
    src = make_source(hub)
    m = fill(src, store, "org/tiny")
    assert store.check(m, full=True).ok
    first, second = weights_gets(hub)
    assert first.fault == "cut" and first.range is None
    offset = second.body_start
    assert offset is not None and 0 < offset <= 3 * MiB
    assert second.range == f"bytes={offset}-" and second.status == 206
    assert second.bytes_sent == hub_models.src.joinpath(WEIGHTS).stat().st_size - offset  # nothing re-sent
    src.close()


def test_server_ignoring_range_restarts_the_file(hub: HubServer, store: Store) -> None:
    hub.add_fault("cut", f"*/resolve/*/{WEIGHTS}", after=3 * MiB)
    hub.add_fault("norange", f"*/resolve/*/{WEIGHTS}")
    src = make_source(hub)
    m = fill(src, store, "org/tiny")
    assert store.check(m, full=True).ok  # the 200 body was written from byte 0, not appended
    first, second = weights_gets(hub)
    assert (first.fault, second.fault, second.status) == ("cut", "norange", 200) and second.range
    src.close()


def test_cut_chunk_is_retried_by_hf_transfer(hub: HubServer, store: Store) -> None:
    hub.add_fault("cut", "/cdn/*", range_start=CHUNK, after=MiB)
    src = make_source(hub, hf_transfer=True)
    m = fill(src, store, "org/cdn")
    assert store.check(m, full=True).ok
    chunk1 = [r for r in hub.requests(origin="cdn") if r.body_start == CHUNK]
    assert [r.fault for r in chunk1] == ["cut", None]
    assert chunk1[1].range == chunk1[0].range  # the same chunk again, not a restart of the file
    assert not [r for r in hub.requests(origin="hub", method="GET") if r.path.endswith(WEIGHTS)]
    src.close()


@pytest.mark.timeout(20)
def test_stalled_body_times_out_and_resumes(hub: HubServer, store: Store) -> None:
    hub.add_fault("stall", f"*/resolve/*/{WEIGHTS}", after=2 * MiB, seconds=30)
    src = make_source(hub, timeout=2.0)
    t0 = time.monotonic()
    m = fill(src, store, "org/tiny")
    assert time.monotonic() - t0 < 12
    assert store.check(m, full=True).ok
    first, second = weights_gets(hub)[:2]
    assert first.fault == "stall" and second.range == f"bytes={second.body_start}-" and second.body_start
    src.close()


@pytest.mark.timeout(20)
def test_stalled_hf_transfer_is_killed_and_resumed_from_complete_chunks(hub: HubServer, store: Store) -> None:
    hub.add_fault("stall", "/cdn/*", range_start=CHUNK, after=MiB, seconds=30)
    src = make_source(hub, timeout=3.0, hf_transfer=True)
    t0 = time.monotonic()
    m = fill(src, store, "org/cdn")
    assert time.monotonic() - t0 < 15
    assert store.check(m, full=True).ok
    # chunk 0 survived the kill; the rest came with one open Range request from its end
    resumed = [r for r in hub.requests(origin="cdn") if r.range == f"bytes={CHUNK}-"]
    assert len(resumed) == 1 and resumed[0].body_start == CHUNK and resumed[0].status == 206
    assert not resumed[0].authorization
    src.close()


class Landed(NullProgress):
    def __init__(self) -> None:
        self.total = 0

    def advance(self, nbytes: int) -> None:
        self.total += nbytes


@pytest.mark.timeout(20)
def test_close_kills_a_stalled_transfer_and_keeps_the_staged_chunks(hub: HubServer, store: Store) -> None:
    """SIGTERM path: close() from another thread ends fetch at once; a restart resumes from chunk 1."""
    hub.add_fault("stall", "/cdn/*", range_start=CHUNK, after=MiB, seconds=30)
    src = make_source(hub, timeout=30, hf_transfer=True)
    plan = src.resolve("org/cdn", "main", FileFilter())
    errors: list[BaseException] = []
    landed = Landed()

    def run() -> None:
        with store.lock(plan.repo):
            f = store.begin(plan)
            try:
                src.fetch(plan, f.needed(), f, landed)
            except BaseException as e:
                errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    size = plan.entry(WEIGHTS).size
    assert wait_for(lambda: landed.total >= CHUNK + size - 2 * CHUNK, 10)  # chunks 0 and 2 are on disk
    t0 = time.monotonic()
    src.close()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(errors[0], TransientSourceError) and "closed" in str(errors[0])
    assert src._transfer.running == 0  # no hf_transfer child left behind
    hub.clear()
    again = make_source(hub, hf_transfer=True)
    m = fill(again, store, "org/cdn")
    assert store.check(m, full=True).ok
    assert [r.range for r in hub.requests(origin="cdn")] == [f"bytes={CHUNK}-"]
    again.close()


def test_corrupt_body_is_refetched_once_from_scratch(hub: HubServer, store: Store) -> None:
    hub.add_fault("corrupt", f"*/resolve/*/{WEIGHTS}")
    src = make_source(hub)
    m = fill(src, store, "org/tiny")
    assert store.check(m, full=True).ok
    gets = weights_gets(hub)
    assert [(r.fault, r.range) for r in gets] == [("corrupt", None), (None, None)]
    src.close()


@pytest.mark.parametrize("hf_transfer", [False, True], ids=["http-git-sha1", "hf_transfer-sha256"])
def test_corrupt_twice_fails_naming_the_file(hub: HubServer, store: Store, hf_transfer: bool) -> None:
    path = "/cdn/*" if hf_transfer else "*/resolve/*/config.json"
    hub.add_fault("corrupt", path, count=100)
    src = make_source(hub, hf_transfer=hf_transfer)
    plan = src.resolve("org/cdn", "main", FileFilter())
    with store.lock(plan.repo), pytest.raises(IntegrityError) as ei:
        f = store.begin(plan)
        src.fetch(plan, f.needed(), f, NullProgress())
    name = WEIGHTS if hf_transfer else "config.json"
    assert ei.value.path == name and name in str(ei.value)
    starts = ([r for r in hub.requests(origin="cdn") if r.range == "bytes=0-0"] if hf_transfer
              else hub.requests(method="GET", path="*/config.json"))
    assert len(starts) == 2  # the first download, and one retry from scratch
    assert store.manifest(plan.repo, plan.commit) is None
    src.close()


# -- permanent errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("repo", "rev", "route", "text"), [
    ("org/nope", "main", "*/revision/*", "repository not found"),
    ("org/tiny", "no-such-branch", "*/revision/*", "revision not found"),
])
def test_404_repo_and_revision_are_permanent(hub: HubServer, repo: str, rev: str, route: str, text: str) -> None:
    src = make_source(hub)
    with pytest.raises(NotFoundError, match=text) as ei:
        src.resolve(repo, rev, FileFilter())
    assert ei.value.permanent and isinstance(ei.value.__cause__, HfHubHTTPError)
    assert len(hub.requests(path=route)) == 1  # no retry
    src.close()


def test_404_entry_is_permanent(hub: HubServer, store: Store) -> None:
    hub.add_fault("status", "*/resolve/*/config.json", status=404, count=10,
                  headers={"X-Error-Code": "EntryNotFound"})
    src = make_source(hub)
    with pytest.raises(NotFoundError, match=r"config\.json.*file not found"):
        fill(src, store, "org/tiny")
    assert len(hub.requests(path="*/resolve/*/config.json")) == 1
    src.close()


def test_gated_repo_needs_the_token(hub: HubServer, store: Store) -> None:
    anon = make_source(hub, token=None)
    with pytest.raises(AuthError, match="no token is configured") as ei:
        anon.resolve("org/gated", "main", FileFilter())
    assert ei.value.permanent and "401" in str(ei.value)
    assert len(hub.requests(path="*/revision/*")) == 1
    wrong = make_source(hub, token="hf_wrong")
    with pytest.raises(AuthError, match="token was refused"):
        wrong.resolve("org/gated", "main", FileFilter())
    ok = make_source(hub)
    assert store.check(fill(ok, store, "org/gated"), full=True).ok
    for s in (anon, wrong, ok):
        s.close()


@pytest.mark.parametrize("hf_transfer", [False, True], ids=["http", "hf_transfer"])
def test_cdn_redirect_never_gets_the_token(hub: HubServer, store: Store, hf_transfer: bool) -> None:
    src = make_source(hub, hf_transfer=hf_transfer)
    m = fill(src, store, "org/cdn")
    assert store.check(m, full=True).ok
    cdn = hub.requests(origin="cdn")
    assert cdn and all(r.authorization is None for r in cdn)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests(origin="hub"))
    src.close()


# -- resume across restarts ----------------------------------------------------------------------------


def test_partial_file_from_a_previous_process_is_continued(hub: HubServer, store: Store,
                                                           hub_models: HubModels) -> None:
    data = hub_models.src.joinpath(WEIGHTS).read_bytes()
    offset = 5_000_001
    first = make_source(hub)
    plan = first.resolve("org/tiny", "main", FileFilter())
    with store.lock(plan.repo):
        store.begin(plan).part_path(plan.entry(WEIGHTS)).write_bytes(data[:offset])  # then "crash"
    first.close()
    hub.clear()
    second = make_source(hub)
    with store.lock(plan.repo):
        f = store.begin(plan)
        second.fetch(plan, f.needed(), f, NullProgress())
        m = f.publish()
    assert store.check(m, full=True).ok
    (only,) = weights_gets(hub)
    assert (only.range, only.body_start, only.bytes_sent) == (f"bytes={offset}-", offset, len(data) - offset)
    second.close()


def test_crashed_hf_transfer_scratch_is_salvaged(hub: HubServer, store: Store, hub_models: HubModels) -> None:
    """A killed hf_transfer leaves chunks at random offsets: keep the chunks before the first hole."""
    data = hub_models.src.joinpath(WEIGHTS).read_bytes()
    src = make_source(hub, hf_transfer=True)
    plan = src.resolve("org/cdn", "main", FileFilter())
    with store.lock(plan.repo):
        part = store.begin(plan).part_path(plan.entry(WEIGHTS))
        scratch = part.with_name(f"{part.name}.hft-{CHUNK}")
        with open(scratch, "wb") as fh:  # chunks 0 and 2 written, chunk 1 never arrived (a hole)
            fh.write(data[:CHUNK])
            fh.seek(2 * CHUNK)
            fh.write(data[2 * CHUNK:])
    hub.clear()
    with store.lock(plan.repo):
        f = store.begin(plan)
        src.fetch(plan, f.needed(), f, NullProgress())
        m = f.publish()
    assert store.check(m, full=True).ok
    gets = [r for r in hub.requests(method="GET") if r.path.endswith(WEIGHTS) or r.origin == "cdn"]
    assert [r.range for r in gets if r.origin == "cdn"] == [f"bytes={CHUNK}-"]
    src.close()


# -- secrets -----------------------------------------------------------------------------------------


def test_token_is_never_logged_or_put_in_errors(hub: HubServer, store: Store, caplog: pytest.LogCaptureFixture,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    secret = "hf_SeCrEt_never_print_me_42"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    errors: list[BaseException] = []
    with structlog.testing.capture_logs() as events:
        wrong = make_source(hub, token=secret)
        with pytest.raises(AuthError) as e1:
            wrong.resolve("org/gated", "main", FileFilter())
        errors.append(e1.value)
        hub.add_fault("status", "*/resolve/*", count=100, status=503, method="GET")
        flaky = make_source(hub, token=secret, retries=2, hf_transfer=True)
        plan = flaky.resolve("org/tiny", "main", FileFilter())
        with store.lock(plan.repo), pytest.raises(TransientSourceError) as e2:
            f = store.begin(plan)
            flaky.fetch(plan, f.needed(), f, NullProgress())
        errors.append(e2.value)
        wrong.close()
        flaky.close()
    assert any(r.authorization == f"Bearer {secret}" for r in hub.requests())  # it was really used
    assert len(events) > 0 and any(e["event"] == "retry" for e in events)
    text = "\n".join([caplog.text, repr(events), *capfd.readouterr()]
                     + ["".join(traceback.format_exception(e)) for e in errors])
    assert secret not in text
    assert "hub:" in make_source(hub, token=secret).label and secret not in make_source(hub, token=secret).label


def test_open_source_and_label(hub: HubServer) -> None:
    src = open_source(SourceRef("hub"), SourceSettings(hf_token=TOKEN))
    assert src.label == "hub" and src.kind == "hub"
    src.close()
    mirror = make_source(hub)
    assert mirror.label == f"hub:{hub.url}"
    mirror.close()


@pytest.mark.timeout(30)
def test_stalled_tree_listing_times_out_and_is_retried(hub: HubServer, store: Store) -> None:
    """huggingface_hub's shared client has no timeout; ours bounds list_repo_tree's page requests."""
    hub.add_fault("stall", "/api/models/*/tree/*", seconds=60)
    src = make_source(hub, timeout=2.0)
    t0 = time.monotonic()
    m = fill(src, store, "org/tiny")
    assert time.monotonic() - t0 < 15
    assert store.check(m, full=True).ok
    trees = [r for r in hub.requests(origin="hub", method="GET") if "/tree/" in r.path]
    assert trees[0].fault == "stall" and len(trees) >= 2
    src.close()
