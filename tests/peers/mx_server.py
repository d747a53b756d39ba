"""A ModelExpress-compatible gRPC server on loopback, with fault injection (tests, e2e, bench).

It serves models from a folder in the server's own flat Hub layout, as ``make_hub_model`` builds::

    <root>/models--org--name/{blobs,refs,snapshots/<commit>/...}

and behaves like NVIDIA's server where our client can tell: ``EnsureModelDownloaded`` streams
DOWNLOADING then DOWNLOADED with ``resolved_revision`` (failures as an ERROR status, not a gRPC
error); listings and streams skip dotfiles, README.md, images and files in subfolders; files
stream one at a time in an unsorted order; ``chunk_size`` 0 means 32 KiB; ``commit_hash`` rides on
the first chunk only; a zero-byte file is one empty chunk; NOT_FOUND for unknown model, revision
or path, INVALID_ARGUMENT for a bad name; grpc.health.v1 Check answers SERVING.

``faults`` (mutable while running) makes it misbehave on purpose; ``log`` records every call with
its status and bearer token so tests can count attempts. Use as::

    with MxServer(root) as server:        # or: with serve(root) as address:
        server.faults.unavailable["StreamModelFiles"] = 2
        ... ModelExpressSource(server.address, settings) ...

``python -m tests.peers.mx_server --root DIR [--port 8001]`` runs it as a process (bench, manual).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agent.cache.layout import repo_folder_name
from agent.core.spec import is_commit, validate_repo_id
from agent.errors import SpecError
from agent.sources._proto import health_pb2, health_pb2_grpc, model_pb2, model_pb2_grpc

DEFAULT_CHUNK = 32 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".svg", ".webp", ".ico", ".tiff")
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".h5", ".msgpack", ".ckpt.index", ".iop", ".gas")


@dataclass
class Faults:
    """Ways to misbehave; each names what a broken or hostile server might really do."""

    unavailable: dict[str, int] = field(default_factory=dict)  # method -> calls to fail with UNAVAILABLE
    download_error: str | None = None  # EnsureModelDownloaded ends with status ERROR and this message
    omit_revision: bool = False  # DOWNLOADED without resolved_revision (a pre-pinning server)
    resolve_to: str | None = None  # claim this commit in resolved_revision
    stream_commit: str | None = None  # first chunk names this commit instead of the real one
    change_commit_mid_stream: bool = False  # the second file's first chunk names another commit
    wrong_size: str | None = None  # stream this path with total_size one byte larger than listed
    list_size_delta: int = 0  # ListModelFiles reports every size off by this much
    rename: dict[str, str] = field(default_factory=dict)  # stream file A under name B (traversal names...)
    extra_file: str | None = None  # also stream a file nobody asked for, under this name
    duplicate_file: bool = False  # stream the first file twice
    truncate_after: int | None = None  # end the stream cleanly after this many bytes of data
    drop_after: int | None = None  # abort the stream with UNAVAILABLE after this many bytes
    skip_last_file_marker: bool = False  # never set is_last_file
    offset_gap: bool = False  # second chunk of a file skips ahead one byte
    stall_after: int | None = None  # stop sending (connection stays up) after this many bytes...
    stall_seconds: float = 0.0  # ...for this long
    chunk_delay: float = 0.0  # sleep between chunks (a slow but live server)
    token: str | None = None  # require "authorization: Bearer <token>"


@dataclass
class Call:
    method: str
    model: str
    code: str  # "OK" or a grpc.StatusCode name
    token: str | None
    request: dict[str, Any]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Model:
    """One repo in the server's folder, resolved and listed the way the real server filters it."""

    def __init__(self, root: Path, name: str) -> None:
        try:
            validate_repo_id(name, "model_name")
        except SpecError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        self.dir = root / repo_folder_name(name)
        if not self.dir.is_dir():
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"model {name} not found")
        self.name = name

    def resolve(self, revision: str | None) -> str:
        rev = revision or "main"
        if is_commit(rev) and (self.dir / "snapshots" / rev).is_dir():
            return rev
        ref = self.dir / "refs" / rev
        if ".." in rev or not ref.is_file():
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"revision {rev} of {self.name} not found")
        return ref.read_text().strip()

    def files(self, commit: str, ignore_weights: bool = False) -> dict[str, Path]:
        snap = self.dir / "snapshots" / commit
        out: dict[str, Path] = {}
        for name in os.listdir(snap):
            p = snap / name
            low = name.lower()
            if name.startswith(".") or name == "README.md" or low.endswith(IMAGE_SUFFIXES) or not p.is_file():
                continue
            if ignore_weights and name.endswith(WEIGHT_SUFFIXES):
                continue
            out[name] = p
        return out


