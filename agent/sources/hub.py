"""The Hugging Face Hub (or an HF_ENDPOINT mirror) as a source: metadata via huggingface_hub, bytes via
hf_transfer or a plain HTTP client, every byte checked against the Hub's published digests.

Why not just call ``snapshot_download``: it checks only sizes (never hashes), cannot resume across
process restarts, and writes straight into the cache workers read. Here the store stages, verifies
and publishes; this module only plans and moves bytes:

    resolve  GET /api/models/{repo}/revision/{rev}         -> commit (skipped for a 40-hex commit)
             GET /api/models/{repo}/tree/{commit}?recursive  -> size, oid (git sha1), lfs.oid (sha256)
    fetch    small files, and any resume:  GET /{repo}/resolve/{commit}/{path} with Range: bytes=N-
             large files (>= hf_transfer_min_size): hf_transfer.download() in a child process
             Xet-only servers: huggingface_hub's xet_get, best effort (see ``_fetch_xet``)

Staging, per file (``Fill.part_path`` is stable per commit+path, so a restarted agent finds it):

    files/<id>.part                  contiguous prefix of the file -> resumed with a Range request
    files/<id>.part.hft-<chunk>      hf_transfer's scratch file, written at random offsets; after a
                                     failure or crash the complete chunks before its first hole
                                     become <id>.part (so .part is always a clean prefix)

hf_transfer runs in a child process because its HTTP client has no read timeout and cannot be
cancelled: a stalled CDN connection would hang a thread forever. The parent watches the progress
callbacks and kills the child after ``settings.timeout`` seconds without one.

Redirects are followed by hand: the token goes only to the endpoint's own origin, never to a CDN.
The token is never logged and never put into an error message (``_redact`` is the backstop).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urljoin, urlparse

import httpx2
import structlog
from huggingface_hub import HfApi
from huggingface_hub._tree_cache import TREE_CACHE_FORMAT_VERSION, TreeCacheEntry
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import xet_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, parse_xet_file_data_from_response
from huggingface_hub.utils._runtime import is_xet_available

from agent.cache.hashing import MultiHasher
from agent.cache.layout import safe_relpath
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan, is_hex
from agent.core.spec import FileFilter, is_commit
from agent.errors import (
    AgentError,
    AuthError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    SourceError,
    TransientSourceError,
)
from agent.sources.base import Progress, SourceRef, SourceSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
MiB = 1024 * 1024
READ_CHUNK = 1 * MiB
MAX_REDIRECTS = 10
MAX_RETRY_AFTER = 300.0
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# The child process: one hf_transfer.download(), progress as one line per finished chunk on stdout.
# Request on stdin (never argv or env: the token would show in /proc).
_HF_TRANSFER_CHILD = """
import json, sys
import hf_transfer
req = json.load(sys.stdin)
def progress(n):
    sys.stdout.write(f"{n}\\n"); sys.stdout.flush()
hf_transfer.download(req["url"], req["filename"], req["max_files"], req["chunk_size"],
                     parallel_failures=req["parallel_failures"], max_retries=req["max_retries"],
                     headers=req["headers"] or None, callback=progress)
