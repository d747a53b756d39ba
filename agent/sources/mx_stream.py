"""Rules a ModelExpress file stream must follow, checked chunk by chunk on plain values (pure).

``StreamModelFiles`` carries no content hash, so the only defence against a confused or hostile
server is the shape of the stream itself. Every chunk is checked *before* its bytes are written:

- the first chunk names the commit we resolved (later chunks may repeat it, never change it);
- each path is safe (``safe_relpath``) and one we asked for, and arrives at most once;
- files do not interleave: a file starts at offset 0 with the size the listing promised, offsets
  are contiguous, data never runs past ``total_size``, and the file ends with ``is_last_chunk``
  exactly when its bytes are complete (a zero-byte file is a single empty, final chunk);
- ``is_last_file`` comes on the final chunk of the final file and nothing follows it;
- when the stream ends, every requested file was delivered.

The adapter (``agent.sources.modelexpress``) turns each ``Step`` into writer calls; this module
never touches gRPC, protobuf or the disk, so every rule has a unit test of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.cache.layout import safe_relpath
from agent.core.plan import is_hex
from agent.errors import ProtocolError


def check_commit(value: str | None, what: str) -> str:
    """A commit id from the server must be a full lowercase 40-hex id: it becomes a folder name."""
    if value is None or not is_hex(value, 40):
        raise ProtocolError(f"{what} is {value!r}, not a 40-hex commit id")
    return value


def check_listing(files: Iterable[tuple[str, int]], total_size: int) -> dict[str, int]:
    """Validate a ``ListModelFiles`` answer: safe unique paths whose sizes add up to the total."""
    out: dict[str, int] = {}
    for path, size in files:
        safe_relpath(path)
        if path in out:
            raise ProtocolError(f"file list names {path!r} twice")
        out[path] = size
    if sum(out.values()) != total_size:
        raise ProtocolError(f"file list sizes add up to {sum(out.values())}, but total_size is {total_size}")
    return out


@dataclass(frozen=True)
class Step:
    """What the writer side does with one accepted chunk: maybe open ``path``, write, maybe finish it."""

    path: str
    begins: bool
    ends: bool


class StreamValidator:
    """State machine over one ``StreamModelFiles`` response; raise on the first broken rule.

    ``expected`` maps each requested path to its size from the listing; ``commit`` is the commit
    ``EnsureModelDownloaded`` resolved (and the stream was pinned to).
    """

    def __init__(self, expected: Mapping[str, int], commit: str) -> None:
        self.expected = dict(expected)
        self.commit = commit
        self.done: list[str] = []
        self._done_set: set[str] = set()
        self._seen_first = False
        self._current: str | None = None
        self._received = 0
        self._total = 0
        self._finished = False

    def accept(
        self, path: str, offset: int, total_size: int, nbytes: int, *,
        last_chunk: bool, last_file: bool, commit: str | None,
    ) -> Step:
        if self._finished:
            raise ProtocolError(f"chunk for {path!r} arrived after the final-file marker")
        if not self._seen_first:
            if commit is None:
                raise ProtocolError("first chunk carries no commit hash")
            if commit != self.commit:
                raise ProtocolError(f"stream is from commit {commit!r}, but {self.commit} was resolved")
            self._seen_first = True
        elif commit is not None and commit != self.commit:
            raise ProtocolError(f"commit changed mid-stream to {commit!r} (at {path!r})")
        safe_relpath(path)
        if path not in self.expected:
            raise ProtocolError(f"server sent {path!r}, which was not requested")

        begins = self._current != path
        if begins:
            if self._current is not None:
                raise ProtocolError(f"{path!r} started before {self._current!r} was finished")
            if path in self._done_set:
                raise ProtocolError(f"{path!r} sent twice")
            if offset != 0:
                raise ProtocolError(f"{path!r} starts at offset {offset}, not 0")
            if total_size != self.expected[path]:
                raise ProtocolError(f"{path!r} has total_size {total_size}, but the listing said {self.expected[path]}")
            self._current, self._received, self._total = path, 0, total_size
        elif total_size != self._total:
            raise ProtocolError(f"{path!r} changed total_size from {self._total} to {total_size} mid-file")

        if offset != self._received:
            raise ProtocolError(f"{path!r}: chunk at offset {offset}, expected {self._received}")
        if self._received + nbytes > self._total:
            raise ProtocolError(f"{path!r}: data runs past total_size {self._total}")
        if last_file and not last_chunk:
            raise ProtocolError(f"{path!r}: final-file marker on a chunk that does not end the file")
        self._received += nbytes
        if last_chunk:
            if self._received != self._total:
                raise ProtocolError(f"{path!r} ended at {self._received} of {self._total} bytes")
            self.done.append(path)
            self._done_set.add(path)
            self._current = None
            self._finished = last_file
        elif self._received == self._total:
            # Strict like NVIDIA's client: a complete file must say so on its last data chunk.
            raise ProtocolError(f"{path!r} reached {self._total} bytes without the last-chunk marker")
        return Step(path, begins, last_chunk)

    def finish(self) -> None:
        """Call when the stream ends cleanly: it must have said it was done, and delivered everything."""
        if self._current is not None:
            raise ProtocolError(f"stream ended inside {self._current!r} ({self._received} of {self._total} bytes)")
        if not self._finished:
            raise ProtocolError("stream ended without the final-file marker")
        missing = sorted(set(self.expected) - self._done_set)
        if missing:
            raise ProtocolError(f"stream ended without {len(missing)} requested files, e.g. {missing[0]!r}")