class _Service(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: MxServer) -> None:
        self.s = server

    # bookkeeping shared by every method

    def _enter(self, method: str, model: str, context: grpc.ServicerContext, request: dict[str, Any]) -> Call:
        md = dict(context.invocation_metadata())
        auth = md.get("authorization")
        token = auth[len("Bearer "):] if isinstance(auth, str) and auth.startswith("Bearer ") else None
        call = Call(method, model, "OK", token, request)
        with self.s.lock:
            self.s.log.append(call)
            f = self.s.faults
            if f.token is not None and token != f.token:
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            if f.unavailable.get(method, 0) > 0:
                f.unavailable[method] -= 1
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "injected: server unavailable")
        return call

    @staticmethod
    def _fail(call: Call | None, context: grpc.ServicerContext, e: _Abort) -> None:
        if call is not None:
            call.code = e.code.name
        context.abort(e.code, e.details)

    def EnsureModelDownloaded(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = None
        rev = request.revision if request.HasField("revision") else None
        try:
            call = self._enter("EnsureModelDownloaded", request.model_name, context, {"revision": rev})
            f = self.s.faults
            model = _Model(self.s.root, request.model_name)
            yield model_pb2.ModelStatusUpdate(model_name=request.model_name, status=model_pb2.DOWNLOADING,
                                              message="checking cache")
            if f.download_error is not None:
                yield model_pb2.ModelStatusUpdate(model_name=request.model_name, status=model_pb2.ERROR,
                                                  message=f.download_error)
                return
            commit = f.resolve_to or model.resolve(rev)
            done = model_pb2.ModelStatusUpdate(model_name=request.model_name, status=model_pb2.DOWNLOADED,
                                               message="ready")
            if not f.omit_revision:
                done.resolved_revision = commit
            yield done
        except _Abort as e:
            self._fail(call, context, e)

    def ListModelFiles(self, request: Any, context: grpc.ServicerContext) -> Any:
        call = None
        rev = request.revision if request.HasField("revision") else None
        try:
            call = self._enter("ListModelFiles", request.model_name, context, {"revision": rev})
            model = _Model(self.s.root, request.model_name)
            files = model.files(model.resolve(rev), request.ignore_weights)
            delta = self.s.faults.list_size_delta
            infos = [model_pb2.ModelFileInfo(relative_path=n, size=p.stat().st_size + delta) for n, p in files.items()]
            return model_pb2.ModelFileList(model_name=request.model_name, files=infos,
                                           total_size=sum(i.size for i in infos))
        except _Abort as e:
            self._fail(call, context, e)
            raise AssertionError("unreachable") from e

    def StreamModelFiles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = None
        rev = request.revision if request.HasField("revision") else None
        try:
            paths = list(request.file_selector.paths)
            call = self._enter("StreamModelFiles", request.model_name, context,
                               {"revision": rev, "paths": paths, "chunk_size": request.chunk_size})
            model = _Model(self.s.root, request.model_name)
            commit = model.resolve(rev)
            files = model.files(commit, request.ignore_weights)
            for p in paths:
                if p not in files:
                    raise _Abort(grpc.StatusCode.NOT_FOUND, f"file {p!r} not found in {request.model_name}")
            chosen = list(paths) or list(files)
            random.Random(len(self.s.log)).shuffle(chosen)  # the real server's order is unsorted too
            yield from self._chunks(request, context, commit, [(n, files[n]) for n in chosen])
        except _Abort as e:
            self._fail(call, context, e)

    def _chunks(self, request: Any, context: grpc.ServicerContext, commit: str,
                files: list[tuple[str, Path]]) -> Iterator[Any]:
        f = self.s.faults
        size = request.chunk_size or DEFAULT_CHUNK
        plan: list[tuple[str, Path]] = list(files)
        if f.duplicate_file and plan:
            plan.insert(1, plan[0])
        if f.extra_file is not None and plan:
            plan.insert(1, (f.extra_file, plan[0][1]))
        sent = 0
        first = True
        for i, (name, path) in enumerate(plan):
            total = path.stat().st_size + (1 if name == f.wrong_size else 0)
            last_file = i == len(plan) - 1 and not f.skip_last_file_marker
            offset = 0
            with open(path, "rb") as fh:
                while True:
                    data = fh.read(size)
                    is_last = offset + len(data) >= path.stat().st_size
                    msg = model_pb2.FileChunk(
                        relative_path=f.rename.get(name, name), data=data, offset=offset, total_size=total,
                        is_last_chunk=is_last, is_last_file=last_file and is_last,
                    )
                    if first:
                        msg.commit_hash = f.stream_commit or commit
                        first = False
                    elif f.change_commit_mid_stream and i == 1 and offset == 0:
                        msg.commit_hash = "f" * 40
                    if f.offset_gap and offset > 0:
                        msg.offset = offset + 1
                    if f.truncate_after is not None and sent >= f.truncate_after:
                        return
                    if f.drop_after is not None and sent >= f.drop_after:
                        raise _Abort(grpc.StatusCode.UNAVAILABLE, "injected: connection dropped")
                    if f.stall_after is not None and sent >= f.stall_after:
                        f.stall_after = None  # one stall per arming: a retry finds a healthy server
                        deadline = time.monotonic() + f.stall_seconds
                        while context.is_active() and time.monotonic() < deadline:
                            time.sleep(0.02)
                    if f.chunk_delay:
                        time.sleep(f.chunk_delay)
                    yield msg
                    sent += len(data)
                    offset += len(data)
                    if is_last:
                        break

    def DeleteModel(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("DeleteModel", request.model_name, context, {})
        return model_pb2.DeleteModelResponse(success=False, message="read-only test server")


class _Health(health_pb2_grpc.HealthServicer):
    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class MxServer:
    """The test server; ``start``/``stop`` or a ``with`` block. ``address`` is 'host:port'."""

    def __init__(self, root: Path | str, *, host: str = "127.0.0.1", port: int = 0, workers: int = 8,
                 faults: Faults | None = None, tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls`` is (private key PEM, certificate PEM): serve TLS only, as behind an https:// address."""
        self.root = Path(root)
        self.faults = faults or Faults()
        self.log: list[Call] = []
        self.lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mx-server"),
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        model_pb2_grpc.add_ModelServiceServicer_to_server(_Service(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(_Health(), self._server)
        if tls is None:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        else:
            creds = grpc.ssl_server_credentials([tls])
            self.port = self._server.add_secure_port(f"{host}:{port}", creds)
        self.address = f"{host}:{self.port}"

    def calls(self, method: str | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.log if method is None or c.method == method]

    def start(self) -> MxServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = 0.2) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> MxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve(root: Path | str, **kwargs: Any) -> Iterator[str]:
    """Start a server for ``root`` and yield its address ('127.0.0.1:PORT')."""
    with MxServer(root, **kwargs) as server:
        yield server.address


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder holding models--org--name/ trees")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--token", default=None, help="require this bearer token")
    args = ap.parse_args()
    server = MxServer(args.root, host=args.host, port=args.port, faults=Faults(token=args.token)).start()
    print(f"listening {server.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0)


if __name__ == "__main__":
    main()
