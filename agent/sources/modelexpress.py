"""ModelExpress source: one verified copy per node from an NVIDIA ModelExpress server, over gRPC.

The server downloads a model once and serves its files (``model_express.model.ModelService``).
It sends sizes but no content hash, so this adapter:

1. resolves once: ``EnsureModelDownloaded(revision)`` names the commit (``resolved_revision``);
2. lists that commit with ``ListModelFiles(revision=commit)`` and plans sizes with digests unknown
   (level ``computed``, unless the orchestrator later adds digests from a more trusted source);
3. streams the needed files with one ``StreamModelFiles(revision=commit)``, checking every chunk
   with ``mx_stream.StreamValidator`` before writing it and hashing in the same pass.

A server-supplied path never names a file we open: bytes go to staging part files named by a hash
of the (validated) path, and the store builds the snapshot tree itself, so no symlink is followed.
Files finished in a stream become blobs only when the stream ends well, or when it breaks for a
transient reason (their bytes were whole and checked); a protocol violation discards them, so a
misbehaving server leaves nothing outside staging. Transient failures (UNAVAILABLE, a stall seen
by the idle guard, a dropped connection) are retried with backoff for the files still missing.
This is the only module that imports ``grpc``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import structlog

from agent.cache.hashing import Digests, DigestWriter
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan, file_folder_conflict, guess_algo
from agent.core.spec import FileFilter, is_commit
from agent.errors import (
    AuthError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    SourceError,
    TransientSourceError,
    UnsafePathError,
)
from agent.log import redact_text
from agent.sources._proto import health_pb2, health_pb2_grpc, model_pb2, model_pb2_grpc
from agent.sources.base import Progress, SourceRef, SourceSettings, retry_source_call
from agent.sources.mx_stream import StreamValidator, check_commit, check_listing

DEFAULT_PORT = 8001
MiB = 1024 * 1024
log = structlog.get_logger(__name__)
T = TypeVar("T")

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
}


def parse_address(value: str) -> tuple[str, bool]:
    """'host[:port]', 'http://host[:port]' or 'https://host[:port]' -> ('host:port', tls)."""
    raw = value.strip()
    tls = False
    if raw.startswith("https://"):
        raw, tls = raw[len("https://"):], True
    elif raw.startswith("http://"):
        raw = raw[len("http://"):]
    raw = raw.rstrip("/")
    if not raw or "/" in raw or "@" in raw or any(c.isspace() for c in raw):
        raise ConfigError(f"ModelExpress address {value!r}: expected host:port or http(s)://host:port")
    if raw.startswith("["):  # [v6]:port
        host, _, rest = raw.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"ModelExpress address {value!r}: bad IPv6 form")
    elif raw.count(":") > 1:
        raise ConfigError(f"ModelExpress address {value!r}: write IPv6 addresses as [addr]:port")
    else:
        host, _, port = raw.partition(":")
    if not host or host == "[]":
        raise ConfigError(f"ModelExpress address {value!r}: missing host")
    if port == "":
        port = str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"ModelExpress address {value!r}: bad port {port!r}")
    return f"{host}:{int(port)}", tls


class TokenFile:
    """A projected ServiceAccount token, re-read whenever the file changes (kubelet rotates it).

    A stat per RPC is cheap next to the RPC; a missing or empty file means "no auth" so the same
    agent config works against servers with auth off.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._mu = threading.Lock()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.get()
        return (("authorization", f"Bearer {token}"),) if token else ()

    def get(self) -> str | None:
        if not self.path:
            return None
        with self._mu:
            try:
                st = os.stat(self.path)
            except OSError:
                self._key, self._token = None, None
                return None
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key != self._key:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        self._token = f.read().strip() or None
                except OSError:
                    self._token = None
                self._key = key
            return self._token


class _IdleGuard:
    """Cancels a streaming call when the server sends nothing for ``timeout`` seconds.

    Keepalive only proves the connection lives; a server process that hangs mid-stream (or a
    proxy that swallows data) still answers pings. Only time spent *waiting* for the server
    counts, so a slow local disk does not look like a dead server.
    """

    def __init__(self, call: Any, timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        self.fired = False
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mx-idle", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = min(max(self.timeout / 5, 0.02), 1.0)
        while not self._stop.wait(tick):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fired = True
                self.call.cancel()
                return

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.call)
        while True:
            self._waiting_since = time.monotonic()
            try:
                msg = next(it)
            except StopIteration:
                return
            finally:
                self._waiting_since = None
            yield msg

    def stop(self) -> None:
        self._stop.set()


