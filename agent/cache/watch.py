"""Changes under hub/ mark a model dirty for an immediate re-check (Linux inotify, no polling).

Only the *fact* of a change crosses into the loop (repo + blob names); the loop decides what it
means by re-checking from disk, so the agent's own writes cannot cause a loop (checks never write).

What is watched, per repo: the repo folder, ``blobs/`` (content: modify, attrib, create, delete,
move), ``refs/`` and every ``snapshots/<commit>/`` folder (symlinks added, removed, replaced).
Reads by workers (open, access, close-nowrite) are not in the mask. A publish swaps a snapshot
folder in whole, so the new folder gets its watches when it appears (a walk of that one tree) and
the old one's vanish with it: a publish costs what the model costs.

Why not watchdog's recursive observer (the one the models-file watch still uses): on every swap it
re-registered every watch of the tree and formatted a warning whose text lists every watched path,
so each publish cost O(cache) CPU and the warning registry grew without bound (measured with
``python -m bench.many_models``: +100 MB RSS and fills 3x slower at 1000 models).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.cache.layout import repo_from_folder_name

log = structlog.get_logger("agent.cache.watch")

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)
DIR_FLAGS = IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
_EVENT = struct.Struct("iIII")


def hub_change(hub: Path, path: str) -> tuple[str, str | None] | None:
    """Map a changed path under hub/ to (repo, blob name or None). Pure; ignores everything else."""
    try:
        rel = Path(path).relative_to(hub)
    except ValueError:
        return None
    parts = rel.parts
    if not parts:
        return None
    repo = repo_from_folder_name(parts[0])
    if repo is None:
        return None
    blob = parts[2] if len(parts) >= 3 and parts[1] == "blobs" else None
    return repo, blob


class _Inotify:
    """The three inotify calls, through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd

    def add(self, path: str, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        try:
            buf = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i + _EVENT.size <= len(buf):
            wd, mask, _cookie, n = _EVENT.unpack_from(buf, i)
            i += _EVENT.size
            name = buf[i:i + n].split(b"\0", 1)[0].decode(errors="surrogateescape")
            i += n
            out.append((wd, mask, name))
        return out

    def close(self) -> None:
        os.close(self.fd)


class HubWatcher:
    """Calls ``on_change(repo, blob_names)`` for changes under hub/; ``on_overflow()`` if events were lost."""

    def __init__(self, hub: Path, on_change: Callable[[str, set[str]], None],
                 on_overflow: Callable[[], None] | None = None) -> None:
        hub.mkdir(parents=True, exist_ok=True)
        self.hub = str(hub)
        self.on_change = on_change
        self.on_overflow = on_overflow or (lambda: None)
        self._ino = _Inotify()
        self._paths: dict[int, str] = {}  # wd -> the folder it watches
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-watcher", daemon=True)
        self.watches_failed = 0  # folders we could not watch (fs.inotify.max_user_watches reached)
        self._watch_tree(self.hub)

    # -- watches -----------------------------------------------------------------------------------

    def _watch(self, path: str) -> None:
        try:
            wd = self._ino.add(path, CHANGES | DIR_FLAGS)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # gone again (a swap in progress): its replacement brings its own event
            self.watches_failed += 1
            log.error("watch.failed", path=path, error=e.strerror,
                      hint="raise fs.inotify.max_user_watches; changes there are found by the periodic check")
            return
        self._paths[wd] = path

    def _watch_tree(self, top: str) -> None:
        """Watch ``top`` and every folder below it that matters (hub, repos, blobs, refs, snapshots)."""
        self._watch(top)
        try:
            entries = list(os.scandir(top))
        except OSError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False) and self._wanted(e.path):
                self._watch_tree(e.path)

    def _wanted(self, path: str) -> bool:
        """Folders below a repo worth watching: blobs, refs, snapshots and anything under those."""
        rel = os.path.relpath(path, self.hub).split(os.sep)
        if len(rel) == 1:
            return repo_from_folder_name(rel[0]) is not None
        return rel[1] in ("blobs", "refs", "snapshots")

    # -- events ------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._ino.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopped.is_set():
            poller.poll()
            if self._stopped.is_set():
                return
            try:
                self._handle(self._ino.read())
            except Exception:  # a bug here must not silently end the watch: log it and go on
                log.exception("watch.handle_failed")

    def _handle(self, events: list[tuple[int, int, str]]) -> None:
        changed: dict[str, set[str]] = {}
        for wd, mask, name in events:
            if mask & IN_Q_OVERFLOW:
                log.warning("watch.overflow", hint="events were lost; every model is re-checked")
                self._watch_tree(self.hub)  # folders made or swapped in meanwhile get their watches now
                self.on_overflow()
                continue
            if mask & IN_IGNORED:
                self._paths.pop(wd, None)  # the folder is gone (deleted, or swapped out and removed)
                continue
            folder = self._paths.get(wd)
            if folder is None:
                continue
            path = os.path.join(folder, name) if name else folder
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and self._wanted(path):
                self._watch_tree(path)  # a new repo, or a snapshot folder swapped in
            hit = hub_change(Path(self.hub), path)
            if hit is not None:
                repo, blob = hit
                blobs = changed.setdefault(repo, set())
                if blob:
                    blobs.add(blob)
        for repo, blobs in changed.items():
            self.on_change(repo, blobs)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubWatcher:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def watched(self) -> int:
        return len(self._paths)

    def stop(self) -> None:
        self._stopped.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._ino.close()
