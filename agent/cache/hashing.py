"""One-pass multi-digest hashing.

Every byte the agent writes is hashed once, while it is written: the Hub digest (sha256 for LFS
files, git blob sha1 for the rest) and xxh3-128 for fast re-checks. Hashing runs on a helper thread
(hashlib and xxhash release the GIL on large buffers) so it overlaps the read and write syscalls.

``copy_into`` writes with O_DIRECT where the filesystem allows it: on the 2-core benchmark VM a
buffered write (page allocation + memcpy + later writeback) cost about as much CPU as sha256 itself,
so skipping the page cache roughly halved the CPU per byte and the wall time of a PVC fill. It also
keeps a fill of hundreds of GB from evicting the page cache of running inference pods. Durability
is unchanged: ``finish`` still fsyncs (device cache flush + metadata) before the blob is published.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from agent.core.plan import HashAlgo
from agent.errors import DiskFullError

CHUNK = 8 * 1024 * 1024
DIRECT_ALIGN = 4096  # O_DIRECT needs block-aligned offsets, lengths and buffers; 4 KiB suits all disks
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hash")


def git_blob_header(size: int) -> bytes:
    return b"blob %d\0" % size


@dataclass(frozen=True)
class Digests:
    """What one pass over a file produced."""

    algo: HashAlgo
    digest: str
    xxh3: str
    size: int


class MultiHasher:
    """Hub digest + xxh3-128 over one stream. git-sha1 needs the size up front (it is in the header)."""

    def __init__(self, algo: HashAlgo, size: int | None = None, *, hub_digest: bool = True) -> None:
        self.algo: HashAlgo = algo
        self.size = 0
        self._xxh = xxhash.xxh3_128()
        self._hub: hashlib._Hash | None = None
        if hub_digest:
            if algo == "sha256":
                self._hub = hashlib.sha256()
            else:
                if size is None:
                    raise ValueError("git-sha1 needs the size before the first byte")
                self._hub = hashlib.sha1(git_blob_header(size))

    def update(self, data: bytes | memoryview) -> None:
        if self._hub is not None:
            self._hub.update(data)
        self._xxh.update(data)
        self.size += len(data)

    def digests(self) -> Digests:
        hub = self._hub.hexdigest() if self._hub is not None else ""
        return Digests(self.algo, hub, self._xxh.hexdigest(), self.size)


WriteFn = Callable[[int, memoryview], int]


class DigestWriter:
    """Writes a staged file and hashes it in the same pass; ``finish`` fsyncs and returns digests.

    Hashing of chunk N runs on a helper thread while chunk N is written and chunk N+1 is read by
    the caller. The caller must not mutate a buffer it passed until the *next* ``write`` returns
    (double buffering satisfies that). ``write_fn`` is the seam tests use to inject ENOSPC.
    """

    def __init__(
        self,
        path: Path,
        algo: HashAlgo,
        size: int,
        *,
        append: bool = False,
        write_fn: WriteFn = os.write,
        fsync: bool = True,
    ) -> None:
        self.path = path
        self._hasher = MultiHasher(algo, size)
        self._write_fn = write_fn
        self._fsync = fsync
        self._pending: Future[None] | None = None
        self._direct = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o644)
        if append:
            # Re-hash what a previous attempt left, so the final digest covers the whole file.
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self._hasher.update(chunk)

    @property
    def written(self) -> int:
        return self._hasher.size

    def use_direct_io(self) -> bool:
        """Write with O_DIRECT from now on, if the filesystem supports it (not tmpfs, say).

        Only for callers whose buffers are page-aligned with lengths that are multiples of
        ``DIRECT_ALIGN`` (``copy_into``'s are); a short or odd-sized write drops back to buffered.
        """
        if self.written % DIRECT_ALIGN:
            return False
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            return False
        self._direct = True
        return True

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._pending is not None:
            self._pending.result()
        self._pending = _pool.submit(self._hasher.update, view)
        try:
            while view:
                if self._direct and len(view) % DIRECT_ALIGN:
                    self._buffered()  # the tail of a file (or a short write) cannot go direct
                try:
                    n = self._write_fn(self._fd, view)
                except OSError as e:
                    if not (self._direct and e.errno == errno.EINVAL):
                        raise
                    self._buffered()  # alignment the filesystem will not take: retry buffered
                    continue
                view = view[n:]
        except OSError as e:
            self._pending.result()
            self._pending = None
            if e.errno == 28:  # ENOSPC
                raise DiskFullError(f"disk full while writing {self.path}") from e
            raise

    def finish(self) -> Digests:
        try:
            if self._pending is not None:
                self._pending.result()
                self._pending = None
            if self._fsync:
                os.fsync(self._fd)
        except OSError as e:
            if e.errno == 28:
                raise DiskFullError(f"disk full while syncing {self.path}") from e
            raise
        finally:
            self.close()
        return self._hasher.digests()

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()
            finally:
                self._pending = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


ReadFn = Callable[[int, list[mmap.mmap]], int]


def copy_into(
    fd: int, writer: DigestWriter, on_bytes: Callable[[int], None] | None = None, *,
    between_chunks: Callable[[], None] | None = None, read_fn: ReadFn = os.readv,
) -> int:
    """Copy an open file into a DigestWriter with one read pass and double-buffered reads; returns bytes copied.

    The buffers are anonymous mmaps (page-aligned) so the writer can use O_DIRECT; the bytes hashed
    are the very bytes written, read once into our private buffer (the source may change under us:
    the caller compares fstat before and after). ``between_chunks`` runs before every read (a fill's
    ``check_stop``); ``read_fn`` is the seam tests use to inject EIO or ESTALE. The caller owns ``fd``.
    """
    bufs = (mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK))
    i = 0
    total = 0
    writer.use_direct_io()
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while True:
        if between_chunks is not None:
            between_chunks()
        buf = bufs[i]
        n = read_fn(fd, [buf])
        if n == 0:
            return total
        writer.write(memoryview(buf)[:n])
        total += n
        if on_bytes is not None:
            on_bytes(n)
        i ^= 1


def hash_file(
    path: Path, algo: HashAlgo, *, hub_digest: bool = True, size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Digests:
    """Read a file once and return its digests (xxh3 only when ``hub_digest`` is False).

    FADV_SEQUENTIAL doubles the kernel's readahead, so the disk keeps reading while we hash: about
    10% faster from a cold page cache on the benchmark VM (``python -m bench.scrub``), same warm.
    """
    if size is None:
        size = os.stat(path).st_size
    hasher = MultiHasher(algo, size, hub_digest=hub_digest)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := os.readv(fd, [buf]):
            hasher.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    finally:
        os.close(fd)
    return hasher.digests()