class ModelExpressSource:
    """``agent.sources.base.Source`` backed by a ModelExpress server (see module docstring)."""

    kind = "modelexpress"

    def __init__(
        self,
        address: str,
        settings: SourceSettings,
        *,
        chunk_size: int = 1 * MiB,  # grpc-python costs ~2.5x more CPU per byte at 2 MiB messages (bench)
        download_timeout: float = 6 * 3600.0,
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 10.0,
        root_certificates: bytes | None = None,
        stop: threading.Event | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        """``download_timeout`` bounds EnsureModelDownloaded (a cold server download is slow but must end);
        ``root_certificates`` (PEM) replaces the system CAs for https addresses; ``stop`` (the agent's)
        ends waits between retries; ``wait`` replaces that stop-aware wait (tests record delays)."""
        self.address, self.tls = parse_address(address)
        if not 0 < chunk_size < 1 << 32:
            raise ConfigError(f"modelexpress chunk size {chunk_size} must be between 1 and 2^32-1 bytes")
        self.settings = settings
        self.chunk_size = chunk_size
        self.download_timeout = download_timeout
        self.token = TokenFile(settings.mx_token_file)
        self._stop = stop or threading.Event()
        self._wait = wait
        options = [
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", chunk_size + 4 * MiB),
            ("grpc.enable_retries", 0),  # retries are ours: classified, logged, bounded by settings
        ]
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(self.address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = model_pb2_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def label(self) -> str:
        return f"modelexpress:{self.address}"

    # -- Source interface ------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        commit = self._retrying("EnsureModelDownloaded", repo, lambda: self._ensure(repo, revision))
        if is_commit(revision) and commit != revision:
            raise ProtocolError(f"{self.label}: asked for commit {revision}, server resolved {commit}")
        listing = self._retrying("ListModelFiles", repo, lambda: self._list(repo, commit))
        selected = files.select(sorted(listing))
        if not selected:
            raise NotFoundError(
                f"{self.label}: {repo}@{commit[:12]} has no files matching {files.to_dict()} "
                f"(the server lists {len(listing)} files; it never serves dotfiles, README.md, images "
                "or files in subfolders)"
            )
        entries = tuple(FileEntry(p, listing[p], guess_algo(p, listing[p])) for p in selected)
        return ModelPlan(repo, commit, entries, ref=None if is_commit(revision) else revision, source=self.label)

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        remaining = {e.path: e for e in entries}
        if not remaining:
            return
        self._retrying("StreamModelFiles", plan.repo, lambda: self._stream(plan, remaining, fill, progress),
                       fill=fill)

    def health(self, timeout: float = 2.0) -> bool:
        """grpc.health.v1 Check: True when the server says SERVING (a cheap probe for status pages)."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                      metadata=self.token.metadata())
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()

    # -- RPCs ------------------------------------------------------------------------------------

    def _ensure(self, repo: str, revision: str) -> str:
        req = model_pb2.ModelDownloadRequest(model_name=repo, provider=model_pb2.HUGGING_FACE, revision=revision)
        try:
            for update in self._stub.EnsureModelDownloaded(req, timeout=self.download_timeout,
                                                           metadata=self.token.metadata()):
                if update.status == model_pb2.DOWNLOADING:
                    continue
                if update.status == model_pb2.DOWNLOADED:
                    resolved = update.resolved_revision if update.HasField("resolved_revision") else None
                    if resolved is None:
                        raise ProtocolError(
                            f"{self.label}: {repo}@{revision} downloaded but the server named no commit "
                            "(it predates pinned revisions); cannot pin the listing and stream to one commit"
                        )
                    return check_commit(resolved, f"{self.label}: resolved_revision for {repo}@{revision}")
                if update.status == model_pb2.ERROR:
                    msg = update.message or "unknown server error"
                    if "not found" in msg.lower() or "404" in msg:
                        raise NotFoundError(f"{self.label}: server could not download {repo}@{revision}: {msg}")
                    raise SourceError(f"{self.label}: server failed to download {repo}@{revision}: {msg}",
                                      permanent=False, reason="server_error")
                raise ProtocolError(f"{self.label}: unknown download status {update.status} for {repo}")
        except grpc.RpcError as e:
            raise self._map(e, f"EnsureModelDownloaded {repo}@{revision}") from e
        raise ProtocolError(f"{self.label}: status stream for {repo}@{revision} ended before DOWNLOADED")

    def _list(self, repo: str, commit: str) -> dict[str, int]:
        req = model_pb2.ModelFilesRequest(model_name=repo, provider=model_pb2.HUGGING_FACE, revision=commit)
        try:
            resp = self._stub.ListModelFiles(req, timeout=self.settings.timeout, metadata=self.token.metadata())
        except grpc.RpcError as e:
            raise self._map(e, f"ListModelFiles {repo}@{commit[:12]}") from e
        try:
            listing = check_listing(((f.relative_path, f.size) for f in resp.files), resp.total_size)
        except (ProtocolError, UnsafePathError) as e:
            raise ProtocolError(f"{self.label}: {repo}@{commit[:12]}: {e}") from e
        clash = file_folder_conflict(listing)
        if clash is not None:
            raise ProtocolError(f"{self.label}: {repo}@{commit[:12]}: the listing has {clash[0]!r} both as a file "
                                f"and as a folder (of {clash[1]!r}); no snapshot can hold both, refusing it")
        return listing

    def _stream(self, plan: ModelPlan, remaining: dict[str, FileEntry], fill: Fill, progress: Progress) -> None:
        """One StreamModelFiles for ``remaining``; files it completes are removed from ``remaining``."""
        validator = StreamValidator({p: e.size for p, e in remaining.items()}, plan.commit)
        req = model_pb2.ModelFilesRequest(
            model_name=plan.repo, provider=model_pb2.HUGGING_FACE, chunk_size=self.chunk_size,
            file_selector=model_pb2.ModelFileSelector(paths=sorted(remaining)), revision=plan.commit,
        )
        call = self._stub.StreamModelFiles(req, metadata=self.token.metadata())
        guard = _IdleGuard(call, self.settings.timeout)
        finished: list[tuple[FileEntry, Digests]] = []
        entry: FileEntry | None = None
        writer: DigestWriter | None = None
        keep_finished = False
        try:
            for chunk in guard:
                fill.check_stop()
                data = chunk.data  # read once: each access of a bytes field copies it out of the message
                step = validator.accept(
                    chunk.relative_path, chunk.offset, chunk.total_size, len(data),
                    last_chunk=chunk.is_last_chunk, last_file=chunk.is_last_file,
                    commit=chunk.commit_hash if chunk.HasField("commit_hash") else None,
                )
                if step.begins:
                    entry = remaining[step.path]
                    writer = fill.open(entry)
                assert writer is not None and entry is not None
                if data:
                    writer.write(data)
                    progress.advance(len(data))
                if step.ends:
                    digests = writer.finish()
                    writer = None
                    if entry.digest is not None and digests.digest != entry.digest:  # fail fast, not at the end
                        fill.part_path(entry).unlink(missing_ok=True)
                        raise IntegrityError(entry.path, f"{entry.algo} {digests.digest}, expected {entry.digest} "
                                                         f"(streamed by {self.label})")
                    finished.append((entry, digests))
                    entry = None
            validator.finish()
            keep_finished = True
        except grpc.RpcError as e:
            err = (TransientSourceError(f"{self.label}: no data for {self.settings.timeout:g}s while streaming "
                                        f"{plan.repo}; server stalled or unreachable")
                   if guard.fired else self._map(e, f"StreamModelFiles {plan.repo}@{plan.commit[:12]}"))
            keep_finished = not err.permanent
            raise err from e
        except (ProtocolError, UnsafePathError) as e:
            raise ProtocolError(f"{self.label}: {plan.repo}@{plan.commit[:12]}: {e}") from e
        finally:
            guard.stop()
            call.cancel()
            if writer is not None and entry is not None:
                writer.close()
                fill.part_path(entry).unlink(missing_ok=True)
            for done, digests in finished:
                if keep_finished:
                    fill.complete(done, digests)
                    remaining.pop(done.path, None)
                else:
                    fill.part_path(done).unlink(missing_ok=True)

    # -- errors and retries ----------------------------------------------------------------------

    def _map(self, e: grpc.RpcError, what: str) -> SourceError:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        detail = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
        msg = redact_text(f"{self.label}: {what}: {code.name}: {detail}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFoundError(msg)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return AuthError(msg)
        if code in _TRANSIENT:
            return TransientSourceError(msg)
        return SourceError(msg, permanent=True, reason=code.name.lower())

    def _retrying(self, what: str, repo: str, fn: Callable[[], T], *, fill: Fill | None = None) -> T:
        """``fn`` under ``settings.retry``: every non-permanent SourceError is retried (a server-side
        download error too); a stop of the fill or the agent ends the wait at once."""
        return retry_source_call(fn, policy=self.settings.retry, what=f"{self.label}: {what} {repo}",
                                 stop=self._stop, fill=fill, wait=self._wait)


def open_source(ref: SourceRef, settings: SourceSettings, *, stop: threading.Event | None = None
                ) -> ModelExpressSource:
    """``--source modelexpress[:ADDR]``; without ADDR the address comes from MX_SERVER_ADDRESS/MODEL_EXPRESS_URL."""
    address = ref.arg or settings.mx_address
    if not address:
        raise ConfigError(
            "--source modelexpress needs an address: modelexpress:HOST:PORT, or set MX_SERVER_ADDRESS "
            "(or MODEL_EXPRESS_URL)"
        )
    return ModelExpressSource(address, settings, stop=stop)