sys.stdout.write("done\\n"); sys.stdout.flush()
"""


class _Cancelled(AgentError):
    """Another file of the same fill failed or the source is closing: stop this one quietly."""


def _origin(url: str) -> tuple[str, str, int]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme, 0)


def _retry_after(headers: httpx2.Headers) -> float | None:
    value = (headers.get("Retry-After") or "").strip()
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() else None


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_STEP = 32 * MiB


class _GrowingFileHasher:
    """Hashes the file hf_transfer is still writing, so verification ends when the download does.

    Only whole chunks before the first hole (SEEK_HOLE) are read: hf_transfer writes each chunk
    with sequential writes after its body arrived, so such chunks are final. A page still being
    copied in is locked and not up to date, so the read waits for it; readahead is off
    (FADV_RANDOM) so no zero page is ever cached ahead of the writer. With ``writeback`` whatever
    has landed is pushed to disk as we go (sync_file_range), so the closing fsync has little left.
    If a filesystem misreports holes the digest mismatches and the retry hashes after the download.
    """

    def __init__(self, path: Path, entry: FileEntry, chunk: int, *, writeback: bool) -> None:
        self.entry = entry
        self.chunk = chunk
        self.writeback = writeback and _sync_file_range is not None
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.hasher = MultiHasher(entry.algo, entry.size)
        self.pos = 0
        self.landed = 0  # bytes reported by hf_transfer
        self.kicked = 0  # ``landed`` at the last writeback kick
        self.buf = bytearray(8 * MiB)

    def advance(self, landed: int = 0, *, final: bool = False) -> None:
        size = self.entry.size
        self.landed += landed
        if self.writeback and (final or self.landed - self.kicked >= _WRITEBACK_STEP):
            assert _sync_file_range is not None
            _sync_file_range(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # async: start writing, do not wait
            self.kicked = self.landed
        if final:
            limit = size
        else:
            try:
                hole = os.lseek(self.fd, self.pos, os.SEEK_HOLE)
            except OSError:  # ENXIO: nothing written past pos yet
                return
            limit = size if hole >= size else (hole // self.chunk) * self.chunk
        view = memoryview(self.buf)
        while self.pos < limit:
            n = os.preadv(self.fd, [view[: min(len(view), limit - self.pos)]], self.pos)
            if n <= 0:
                break
            self.hasher.update(view[:n])
            self.pos += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _BoundedTransport(httpx2.HTTPTransport):
    """Applies a timeout to requests that were sent with none (``timeout=None`` disables the client's)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._timeout = httpx2.Timeout(seconds).as_dict()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        current = request.extensions.get("timeout") or {}
        if all(v is None for v in current.values()):
            request.extensions["timeout"] = self._timeout
        return super().handle_request(request)


def _bound_hub_session(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default is None).

    ``list_repo_tree`` pages are fetched with ``timeout=None``, so a server that accepts the connection and
    never answers would hang the fill forever. The client is process-wide, so this setting is too.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http as hf_http  # keep the library's request hook (headers, logging)

    def factory() -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [hf_http.hf_request_event_hook]}, follow_redirects=True,
                             timeout=httpx2.Timeout(seconds), transport=_BoundedTransport(seconds))

    set_client_factory(factory)


