"""ModelExpressSource against the loopback ModelExpress test server: fills, faults, retries, auth.

Every fault is injected by the real server (tests/peers/mx_server.py) over real gRPC; nothing is
monkeypatched. Timeouts and backoffs come from SourceSettings, kept tiny so the file runs fast.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest

from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core.plan import ModelPlan
from agent.core.retry import RetryPolicy
from agent.core.spec import FileFilter
from agent.errors import (
    AuthError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    SourceError,
    TransientSourceError,
)
from agent.modelgen import MiB, file_digests, make_hub_model
from agent.sources.base import NullProgress, SourceRef, SourceSettings
from agent.sources.modelexpress import ModelExpressSource, open_source, parse_address
from tests.peers.mx_server import Faults, MxServer

REPO = "org/mx-model"
SERVED = {  # what the server's filter keeps: no README.md, nothing in original/
    "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json",
}


@dataclasses.dataclass
class World:
    tmp: Path
    server: MxServer
    commit: str
    snap: Path  # the server's snapshot folder (ground truth bytes)
    store: Store
    sleeps: list[float]
    token_file: Path

    def settings(self, *, retries: int = 3, **kw: object) -> SourceSettings:
        base: dict[str, object] = {"timeout": 2.0, "mx_token_file": str(self.token_file),
                                   "retry": RetryPolicy(attempts=retries, base=0.01, factor=2.0, cap=0.02, jitter=0.2)}
        base.update(kw)
        return SourceSettings(**base)  # type: ignore[arg-type]

    def waited(self, seconds: float) -> bool:
        """The source's wait between retries: record the delay, never sleep, never stop."""
        self.sleeps.append(seconds)
        return False

    def source(self, **kw: object) -> ModelExpressSource:
        chunk = int(kw.pop("chunk_size", 256 * 1024))  # type: ignore[call-overload]
        return ModelExpressSource(self.server.address, self.settings(**kw), chunk_size=chunk, wait=self.waited)

    def fill(self, src: ModelExpressSource, plan: ModelPlan) -> Manifest:
        with self.store.lock(plan.repo):
            f = self.store.begin(plan)
            src.fetch(plan, f.needed(), f, NullProgress())
            return f.publish()

    def outside_staging(self) -> list[str]:
        """Every file the store root holds outside .agent/staging and .agent/locks."""
        root = self.store.layout.root
        out = []
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if (p.is_file() or p.is_symlink()) and not rel.startswith((".agent/staging/", ".agent/locks/")):
                out.append(rel)
        return out

    def staged_parts(self) -> list[Path]:
        return list(self.store.layout.staging_root.rglob("*.part"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "mx"
    commit = make_hub_model(root, REPO, weight_bytes=2 * MiB, shards=2)
    (tmp_path / "empty-model").mkdir()
    with MxServer(root) as server:
        yield World(tmp_path, server, commit, root / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit,
                    Store(tmp_path / "cache", fsync=False), [], tmp_path / "token")


# -- happy path ------------------------------------------------------------------------------------


def test_fill_is_a_valid_hub_cache_at_level_computed(world: World) -> None:
    src = world.source()
    plan = src.resolve(REPO, "main", FileFilter())
    assert plan.commit == world.commit and plan.ref == "main" and plan.source == f"modelexpress:{world.server.address}"
    assert {f.path for f in plan.files} == SERVED
    assert all(f.digest is None for f in plan.files) and plan.level == "computed"
    assert plan.entry("model-00001-of-00002.safetensors").algo == "sha256"
    assert plan.entry("config.json").algo == "git-sha1"

    m = world.fill(src, plan)
    assert m.level == "computed"
    assert world.store.check(m, full=True).ok
    info = huggingface_hub.scan_cache_dir(world.tmp / "cache" / "hub")
    assert info.warnings == []
    [repo] = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {world.commit}
    snap = Path(huggingface_hub.snapshot_download(REPO, cache_dir=world.tmp / "cache" / "hub", local_files_only=True))
    for name in SERVED:
        assert (snap / name).read_bytes() == (world.snap / name).read_bytes(), name
    truth = file_digests(world.snap)
    assert {f.path: f.digest for f in m.files} == {p: truth[p][1] for p in SERVED}  # blob names are Hub etags

    calls = [(c.method, c.request.get("revision")) for c in world.server.calls()]
    assert calls == [("EnsureModelDownloaded", "main"), ("ListModelFiles", world.commit),
                     ("StreamModelFiles", world.commit)]  # resolved once, then pinned
    stream = world.server.calls("StreamModelFiles")[0].request
    assert sorted(stream["paths"]) == sorted(SERVED) and stream["chunk_size"] == 256 * 1024
    src.close()


def test_trusted_digests_from_the_plan_make_it_verified(world: World) -> None:
    src = world.source()
    plan = src.resolve(REPO, world.commit, FileFilter())
    assert plan.ref is None
    truth = file_digests(world.snap)
    trusted = dataclasses.replace(plan, files=tuple(f.with_digest(truth[f.path][1]) for f in plan.files))
    m = world.fill(src, trusted)
    assert m.level == "verified" and all(f.verified for f in m.files)
    assert world.store.check(m, full=True).ok


def test_digest_mismatch_names_the_file_and_publishes_nothing(world: World) -> None:
    src = world.source()
    plan = src.resolve(REPO, "main", FileFilter())
    truth = file_digests(world.snap)
    bad = "model-00002-of-00002.safetensors"
    files = tuple(f.with_digest("0" * 64 if f.path == bad else truth[f.path][1]) for f in plan.files)
    with pytest.raises(IntegrityError, match=bad) as ei:
        world.fill(src, dataclasses.replace(plan, files=files))
    assert ei.value.path == bad
    assert world.outside_staging() == [] and world.staged_parts() == []


def test_filter_and_missing_matches(world: World) -> None:
    src = world.source()
    plan = src.resolve(REPO, "main", FileFilter(allow=("*.json",), ignore=("generation*",)))
    assert {f.path for f in plan.files} == {p for p in SERVED if p.endswith(".json") and not p.startswith("gen")}
    m = world.fill(src, plan)
    assert world.store.check(m, full=True).ok and len(m.files) == len(plan.files)
    with pytest.raises(NotFoundError, match="subfolders"):
        src.resolve(REPO, "main", FileFilter(allow=("original/*",)))


def test_refill_only_streams_missing_files(world: World) -> None:
    src = world.source()
    plan = src.resolve(REPO, "main", FileFilter())
    m = world.fill(src, plan)
    blob = world.store.layout.blob_path(REPO, m.by_path()["tokenizer.json"].digest)
    blob.unlink()
    world.fill(src, plan)
    assert world.server.calls("StreamModelFiles")[-1].request["paths"] == ["tokenizer.json"]
    assert world.store.check(world.store.manifest(REPO, plan.commit), full=True).ok  # type: ignore[arg-type]


def test_health(world: World, tmp_path: Path) -> None:
    assert world.source().health()
    assert not ModelExpressSource(_dead_address(), world.settings()).health(timeout=0.5)


# -- protocol faults: each must abort with nothing outside staging ------------------------------


@pytest.mark.parametrize(
    ("faults", "match"),
    [
        (Faults(wrong_size="model-00001-of-00002.safetensors"), "listing said"),
        (Faults(list_size_delta=1), "listing said"),
        (Faults(stream_commit="c" * 40), "was resolved"),
        (Faults(change_commit_mid_stream=True), "commit changed mid-stream"),
        (Faults(extra_file="evil.json"), "not requested"),
        (Faults(duplicate_file=True), "sent twice"),
        (Faults(truncate_after=1 * MiB), "stream ended inside"),
        (Faults(skip_last_file_marker=True), "without the final-file marker"),
        (Faults(offset_gap=True), "expected"),
        (Faults(rename={"config.json": "../../../../escape.json"}), "unsafe path"),
        (Faults(rename={"config.json": "/tmp/mx-escape.json"}), "unsafe path"),
        (Faults(rename={"config.json": "sub\\..\\..\\escape.json"}), "unsafe path"),
    ],
    ids=["wrong-size", "listing-size", "wrong-commit", "commit-changes", "unrequested", "duplicate",
         "truncated", "no-final-marker", "offset-gap", "traversal", "absolute", "backslash"],
)
def test_protocol_violations_abort_cleanly(world: World, faults: Faults, match: str) -> None:
    src = world.source(chunk_size=128 * 1024)
    world.server.faults = faults
    plan = src.resolve(REPO, "main", FileFilter())
    with pytest.raises(ProtocolError, match=match):
        world.fill(src, plan)
    assert world.outside_staging() == []
    assert world.staged_parts() == []
    assert not list(world.tmp.rglob("escape.json")) and not Path("/tmp/mx-escape.json").exists()
    assert len(world.server.calls("StreamModelFiles")) == 1  # permanent: not retried


def test_server_resolving_another_commit_than_asked_is_refused(world: World) -> None:
    world.server.faults.resolve_to = "d" * 40
    with pytest.raises(ProtocolError, match="server resolved"):
        world.source().resolve(REPO, world.commit, FileFilter())


def test_server_naming_no_commit_is_refused(world: World) -> None:
    world.server.faults.omit_revision = True
    with pytest.raises(ProtocolError, match="named no commit"):
        world.source().resolve(REPO, "main", FileFilter())


def test_download_error_status_is_a_source_error(world: World) -> None:
    world.server.faults.download_error = "hub returned 503"
    with pytest.raises(SourceError, match="hub returned 503") as ei:
        world.source().resolve(REPO, "main", FileFilter())
    assert ei.value.reason == "server_error" and not ei.value.permanent
    assert len(world.server.calls("EnsureModelDownloaded")) == 3  # retried up to the policy's attempts
    world.server.faults.download_error = "repository not found"
    with pytest.raises(NotFoundError):
        world.source().resolve(REPO, "main", FileFilter())


# -- classified errors and retries ---------------------------------------------------------------


def test_not_found_and_invalid_argument_are_permanent(world: World) -> None:
    src = world.source()
    with pytest.raises(NotFoundError, match="NOT_FOUND"):
        src.resolve("org/absent", "main", FileFilter())
    with pytest.raises(NotFoundError, match="revision"):
        src.resolve(REPO, "no-such-branch", FileFilter())
    with pytest.raises(SourceError, match="INVALID_ARGUMENT") as ei:
        src.resolve("bad--org/x", "main", FileFilter())
    assert ei.value.permanent
    assert len(world.server.calls("EnsureModelDownloaded")) == 3  # one each, no retries
    assert world.sleeps == []


def test_unavailable_is_retried_then_succeeds(world: World) -> None:
    world.server.faults.unavailable = {"EnsureModelDownloaded": 2, "ListModelFiles": 1, "StreamModelFiles": 2}
    src = world.source(retries=3)
    plan = src.resolve(REPO, "main", FileFilter())
    m = world.fill(src, plan)
    assert world.store.check(m, full=True).ok
    counts = {k: len(world.server.calls(k)) for k in ("EnsureModelDownloaded", "ListModelFiles", "StreamModelFiles")}
    assert counts == {"EnsureModelDownloaded": 3, "ListModelFiles": 2, "StreamModelFiles": 3}
    assert len(world.sleeps) == 5 and all(0.008 <= s <= 0.024 for s in world.sleeps)


def test_unavailable_gives_up_after_the_configured_attempts(world: World) -> None:
    world.server.faults.unavailable = {"EnsureModelDownloaded": 10}
    with pytest.raises(TransientSourceError, match="UNAVAILABLE") as ei:
        world.source(retries=3).resolve(REPO, "main", FileFilter())
    assert not ei.value.permanent
    assert len(world.server.calls("EnsureModelDownloaded")) == 3 and len(world.sleeps) == 2


def test_server_side_download_error_is_retried(world: World) -> None:
    """EnsureModelDownloaded ending in ERROR (not 'not found') is a non-permanent SourceError: retried."""
    world.server.faults.download_error = "upstream hub timed out"
    src = world.source(retries=3)

    def recover(delay: float) -> bool:
        world.sleeps.append(delay)
        world.server.faults.download_error = None  # the server's next download attempt works
        return False

    src._wait = recover
    assert src.resolve(REPO, "main", FileFilter()).commit == world.commit
    assert len(world.server.calls("EnsureModelDownloaded")) == 2 and len(world.sleeps) == 1


def test_server_down_is_transient(world: World) -> None:
    src = ModelExpressSource(_dead_address(), world.settings(retries=2), wait=world.waited)
    t0 = time.monotonic()
    with pytest.raises(TransientSourceError, match="UNAVAILABLE"):
        src.resolve(REPO, "main", FileFilter())
    assert time.monotonic() - t0 < 10 and len(world.sleeps) == 1


def test_dropped_stream_resumes_with_only_the_missing_files(world: World) -> None:
    src = world.source(chunk_size=64 * 1024)
    plan = src.resolve(REPO, "main", FileFilter())
    assert plan.total_bytes > 1.5 * MiB and max(f.size for f in plan.files) < 1.5 * MiB
    world.server.faults.drop_after = int(1.5 * MiB)  # at least one file done, at least one not

    def drop_once(delay: float) -> bool:
        world.sleeps.append(delay)
        world.server.faults.drop_after = None
        return False

    src._wait = drop_once
    m = world.fill(src, plan)
    assert world.store.check(m, full=True).ok
    streams = world.server.calls("StreamModelFiles")
    assert len(streams) == 2 and streams[0].code == "UNAVAILABLE"
    assert 0 < len(streams[1].request["paths"]) < len(SERVED)  # finished files were kept
    assert world.staged_parts() == []


def test_stalled_server_is_detected_by_the_idle_timeout(world: World) -> None:
    src = world.source(timeout=0.4, retries=1)
    plan = src.resolve(REPO, "main", FileFilter())
    world.server.faults.stall_after = 1 * MiB
    world.server.faults.stall_seconds = 30.0
    t0 = time.monotonic()
    with pytest.raises(TransientSourceError, match=r"no data for 0\.4s"):
        world.fill(src, plan)
    assert time.monotonic() - t0 < 5
    assert world.outside_staging() == [] or all("blobs/" in p for p in world.outside_staging())
    assert world.staged_parts() == []


def test_stall_then_recovery_on_retry(world: World) -> None:
    src = world.source(timeout=0.4, retries=2)
    plan = src.resolve(REPO, "main", FileFilter())
    world.server.faults.stall_after = 1 * MiB
    world.server.faults.stall_seconds = 30.0
    m = world.fill(src, plan)  # the server clears the stall once the first attempt is cancelled
    assert world.store.check(m, full=True).ok and len(world.server.calls("StreamModelFiles")) == 2


def test_slow_but_live_stream_is_not_dead(world: World) -> None:
    src = world.source(timeout=0.5, chunk_size=1 * MiB)
    plan = src.resolve(REPO, "main", FileFilter())
    world.server.faults.chunk_delay = 0.1  # every message arrives well inside the idle timeout
    m = world.fill(src, plan)
    assert world.store.check(m, full=True).ok and len(world.server.calls("StreamModelFiles")) == 1


# -- auth --------------------------------------------------------------------------------------------


def test_bearer_token_from_file_and_rotation(world: World) -> None:
    world.server.faults.token = "tok-1"
    src = world.source()
    with pytest.raises(AuthError, match="UNAUTHENTICATED"):  # no file yet: no header
        src.resolve(REPO, "main", FileFilter())
    assert world.server.calls()[-1].token is None
    world.token_file.write_text("tok-1\n")
    plan = src.resolve(REPO, "main", FileFilter())
    assert world.server.calls()[-1].token == "tok-1"

    world.token_file.write_text("tok-2-rotated\n")  # kubelet rewrites the projected token
    st = world.token_file.stat()
    os.utime(world.token_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    world.server.faults.token = "tok-2-rotated"
    m = world.fill(src, plan)
    assert world.store.check(m).ok
    assert world.server.calls("StreamModelFiles")[-1].token == "tok-2-rotated"
    world.server.faults.token = "tok-3"
    with pytest.raises(AuthError):
        src.resolve(REPO, "main", FileFilter())
    assert len(world.server.calls("EnsureModelDownloaded")) == 3  # auth failures are not retried


def test_https_address_uses_tls(world: World, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, check=False,
    ) if shutil.which("openssl") else None
    if made is None or made.returncode != 0:
        pytest.skip("openssl cannot make a test certificate here")
    with MxServer(world.server.root, tls=(key.read_bytes(), cert.read_bytes())) as tls_server:
        port = tls_server.port
        src = ModelExpressSource(f"https://127.0.0.1:{port}", world.settings(), root_certificates=cert.read_bytes())
        assert src.tls and src.label == f"modelexpress:127.0.0.1:{port}"
        plan = src.resolve(REPO, "main", FileFilter())
        assert world.store.check(world.fill(src, plan), full=True).ok
        plaintext = ModelExpressSource(f"http://127.0.0.1:{port}", world.settings(retries=1))
        with pytest.raises(TransientSourceError):  # a TLS-only server does not speak plaintext
            plaintext.resolve(REPO, "main", FileFilter())


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("model-express.svc:8001", ("model-express.svc:8001", False)),
        ("model-express.svc", ("model-express.svc:8001", False)),
        ("http://mx:9000", ("mx:9000", False)),
        ("http://mx:9000/", ("mx:9000", False)),
        ("https://mx.example", ("mx.example:8001", True)),
        ("https://mx:443", ("mx:443", True)),
        ("[::1]:8001", ("[::1]:8001", False)),
        ("[::1]", ("[::1]:8001", False)),
    ],
)
def test_parse_address(value: str, expected: tuple[str, bool]) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize("value", ["", "http://", "mx:0", "mx:99999", "mx:port", "::1", "mx:80/path", "u@mx:1"])
def test_parse_address_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(value)


def test_open_source_address_precedence() -> None:
    settings = SourceSettings(mx_address="http://from-env:7000", mx_token_file=None)
    assert open_source(SourceRef("modelexpress", "flag:8001"), settings).label == "modelexpress:flag:8001"
    assert open_source(SourceRef("modelexpress"), settings).label == "modelexpress:from-env:7000"
    with pytest.raises(ConfigError, match="MX_SERVER_ADDRESS"):
        open_source(SourceRef("modelexpress"), SourceSettings(mx_address=None))


def _dead_address() -> str:
    """A loopback port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
