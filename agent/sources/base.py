"""The one interface every source implements, and the ``--source`` syntax.

A source first *resolves* a request to a ``ModelPlan`` pinned to one commit (with expected digests
where it knows them), then *fetches* the files the store still needs into a ``Fill``. The store does
the verification and publishing, so a source only moves bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.cache.store import Fill
from agent.errors import ConfigError
from agent.plan import FileEntry, ModelPlan
from agent.spec import FileFilter


class Progress(Protocol):
    """Byte-level progress sink (a TTY bar, periodic log lines, or the agent's status)."""

    def start(self, total_bytes: int, files: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def start(self, total_bytes: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


class Source(Protocol):
    kind: str  # "pvc" | "hub" | "modelexpress" | "peers"

    @property
    def label(self) -> str:
        """Human name for logs, metrics and status, e.g. 'pvc:/mnt/shared'. Never contains a secret."""
        ...

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        """Pin ``revision`` to a commit and list the selected files (raises NotFoundError etc.)."""
        ...

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        """Deliver every entry into ``fill`` (``open``/``write_stream``/``adopt`` then ``complete``)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceRef:
    """A parsed ``--source`` value: 'pvc:PATH', 'hub', 'modelexpress[:ADDR]'."""

    kind: str
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_source_ref(value: str) -> SourceRef:
    kind, _, arg = value.partition(":")
    kind = kind.strip()
    if kind == "pvc":
        if not arg:
            raise ConfigError(f"--source {value!r}: pvc needs a path, e.g. pvc:/mnt/shared/huggingface")
        return SourceRef("pvc", arg)
    if kind == "hub":
        if arg:
            raise ConfigError(f"--source {value!r}: hub takes no argument (set HF_ENDPOINT for a mirror)")
        return SourceRef("hub")
    if kind == "modelexpress":
        return SourceRef("modelexpress", arg)
    raise ConfigError(f"--source {value!r}: unknown source type {kind!r} (use pvc:PATH, hub, modelexpress[:ADDR])")