class HubSource:
    """Satisfies ``agent.sources.base.Source`` for ``--source hub``."""

    kind = "hub"

    def __init__(
        self,
        settings: SourceSettings,
        *,
        hf_transfer_min_size: int = 16 * MiB,
        hf_transfer_chunk_size: int = 16 * MiB,
        hf_transfer_max_files: int = 8,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.endpoint = (settings.hf_endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.hf_transfer_min_size = hf_transfer_min_size
        self.hf_transfer_chunk_size = hf_transfer_chunk_size
        self.hf_transfer_max_files = hf_transfer_max_files
        self._sleep = sleep
        self._token = settings.hf_token or None
        # token=False: never fall back to HF_TOKEN or ~/.cache/huggingface/token behind config's back.
        self._api = HfApi(endpoint=self.endpoint, token=self._token or False,
                          library_name="model-cache-agent")
        _bound_hub_session(settings.timeout)
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(settings.timeout), follow_redirects=False,
            limits=httpx2.Limits(max_connections=max(settings.max_workers * 2, 8)),
            headers={"Accept-Encoding": "identity", "User-Agent": "model-cache-agent"},
        )
        self._children: set[subprocess.Popen[bytes]] = set()
        self._mu = threading.Lock()
        self._closing = threading.Event()
        self._hf_transfer_ok = importlib.util.find_spec("hf_transfer") is not None
        # One tokio worker thread drives many sockets; more per child only fight over cores with the
        # hashing threads and the other children (measured: 1 thread is fastest on a 2-core node).
        threads = max(1, min(4, (os.cpu_count() or 1) // max(settings.max_workers, 1)))
        self._child_env = {**os.environ, "TOKIO_WORKER_THREADS": str(threads)}

    @property
    def label(self) -> str:
        return "hub" if self.endpoint == DEFAULT_ENDPOINT else f"hub:{self.endpoint}"

    def close(self) -> None:
        self._closing.set()
        with self._mu:
            children = list(self._children)
        for p in children:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        self._http.close()

    # -- errors and retries ------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _http_error(self, status: int, error_code: str | None, what: str, retry_after: float | None = None,
                    detail: str = "") -> SourceError:
        """One place that turns an HTTP status (+ the Hub's X-Error-Code) into our error classes."""
        where = f"{what} at {self.label}"
        extra = f": {self._redact(detail)}" if detail else ""
        if status in (401, 403):
            hint = ("no token is configured (--token-file / HF_TOKEN / Secret): the repo is gated, private "
                    "or does not exist" if not self._token else
                    "the configured token was refused (no access to this gated/private repo?)")
            return AuthError(f"{where}: HTTP {status}, {hint}{extra}")
        if status == 404:
            kind = {"RepoNotFound": "repository not found", "RevisionNotFound": "revision not found",
                    "EntryNotFound": "file not found"}.get(error_code or "", "not found")
            return NotFoundError(f"{where}: {kind} (HTTP 404){extra}")
        if status in TRANSIENT_STATUS or status >= 500:
            return TransientSourceError(f"{where}: HTTP {status}{extra}", retry_after=retry_after)
        return SourceError(f"{where}: HTTP {status}{extra}", permanent=True, reason=f"http_{status}")

    def _classify(self, exc: BaseException, what: str) -> AgentError:
        if isinstance(exc, AgentError):
            return exc
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            r = exc.response
            err = self._http_error(r.status_code, r.headers.get("X-Error-Code"), what, _retry_after(r.headers),
                                   r.headers.get("X-Error-Message") or "")
        elif isinstance(exc, OfflineModeIsEnabled):
            err = SourceError(f"{what}: HF_HUB_OFFLINE is set, the Hub cannot be reached", reason="offline")
        elif isinstance(exc, httpx2.TransportError):
            err = TransientSourceError(f"{what} at {self.label}: {type(exc).__name__}: {self._redact(str(exc))}")
        else:
            return ProtocolError(f"{what} at {self.label}: {type(exc).__name__}: {self._redact(str(exc))}")
        err.__cause__ = exc
        return err

    def _backoff(self, attempt: int, err: TransientSourceError) -> float:
        if err.retry_after is not None:
            return err.retry_after
        seq = self.settings.backoff or (1.0,)
        base = seq[min(attempt - 1, len(seq) - 1)]
        return base * (1 + random.random() * 0.25)

    def _retrying(self, what: str, op: Callable[[], T], progressed: Callable[[], bool] | None = None) -> T:
        """Run ``op``; retry transient failures with backoff (Retry-After wins), raise the rest at once.

        An attempt that made progress (``progressed()``) resets the count: a flaky link that keeps
        delivering bytes is not given up on, one that delivers nothing is.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except _Cancelled:
                raise
            except Exception as exc:
                err = self._classify(exc, what)
                if not isinstance(err, TransientSourceError):
                    if err is exc:
                        raise
                    raise err from exc
                if progressed is not None and progressed():
                    attempt = 0
                if attempt >= max(self.settings.retries, 1) or self._closing.is_set():
                    if err is exc:
                        raise
                    raise err from exc
                delay = self._backoff(attempt, err)
                log.warning("hub.retry", what=what, attempt=f"{attempt}/{self.settings.retries}",
                            delay=round(delay, 3), error=str(err))
                self._sleep(delay)

    # -- metadata ----------------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        """Pin ``revision`` to a commit and list the selected files with their Hub digests."""
        if is_commit(revision):
            commit, ref = revision, None
        else:
            info = self._retrying(f"{repo}@{revision}", lambda: self._api.model_info(
                repo, revision=revision, timeout=self.settings.timeout))
            commit, ref = info.sha or "", revision
            if not is_commit(commit):
                raise ProtocolError(f"{repo}@{revision} at {self.label}: no valid commit in the answer ({commit!r})")
        tree = self._retrying(f"{repo}@{commit[:12]} file list", lambda: [
            f for f in self._api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)])
        listing: dict[str, TreeCacheEntry] = {}
        entries: list[FileEntry] = []
        for f in tree:
            try:
                safe_relpath(f.path)
            except AgentError as e:
                raise ProtocolError(f"{repo}@{commit[:12]} at {self.label}: {e}") from e
            if f.lfs is not None:
                digest, algo = f.lfs.sha256, "sha256"
                if not is_hex(digest, 64) or f.lfs.size != f.size:
                    raise ProtocolError(f"{repo}@{commit[:12]}: {f.path}: bad LFS metadata {f.lfs!r}")
            else:
                digest, algo = f.blob_id, "git-sha1"
                if not is_hex(digest, 40):
                    raise ProtocolError(f"{repo}@{commit[:12]}: {f.path}: bad git oid {f.blob_id!r}")
            listing[f.path] = TreeCacheEntry(
                size=f.size, blob_id=f.blob_id, lfs_sha256=f.lfs.sha256 if f.lfs else None,
                lfs_size=f.lfs.size if f.lfs else None, xet_hash=f.xet_hash)
            if files.matches(f.path):
                entries.append(FileEntry(f.path, f.size, algo, digest))  # type: ignore[arg-type]
        if not entries:
            raise NotFoundError(f"{repo}@{commit[:12]} at {self.label}: no file matches {files.to_dict()} "
                                f"({len(listing)} files in the repo)")
        # Exactly what huggingface_hub 2.x writes to trees/<commit>.json (whole repo, not the filtered set).
        trees_json = json.dumps({"format_version": TREE_CACHE_FORMAT_VERSION,
                                 "files": {p: listing[p].to_json() for p in sorted(listing)}}, indent=1)
        log.info("hub.resolved", repo=repo, revision=revision, commit=commit, files=len(entries),
                 bytes=sum(e.size for e in entries), source=self.label)
        return ModelPlan(repo, commit, tuple(sorted(entries, key=lambda e: e.path)), ref=ref,
                         source=self.label, extras={"trees_json": trees_json})

    # -- bytes -------------------------------------------------------------------------------------

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        """Fetch ``entries`` with at most ``settings.max_workers`` files in flight; first error wins."""
        if not entries:
            return
        stop = threading.Event()
        order = sorted(entries, key=lambda e: -e.size)  # big files first: they bound the total time
        with ThreadPoolExecutor(max(1, min(self.settings.max_workers, len(order))),
                                thread_name_prefix="hub-fetch") as pool:
            futures: list[Future[None]] = [
                pool.submit(self._fetch_file, plan, e, fill, progress, stop) for e in order]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                stop.set()
                for f in futures:
                    f.cancel()
                wait(futures)
                errors = [f.exception() for f in futures if f.done() and not f.cancelled()
                          and f.exception() is not None and not isinstance(f.exception(), _Cancelled)]
                if not errors:  # only cancellations: close() was called (shutdown)
                    raise TransientSourceError(f"{plan.repo}@{plan.commit[:12]} at {self.label}: source closed "
                                               "mid-fill; staged bytes are kept for a resume")
                raise errors[0]  # type: ignore[misc]

    def _fetch_file(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                    stop: threading.Event) -> None:
        """One file; a digest mismatch is retried once from scratch, then the model fails naming it."""
        blog = log.bind(repo=plan.repo, commit=plan.commit[:12], path=entry.path)
        for attempt in (1, 2):
            try:
                self._fetch_verified(plan, entry, fill, progress, stop, careful=attempt == 2)
                return
            except IntegrityError as e:
                self._discard(fill, entry)
                if attempt == 2:
                    blog.error("hub.integrity_failed", error=str(e))
                    raise
                blog.warning("hub.integrity_retry", error=str(e))

    def _fetch_verified(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                        stop: threading.Event, *, careful: bool = False) -> None:
        staged = [fill.resume_offset(entry)]
        use_hf_transfer = [self._hf_transfer_ok and entry.size >= self.hf_transfer_min_size]

        def progressed() -> bool:
            now = fill.resume_offset(entry)
            moved = now > staged[0]
            staged[0] = now
            return moved

        def attempt() -> None:
            if stop.is_set() or self._closing.is_set():
                raise _Cancelled(entry.path)
            self._salvage(fill, entry)
            offset = fill.resume_offset(entry)
            if offset == entry.size and entry.size > 0:
                fill.adopt(entry)  # staged in full by an earlier run, just never verified
            elif offset == 0 and use_hf_transfer[0]:
                use_hf_transfer[0] = False  # whatever happens, a retry streams (and resumes) over plain HTTP
                self._fetch_hf_transfer(plan, entry, fill, progress, stop, hash_while_writing=not careful)
            else:
                try:
                    self._fetch_http(plan, entry, fill, progress, stop, offset)
                except SourceError as e:
                    if e.reason.startswith("http_4") and self._fetch_xet(plan, entry, fill, progress):
                        return  # a Xet-only server refuses plain GETs
                    raise

        self._retrying(f"{plan.repo}@{plan.commit[:12]}: {entry.path}", attempt, progressed)

    def _discard(self, fill: Fill, entry: FileEntry) -> None:
        part = fill.part_path(entry)
        part.unlink(missing_ok=True)
        for p in part.parent.glob(part.name + ".hft-*"):
            p.unlink(missing_ok=True)

    def _resolve_url(self, plan: ModelPlan, entry: FileEntry) -> str:
        return f"{self.endpoint}/{plan.repo}/resolve/{plan.commit}/{quote(entry.path)}"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    @contextlib.contextmanager
    def _request(self, method: str, url: str, what: str, headers: dict[str, str] | None = None,
                 stop_at_foreign_redirect: bool = False) -> Iterator[httpx2.Response]:
        """Follow redirects by hand: the token only ever goes to the endpoint's origin.

        With ``stop_at_foreign_redirect`` the first redirect to another origin (a CDN) is returned
        as-is, like huggingface_hub's metadata call: its Location is where the bytes live.
        """
        hdrs = dict(headers or {})
        home = _origin(self.endpoint)
        if _origin(url) == home:
            hdrs.update(self._auth())
        for _ in range(MAX_REDIRECTS):
            resp = self._http.send(self._http.build_request(method, url, headers=hdrs), stream=True)
            try:
                if resp.is_redirect and "Location" in resp.headers:
                    target = urljoin(url, resp.headers["Location"])
                    if _origin(target) != home:
                        hdrs.pop("Authorization", None)
                        if stop_at_foreign_redirect:
                            yield resp
                            return
                    url = target
                    continue
                if resp.status_code >= 400:
                    resp.read()
                    raise self._http_error(resp.status_code, resp.headers.get("X-Error-Code"), what,
                                           _retry_after(resp.headers), resp.headers.get("X-Error-Message") or "")
                yield resp
                return
            finally:
                resp.close()
        raise ProtocolError(f"{what} at {self.label}: more than {MAX_REDIRECTS} redirects")

    def _fetch_http(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                    stop: threading.Event, offset: int) -> None:
        """Stream one file into the store, continuing a staged prefix with ``Range: bytes=offset-``."""
        what = f"{plan.repo}@{plan.commit[:12]}: {entry.path}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._request("GET", self._resolve_url(plan, entry), what, headers) as resp:
            if offset and resp.status_code == 200:
                log.warning("hub.range_ignored", what=what, offset=offset)  # restart from byte 0
                fill.part_path(entry).unlink(missing_ok=True)
                offset = 0
            elif offset and resp.status_code == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != offset:
                    raise ProtocolError(f"{what}: asked for bytes {offset}-, got "
                                        f"{resp.headers.get('Content-Range')!r}")
            writer = fill.open(entry, resume=offset > 0)
            pos = offset
            try:
                for chunk in resp.iter_raw(READ_CHUNK):
                    if stop.is_set() or self._closing.is_set():
                        raise _Cancelled(entry.path)
                    if pos + len(chunk) > entry.size:
                        raise IntegrityError(entry.path, f"server sent more than the {entry.size} bytes listed")
                    writer.write(chunk)
                    pos += len(chunk)
                    progress.advance(len(chunk))
                if pos < entry.size:
                    raise TransientSourceError(f"{what}: connection closed at byte {pos} of {entry.size}")
                digests = writer.finish()
            finally:
                writer.close()
        fill.complete(entry, digests)

    # -- hf_transfer -------------------------------------------------------------------------------

    def _chunk_for(self, entry: FileEntry) -> int:
        """At most ``hf_transfer_chunk_size``, but small enough for ~4 rounds of ``max_files`` chunks:
        chunks then land in order over the whole transfer and hashing keeps pace, instead of every
        chunk of a mid-size file finishing at once and all the hashing waiting for the end."""
        per_round = entry.size // (4 * max(self.hf_transfer_max_files, 1))
        return max(MiB, min(self.hf_transfer_chunk_size, max(4 * MiB, per_round // MiB * MiB)))

    def _scratch(self, fill: Fill, entry: FileEntry) -> Path:
        part = fill.part_path(entry)
        return part.with_name(f"{part.name}.hft-{self._chunk_for(entry)}")

    def _salvage(self, fill: Fill, entry: FileEntry) -> None:
        """Turn what a failed or killed hf_transfer left into a clean prefix at ``part_path``.

        hf_transfer writes whole chunks at their offsets, each with one sequential write, so every
        chunk that ends before the file's first hole (SEEK_HOLE) is complete. A filesystem that hides
        holes only costs a digest mismatch later, never a wrong blob.
        """
        part = fill.part_path(entry)
        for scratch in sorted(part.parent.glob(part.name + ".hft-*")):
            try:
                chunk = int(scratch.name.rsplit("-", 1)[1])
                st = scratch.stat()
                fd = os.open(scratch, os.O_RDONLY)
                try:
                    first_hole = os.lseek(fd, 0, os.SEEK_HOLE)
                finally:
                    os.close(fd)
                keep = min((first_hole // chunk) * chunk, entry.size) if chunk > 0 else 0
                if first_hole >= st.st_size and st.st_blocks * 512 + chunk < st.st_size:
                    keep = 0  # sparse, yet no hole reported: do not trust it
                if keep > fill.resume_offset(entry):
                    os.truncate(scratch, keep)
                    os.replace(scratch, part)
                    log.info("hub.salvaged", path=entry.path, offset=keep)
                else:
                    scratch.unlink()
            except (OSError, ValueError):
                scratch.unlink(missing_ok=True)

    def _locate(self, plan: ModelPlan, entry: FileEntry) -> tuple[str, dict[str, str]]:
        """HEAD the resolve URL: the final byte URL, and the headers it may receive (no token off-origin)."""
        what = f"{plan.repo}@{plan.commit[:12]}: {entry.path}"
        url = self._resolve_url(plan, entry)
        with self._request("HEAD", url, what, stop_at_foreign_redirect=True) as resp:
            commit = resp.headers.get("X-Repo-Commit")
            if commit and commit != plan.commit:
                raise ProtocolError(f"{what}: server answered for commit {commit}, expected {plan.commit}")
            size = resp.headers.get("X-Linked-Size") or (None if resp.is_redirect else
                                                          resp.headers.get("Content-Length"))
            if size is not None and size.isdigit() and int(size) != entry.size:
                raise ProtocolError(f"{what}: size {size} at resolve, {entry.size} in the file list")
            final = str(resp.url)
            if resp.is_redirect:
                final = urljoin(final, resp.headers["Location"])
        return final, (self._auth() if _origin(final) == _origin(self.endpoint) else {})

    def _fetch_hf_transfer(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                           stop: threading.Event, *, hash_while_writing: bool = True) -> None:
        """Parallel Range requests by hf_transfer into a scratch file, hashed as its chunks land
        (``hash_while_writing``) or after the download (the careful retry after a mismatch)."""
        what = f"{plan.repo}@{plan.commit[:12]}: {entry.path}"
        url, headers = self._locate(plan, entry)
        scratch = self._scratch(fill, entry)
        scratch.unlink(missing_ok=True)
        scratch.touch()
        chunk = self._chunk_for(entry)
        grow = (_GrowingFileHasher(scratch, entry, chunk, writeback=fill.store.fsync)
                if hash_while_writing else None)
        req = {"url": url, "filename": str(scratch), "max_files": self.hf_transfer_max_files,
               "chunk_size": chunk, "parallel_failures": self.hf_transfer_max_files,
               "max_retries": max(self.settings.retries, 1), "headers": headers}
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen([sys.executable, "-c", _HF_TRANSFER_CHILD], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=errf, close_fds=True, env=self._child_env)
            with self._mu:
                self._children.add(proc)
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(req).encode())
                proc.stdin.close()
                try:
                    done = self._watch_child(proc, what, progress, stop, grow)
                except BaseException:
                    if grow is not None:
                        grow.close()
                    raise
                rc = proc.wait()
                errf.seek(0)
                err_text = errf.read().decode(errors="replace")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                with self._mu:
                    self._children.discard(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
        if rc != 0 or not done:
            if grow is not None:
                grow.close()
            self._salvage(fill, entry)
            last = self._redact(err_text.strip().splitlines()[-1] if err_text.strip() else f"exit code {rc}")
            m = re.search(r"\b([1-5]\d\d)\b", last)
            status = int(m.group(1)) if m and ("status" in last or "HTTP" in last) else None
            if status is not None and status < 500 and status not in TRANSIENT_STATUS:
                raise self._http_error(status, None, what, detail=f"hf_transfer: {last}")
            raise TransientSourceError(f"{what}: hf_transfer failed: {last}")
        if grow is None:
            os.replace(scratch, fill.part_path(entry))
            fill.adopt(entry)
            return
        try:
            grow.advance(final=True)
            if fill.store.fsync:
                os.fsync(grow.fd)
        finally:
            grow.close()
        os.replace(scratch, fill.part_path(entry))
        fill.complete(entry, grow.hasher.digests())

    def _fetch_xet(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress) -> bool:
        """Best effort for servers that only serve Xet: huggingface_hub's own xet path, then we hash.

        Untested against a real Xet-only server (the loopback Hub never advertises Xet). False when
        the resolve answer carries no Xet metadata or hf_xet is not installed.
        """
        if not is_xet_available():
            return False
        what = f"{plan.repo}@{plan.commit[:12]}: {entry.path}"
        with self._request("HEAD", self._resolve_url(plan, entry), what, stop_at_foreign_redirect=True) as resp:
            xet = parse_xet_file_data_from_response(resp, endpoint=self.endpoint)  # type: ignore[arg-type]
        if xet is None:
            return False
        part = fill.part_path(entry)
        part.unlink(missing_ok=True)
        try:
            xet_get(incomplete_path=part, xet_file_data=xet, expected_size=entry.size,
                    headers=build_hf_headers(token=self._token or False, library_name="model-cache-agent"),
                    displayed_filename=entry.path)
        except Exception as exc:
            part.unlink(missing_ok=True)
            raise self._classify(exc, f"{what} (xet)") from exc
        progress.advance(entry.size)
        fill.adopt(entry)
        return True

    def _watch_child(self, proc: subprocess.Popen[bytes], what: str, progress: Progress,
                     stop: threading.Event, grow: _GrowingFileHasher | None) -> bool:
        """Relay progress lines; kill the child after ``settings.timeout`` s without one (a stall)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        done = False
        last = time.monotonic()
        landed = 0
        while True:
            ready, _, _ = select.select([fd], [], [], min(self.settings.timeout, 0.25))
            if stop.is_set() or self._closing.is_set():
                proc.kill()
                raise _Cancelled(what)
            if not ready:
                if time.monotonic() - last >= self.settings.timeout:
                    proc.kill()
                    raise TransientSourceError(f"{what}: no progress for {self.settings.timeout:g}s "
                                               "(stalled transfer)")
                continue
            data = os.read(fd, 65536)
            if not data:
                return done
            last = time.monotonic()
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"done":
                    done = True
                elif line.isdigit():
                    progress.advance(int(line))
                    landed += int(line)
            if grow is not None:
                grow.advance(landed)
                landed = 0


def open_source(ref: SourceRef, settings: SourceSettings) -> HubSource:
    """Factory used by the runtime for ``--source hub``."""
    if ref.kind != "hub":
        raise ValueError(f"not a hub source: {ref}")
    return HubSource(settings)
