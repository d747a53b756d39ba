"""Proof that we speak NVIDIA's ModelExpress protocol, not just a protocol of our own.

1. Always: our compiled ``model.proto`` descriptor equals NVIDIA's (a text fixture taken from the
   modelexpress 0.7.0 wheel), so every message, field number, type and enum value matches.
2. When the wheel is at hand (``MX_WHEEL_DIR`` holding ``pip download --no-deps modelexpress==0.7.0``,
   or the install behind ``MX_CLIENT_PYTHON``): the serialized descriptors are byte-identical, and
   the fixture still equals the wheel.
3. When ``MX_CLIENT_PYTHON`` names an interpreter with ``modelexpress`` installed: NVIDIA's own
   ``ModelCacheClient`` installs a model from our test server, with and without a bearer token,
   and writes the same bytes our source verifies.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.modelgen import MiB, make_hub_model
from agent.sources._proto import model_pb2
from agent.sources.base import NullProgress, SourceSettings
from agent.sources.modelexpress import ModelExpressSource
from tests.peers.mx_server import MxServer

MX_VERSION = "0.7.0"
HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "modelexpress" / f"model-{MX_VERSION}.textproto"
DRIVER = HERE / "peers" / "mx_nvidia_client.py"
REPO = "org/nv-interop"


def _serialized_from_pb2(source: str) -> bytes:
    """The FileDescriptorProto bytes a generated *_pb2.py registers (read as text, never imported)."""
    m = re.search(r"AddSerializedFile\((b'.*?')\)", source, re.S)
    assert m, "no AddSerializedFile call in model_pb2.py"
    data = ast.literal_eval(m.group(1))
    assert isinstance(data, bytes)
    return data


def _nvidia_model_pb2() -> tuple[str, bytes] | None:
    """(where it came from, serialized descriptor) from a downloaded wheel or the client venv."""
    wheel_dir = os.environ.get("MX_WHEEL_DIR")
    if wheel_dir:
        for whl in sorted(Path(wheel_dir).glob(f"modelexpress-{MX_VERSION}-*.whl")):
            with zipfile.ZipFile(whl) as z:
                return str(whl), _serialized_from_pb2(z.read("modelexpress/model_pb2.py").decode())
    py = _client_python()
    if py:
        # find_spec locates the package without running its __init__ (which imports torch).
        code = ("import importlib.util, importlib.metadata as m; s = importlib.util.find_spec('modelexpress'); "
                "print(m.version('modelexpress')); print(s.submodule_search_locations[0])")
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            version, pkg = out.stdout.split()
            if version == MX_VERSION:
                path = Path(pkg) / "model_pb2.py"
                return str(path), _serialized_from_pb2(path.read_text())
    return None


def _client_python() -> str | None:
    py = os.environ.get("MX_CLIENT_PYTHON")
    return py if py and os.access(py, os.X_OK) else None


def _ours() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(model_pb2.DESCRIPTOR.serialized_pb)


def _fixture() -> descriptor_pb2.FileDescriptorProto:
    return text_format.Parse(FIXTURE.read_text(), descriptor_pb2.FileDescriptorProto())


# -- 1 and 2: descriptors ---------------------------------------------------------------------------


def test_our_descriptor_equals_nvidia_fixture() -> None:
    ours, theirs = _ours(), _fixture()
    assert ours.package == theirs.package == "model_express.model"
    assert [s.name for s in ours.service] == ["ModelService"]
    assert {m.name for m in ours.service[0].method} == {
        "EnsureModelDownloaded", "StreamModelFiles", "ListModelFiles", "DeleteModel"}
    chunk = {f.name: (f.number, f.type) for m in ours.message_type if m.name == "FileChunk" for f in m.field}
    assert chunk["commit_hash"] == (7, descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    assert ours == theirs, text_format.MessageToString(ours)


def test_our_descriptor_is_byte_identical_to_the_nvidia_wheel() -> None:
    found = _nvidia_model_pb2()
    if found is None:
        pytest.skip(f"no modelexpress {MX_VERSION} wheel: set MX_WHEEL_DIR (pip download --no-deps "
                    f"modelexpress=={MX_VERSION} -d DIR) or MX_CLIENT_PYTHON")
    where, theirs = found
    # Byte-identical also means both stub sets can be imported into one process without a clash.
    assert model_pb2.DESCRIPTOR.serialized_pb == theirs, where
    assert descriptor_pb2.FileDescriptorProto.FromString(theirs) == _fixture(), f"{FIXTURE} drifted from {where}"


# -- 3: NVIDIA's client against our server ------------------------------------------------------


@pytest.fixture(scope="module")
def nvidia_python() -> str:
    py = _client_python()
    if py is None:
        pytest.skip("MX_CLIENT_PYTHON is not set to an interpreter with modelexpress installed "
                    "(see the module docstring of tests/peers/mx_nvidia_client.py)")
    probe = subprocess.run([py, "-c", "import modelexpress.model_client"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"MX_CLIENT_PYTHON={py} cannot import modelexpress.model_client: {probe.stderr[-300:]}")
    return py


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[MxServer, str, Path]]:
    root = tmp_path / "mx"
    commit = make_hub_model(root, REPO, weight_bytes=3 * MiB, shards=3)
    with MxServer(root) as server:
        yield server, commit, root / "models--org--nv-interop" / "snapshots" / commit


def _run_nvidia(py: str, address: str, cache: Path, token_path: Path, revision: str = "main") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MX_", "MODEL_EXPRESS_"))}
    env.update(MX_AUTH_TOKEN_PATH=str(token_path), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([py, str(DRIVER), address, REPO, str(cache), revision], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_nvidia_client_installs_from_our_server(nvidia_python: str, served: tuple[MxServer, str, Path],
                                               tmp_path: Path) -> None:
    server, commit, snap = served
    result = _run_nvidia(nvidia_python, server.address, tmp_path / "nv", tmp_path / "no-token")
    installed = Path(str(result["snapshot"]))
    assert installed.name == commit
    assert (tmp_path / "nv" / "models--org--nv-interop" / "refs" / "main").read_text().strip() == commit
    names = sorted(p.name for p in installed.iterdir())
    served_names = sorted(n for n in os.listdir(snap) if n != "README.md" and (snap / n).is_file())
    assert names == served_names and "model-00003-of-00003.safetensors" in names
    for n in names:
        assert (installed / n).read_bytes() == (snap / n).read_bytes(), n
    # NVIDIA's two phases: metadata (ignore_weights), then weights pinned to the snapshot's commit.
    streams = server.calls("StreamModelFiles")
    assert len(streams) == 2 and all(c.request["revision"] == commit for c in streams)

    # Our source fills the same files from the same server; the blobs hold the very same bytes.
    store = Store(tmp_path / "cache", fsync=False)
    src = ModelExpressSource(server.address, SourceSettings(mx_token_file=None))
    plan = src.resolve(REPO, "main", FileFilter())
    with store.lock(REPO):
        fill = store.begin(plan)
        src.fetch(plan, fill.needed(), fill, NullProgress())
        m = fill.publish()
    assert store.check(m, full=True).ok and sorted(f.path for f in m.files) == names
    for f in m.files:
        assert store.layout.blob_path(REPO, f.digest).read_bytes() == (installed / f.path).read_bytes()


def test_nvidia_client_sends_our_servers_required_token(nvidia_python: str, served: tuple[MxServer, str, Path],
                                                        tmp_path: Path) -> None:
    server, commit, _ = served
    token = tmp_path / "token"
    token.write_text("sa-token-xyz\n")
    server.faults.token = "sa-token-xyz"
    result = _run_nvidia(nvidia_python, server.address, tmp_path / "nv", token, revision=commit)
    assert Path(str(result["snapshot"])).name == commit
    assert {c.token for c in server.calls()} == {"sa-token-xyz"}
    assert all(c.code == "OK" for c in server.calls())


def _write_fixture(wheel: Path, dest: Path = FIXTURE) -> None:
    with zipfile.ZipFile(wheel) as z:
        data = _serialized_from_pb2(z.read("modelexpress/model_pb2.py").decode())
    header = "".join(line + "\n" for line in FIXTURE.read_text().splitlines() if line.startswith("#"))
    fd = descriptor_pb2.FileDescriptorProto.FromString(data)
    dest.write_text(header + text_format.MessageToString(fd))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-fixture":
        _write_fixture(Path(sys.argv[2]))
    else:
        sys.exit("usage: python tests/test_mx_nvidia_client.py --write-fixture modelexpress-0.7.0-*.whl")
