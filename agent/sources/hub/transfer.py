"""hf_transfer in a supervised child process, hashed while it writes, salvaged after a failure.

hf_transfer runs in a child process because its HTTP client has no read timeout and cannot be
cancelled: a stalled CDN connection would hang a thread forever. The parent relays the child's
progress lines and kills it after ``timeout`` seconds without one, or at once when the fill stops.
Staging, per file (``Fill.part_path`` is stable per commit+path, so a restarted agent finds it):

    files/<id>.part                  contiguous prefix of the file -> resumed by the HTTP client
    files/<id>.part.hft-<chunk>      hf_transfer's scratch file, written at random offsets; after a
                                     failure or crash the complete chunks before its first hole
                                     become <id>.part (so .part is always a clean prefix)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.cache.hashing import MultiHasher
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.errors import TransientSourceError
from agent.log import redact_text
from agent.sources.base import Progress
from agent.sources.hub.classify import TRANSIENT_STATUS, Abandoned, http_error
from agent.sources.hub.client import HubClient, what_of

log = structlog.get_logger("agent.sources.hub")
MiB = 1024 * 1024

# The child process: one hf_transfer.download(), progress as one line per finished chunk on stdout.
# Request on stdin (never argv or env: the token would show in /proc).
_CHILD = """
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


def hf_transfer_installed() -> bool:
    return importlib.util.find_spec("hf_transfer") is not None


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


class GrowingFileHasher:
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


class HfTransfer:
    """Runs and supervises hf_transfer children; ``kill_all`` ends every one (source closing)."""

    def __init__(self, client: HubClient, *, timeout: float, attempts: int, chunk_size: int, max_files: int,
                 threads: int) -> None:
        self.client = client
        self.timeout = timeout
        self.attempts = attempts
        self.chunk_size = chunk_size
        self.max_files = max_files
        self._children: set[subprocess.Popen[bytes]] = set()
        self._mu = threading.Lock()
        # One tokio worker thread drives many sockets; more per child only fight over cores with the
        # hashing threads and the other children (measured: 1 thread is fastest on a 2-core node).
        self._env = {**os.environ, "TOKIO_WORKER_THREADS": str(threads)}

    @property
    def running(self) -> int:
        with self._mu:
            return len(self._children)

    def kill_all(self) -> None:
        with self._mu:
            children = list(self._children)
        for p in children:
            with contextlib.suppress(ProcessLookupError):
                p.kill()

    # -- staging --------------------------------------------------------------------------------

    def chunk_for(self, entry: FileEntry) -> int:
        """At most ``chunk_size``, but small enough for ~4 rounds of ``max_files`` chunks: chunks then
        land in order over the whole transfer and hashing keeps pace, instead of every chunk of a
        mid-size file finishing at once and all the hashing waiting for the end."""
        per_round = entry.size // (4 * max(self.max_files, 1))
        return max(MiB, min(self.chunk_size, max(4 * MiB, per_round // MiB * MiB)))

    def scratch(self, fill: Fill, entry: FileEntry) -> Path:
        part = fill.part_path(entry)
        return part.with_name(f"{part.name}.hft-{self.chunk_for(entry)}")

    @staticmethod
    def discard(fill: Fill, entry: FileEntry) -> None:
        part = fill.part_path(entry)
        part.unlink(missing_ok=True)
        for p in part.parent.glob(part.name + ".hft-*"):
            p.unlink(missing_ok=True)

    @staticmethod
    def salvage(fill: Fill, entry: FileEntry) -> None:
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

    # -- one download ---------------------------------------------------------------------------

    def fetch(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
              abandoned: Callable[[], bool], *, hash_while_writing: bool = True) -> None:
        """Parallel Range requests by hf_transfer into a scratch file, hashed as its chunks land
        (``hash_while_writing``) or after the download (the careful retry after a mismatch)."""
        what = what_of(plan, entry)
        url, headers = self.client.locate(plan, entry)
        scratch = self.scratch(fill, entry)
        scratch.unlink(missing_ok=True)
        scratch.touch()
        chunk = self.chunk_for(entry)
        grow = GrowingFileHasher(scratch, entry, chunk, writeback=fill.store.fsync) if hash_while_writing else None
        req = {"url": url, "filename": str(scratch), "max_files": self.max_files, "chunk_size": chunk,
               "parallel_failures": self.max_files, "max_retries": self.attempts, "headers": headers}
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errf, close_fds=True, env=self._env)
            with self._mu:
                self._children.add(proc)
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(req).encode())
                proc.stdin.close()
                try:
                    done = self._watch(proc, what, fill, progress, abandoned, grow)
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
            self.salvage(fill, entry)
            last = redact_text(err_text.strip().splitlines()[-1] if err_text.strip() else f"exit code {rc}")
            m = re.search(r"\b([1-5]\d\d)\b", last)
            status = int(m.group(1)) if m and ("status" in last or "HTTP" in last) else None
            if status is not None and status < 500 and status not in TRANSIENT_STATUS:
                raise http_error(status, None, f"{what} at {self.client.label}", has_token=bool(self.client.auth()),
                                 detail=f"hf_transfer: {last}")
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

    def _watch(self, proc: subprocess.Popen[bytes], what: str, fill: Fill, progress: Progress,
               abandoned: Callable[[], bool], grow: GrowingFileHasher | None) -> bool:
        """Relay progress lines; kill the child when the fill stops, or after ``timeout`` s without progress."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        done = False
        last = time.monotonic()
        landed = 0
        while True:
            ready, _, _ = select.select([fd], [], [], min(self.timeout, 0.25))
            if fill.stop.is_set() or abandoned():
                proc.kill()
                fill.check_stop()
                raise Abandoned(what)
            if not ready:
                if time.monotonic() - last >= self.timeout:
                    proc.kill()
                    raise TransientSourceError(f"{what}: no progress for {self.timeout:g}s (stalled transfer)")
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
