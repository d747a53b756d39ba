"""Small filesystem primitives the store is built from: world-readable dirs, dir fsync, atomic swap and
write, and one mapping of "out of space" (bytes or inodes, quota or disk) to ``DiskFullError``."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

DIR_MODE = 0o755
FILE_MODE = 0o644
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def make_dirs(path: Path) -> None:
    """mkdir -p with 0755 whatever the umask, so workers of any UID can traverse the cache."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_renameat2():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported here."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: Path, dest: Path, trash: Path) -> None:
    """Make ``new`` appear at ``dest`` in one step; whatever was at ``dest`` ends up at ``trash``.

    Uses an atomic exchange where the kernel supports it; otherwise two renames (a window in which
    ``dest`` is briefly absent, never partial).
    """
    if not dest.exists():
        os.rename(new, dest)
        return
    if exchange(new, dest):
        os.rename(new, trash)
        return
    os.rename(dest, trash)
    os.rename(new, dest)


def rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def disk_full_as_error(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT from any step (data, mkdir, create, symlink, rename) into one clear error.

    Running out of inodes fails a ``mkdir`` or ``symlink`` as surely as running out of bytes fails a
    ``write``; every step of a fill and a publish runs inside this, so the user sees one message.
    """
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in NO_SPACE:
            where = f" ({e.filename})" if e.filename and str(e.filename) not in what else ""
            raise DiskFullError(f"disk full while {what}: {e.strerror}{where}") from e
        raise


def write_atomic(path: Path, data: str | bytes, *, tmp_dir: Path | None = None, fsync: bool = True) -> None:
    """Write a small file via a uniquely named temp in ``tmp_dir`` (default: beside it), then rename.

    With ``fsync`` the data and the directory entry are durable before this returns. A temp in another
    folder of the same filesystem (staging) keeps temp names out of folders workers list.
    """
    tmp_dir = tmp_dir or path.parent
    make_dirs(tmp_dir)
    make_dirs(path.parent)
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
