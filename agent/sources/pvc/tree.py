"""A PVC tree read through directory fds: no symlink followed by accident, nothing that blocks,
and a folder swapped after planning is noticed.

Every path below the root is opened one component at a time, relative to its parent's fd, with
O_NOFOLLOW (folders with O_DIRECTORY too). Resolve records each folder's (st_dev, st_ino); fetch
opens a new ``PvcTree`` with those identities as ``expect`` and refuses a folder that is now
something else (``snapshots/<commit>`` swapped for a symlink or another folder after planning).
Files are opened with O_NONBLOCK and checked with fstat: only regular files are read, so a FIFO
(or a device) in a snapshot is refused instead of hanging the fill in ``open()``.

The root itself is the operator's mount path and is opened like any path (it may be a symlink).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError, NotFoundError, SourceError, UnsafePathError

Parts = tuple[str, ...]
Identity = tuple[int, int]  # (st_dev, st_ino)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


@dataclass(frozen=True)
class Entry:
    """One non-folder entry found by ``walk``: its path from the walk's top and from the root, and its lstat."""

    rel: str
    parts: Parts
    st: os.stat_result


class PvcTree:
    """Directory fds under ``root``, opened on demand and closed together; safe to share between threads."""

    def __init__(self, root: Path, *, expect: Mapping[Parts, Identity] | None = None) -> None:
        self.root = root
        self.ids: dict[Parts, Identity] = {}
        self._expect = expect
        self._fds: dict[Parts, int] = {}
        self._mu = threading.RLock()
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"pvc: {root} is not a directory (is the PVC mounted?)") from None
        except OSError as e:
            raise self.error(e, (), "open") from e
        self._admit((), fd)

    def __enter__(self) -> PvcTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._mu:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def show(self, parts: Parts) -> str:
        return str(self.root.joinpath(*parts))

    def error(self, e: OSError, parts: Parts, doing: str, what: str | None = None) -> AgentError:
        """An OSError as one of our errors, naming the path: EACCES is permanent, EIO/ESTALE may pass."""
        where = what or self.show(parts)
        if e.errno == errno.ENOENT:
            return NotFoundError(f"pvc: {where} does not exist")
        if e.errno == errno.ELOOP:
            return UnsafePathError(f"pvc: {where} is a symlink; not followed")
        if e.errno in (errno.EACCES, errno.EPERM):
            return SourceError(f"pvc: cannot {doing} {where}: {e.strerror} (is it readable by the agent?)",
                               reason="permission")
        return SourceError(f"pvc: cannot {doing} {where}: {e.strerror or e}", permanent=False, reason="io")

    def _admit(self, parts: Parts, fd: int) -> None:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        want = self._expect.get(parts) if self._expect is not None else None
        if want is not None and want != ident:
            os.close(fd)
            raise UnsafePathError(f"pvc: {self.show(parts)} was replaced since the fill was planned; not read")
        self.ids[parts] = ident
        self._fds[parts] = fd

    def dir_fd(self, parts: Parts) -> int:
        """The folder at ``parts``, every component opened with O_NOFOLLOW below its parent."""
        with self._mu:
            fd = self._fds.get(parts)
            if fd is not None:
                return fd
            parent = self.dir_fd(parts[:-1])
            try:
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except NotADirectoryError as e:  # O_NOFOLLOW|O_DIRECTORY on a symlink says ENOTDIR, not ELOOP
                try:
                    link = stat.S_ISLNK(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                if link:
                    raise UnsafePathError(f"pvc: {self.show(parts)} is a symlink, not a folder; not followed") from e
                raise SourceError(f"pvc: {self.show(parts)} is not a folder") from e
            except OSError as e:
                raise self.error(e, parts, "open folder") from e
            self._admit(parts, fd)
            return fd

    def lstat(self, parts: Parts) -> os.stat_result | None:
        """The entry itself (a symlink is not followed); None when it does not exist."""
        if not parts:
            return os.fstat(self.dir_fd(()))
        parent = self.dir_fd(parts[:-1])
        try:
            return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self.error(e, parts, "stat") from e

    def is_dir(self, parts: Parts) -> bool:
        """A real folder (not a symlink to one); False when missing or not a folder."""
        try:
            st = self.lstat(parts)
        except NotFoundError:
            return False
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"pvc: {self.show(parts)} is a symlink; not followed "
                                  "(point --source pvc: at the real folder)")
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, parts: Parts) -> list[tuple[str, os.stat_result]]:
        """Every entry of a folder with its lstat, sorted; a folder that cannot be listed is an error."""
        fd = self.dir_fd(parts)
        try:
            with os.scandir(fd) as it:
                names = sorted(e.name for e in it)
            return [(n, os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in names]
        except OSError as e:
            raise self.error(e, parts, "list") from e

    def walk(self, top: Parts, *, skip: frozenset[str] = frozenset()) -> Iterator[Entry]:
        """Every non-folder entry below ``top`` (symlinks included, not followed), in path order.

        ``skip`` holds paths relative to ``top`` that are not descended into (``.git``). Unlike
        ``os.walk`` nothing is skipped silently: a folder that cannot be listed raises.
        """
        stack: list[tuple[Parts, str]] = [(top, "")]
        while stack:
            parts, prefix = stack.pop()
            subdirs = []
            for name, st in self.listdir(parts):
                rel = prefix + name
                if stat.S_ISDIR(st.st_mode):
                    if rel not in skip:
                        subdirs.append(((*parts, name), rel + "/"))
                else:
                    yield Entry(rel, (*parts, name), st)
            stack.extend(reversed(subdirs))

    def readlink(self, parts: Parts) -> str:
        try:
            return os.readlink(parts[-1], dir_fd=self.dir_fd(parts[:-1]))
        except OSError as e:
            raise self.error(e, parts, "read symlink") from e

    def open_file(self, parts: Parts, what: str | None = None) -> tuple[int, os.stat_result]:
        """An fd on a regular file (O_NOFOLLOW, O_NONBLOCK), and its fstat; anything else is refused."""
        parent = self.dir_fd(parts[:-1])
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise SourceError(f"pvc: {what or self.show(parts)} is not readable ({e.strerror})",
                                  reason="permission") from e
            raise self.error(e, parts, "open", what) from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise not_regular(what or self.show(parts), st.st_mode)
        return fd, st

    def read_small(self, parts: Parts, limit: int, what: str | None = None) -> bytes:
        """The whole of a small regular file (a ref, a metadata file); larger than ``limit`` is an error."""
        fd, st = self.open_file(parts, what)
        try:
            if st.st_size > limit:
                raise SourceError(f"pvc: {what or self.show(parts)} is {st.st_size} bytes, expected at most {limit}")
            return os.pread(fd, limit + 1, 0)
        except OSError as e:
            raise self.error(e, parts, "read", what) from e
        finally:
            os.close(fd)


def not_regular(what: str, mode: int) -> SourceError:
    return SourceError(f"pvc: {what} is a {kind_of(mode)}, not a regular file; refusing it", reason="not_regular")


def resolve_link(link: Parts, target: str, root: Path) -> Parts | None:
    """Where a symlink at ``link`` points, as parts from the root; None when it leaves the root.

    Resolved by text: every component the result names is later opened with O_NOFOLLOW, so no
    symlink along the way can make the kernel's answer differ from this one.
    """
    if target.startswith("/"):
        for base in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
            rel = os.path.relpath(os.path.normpath(target), base)
            if rel != ".." and not rel.startswith("../"):
                return () if rel == "." else tuple(rel.split("/"))
        return None
    out: list[str] = list(link[:-1])
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(part)
    return tuple(out)
