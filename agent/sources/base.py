"""The one interface every source implements, and the ``--source`` syntax.

A source first *resolves* a request to a ``ModelPlan`` pinned to one commit (with expected digests
where it knows them), then *fetches* the files the store still needs into a ``Fill``. The store does
the verification and publishing, so a source only moves bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.retry import RetryPolicy, retry_call
from agent.core.spec import FileFilter
from agent.errors import Cancelled, ConfigError, SourceError
from agent.sources.peers.settings import PeerSettings

T = TypeVar("T")


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
        """Deliver every entry into ``fill`` (``open`` + ``complete``, or ``adopt``)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceSettings:
    """Everything sources need from configuration, read once by ``agent.config`` (no env reads here)."""

    hf_endpoint: str | None = None  # HF_ENDPOINT (a mirror); None means huggingface.co
    hf_token: str | None = None  # already read from --token-file / HF_TOKEN / mounted Secret; never logged
    mx_address: str | None = None  # MX_SERVER_ADDRESS or MODEL_EXPRESS_URL when --source modelexpress has no ADDR
    mx_token_file: str | None = "/var/run/secrets/tokens/modelexpress"  # projected SA token, re-read on rotation
    timeout: float = 30.0  # seconds without progress before a connection counts as dead
    max_workers: int = 4  # files fetched at once
    # transient failures: attempts in all, waits 0.5, 1, 2, 4 s (+-25 %); a server's Retry-After wins (<= 300 s)
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=5, base=0.5, cap=8.0, jitter=0.25))
    peers: PeerSettings | None = None  # the peers source (--p2p-port, --peer, rates); None: defaults


def retryable(err: BaseException) -> bool:
    """What a source retries: its own non-permanent errors only. A full disk (``DiskFullError``) goes up
    to the loop, which can evict; a stop (``Cancelled``) ends the fill."""
    return isinstance(err, SourceError) and not err.permanent


def stop_wait(first: threading.Event, *more: threading.Event, tick: float = 0.1) -> Callable[[float], bool]:
    """A ``retry_call`` wait that ends early, returning True, once any of ``events`` is set.

    A fill's stop, the source's own stop (SIGTERM) and ``close()`` are separate events and an Event
    cannot wait on several, so this checks them every ``tick`` seconds: a 300 s Retry-After is cut
    short within ``tick`` of a stop.
    """

    events = (first, *more)

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not any(e.is_set() for e in events):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            first.wait(min(left, tick))
        return True

    return wait


def retry_source_call(
    op: Callable[[], T], *, policy: RetryPolicy, what: str, stop: threading.Event, fill: Fill | None = None,
    also: Sequence[threading.Event] = (), wait: Callable[[float], bool] | None = None,
    classify: Callable[[BaseException], BaseException] | None = None, progressed: Callable[[], bool] | None = None,
) -> T:
    """``retry_call`` as every source uses it: its own transient errors retried under ``policy``, and any wait
    ended by the fill's stop, the agent's ``stop`` or ``also`` (a source closing). Stopped, it raises
    ``Cancelled`` (the fill's, or the agent's) rather than the last transient error."""
    events = [e for e in (fill.stop if fill else None, *also, stop) if e is not None]
    try:
        return retry_call(op, policy=policy, what=what, retryable=retryable, classify=classify,
                          progressed=progressed, wait=wait or stop_wait(*events))
    except SourceError as e:
        if fill is not None:
            fill.check_stop()
        if stop.is_set():
            raise Cancelled(f"{what}: stopped while waiting to retry ({e})") from e
        raise


@dataclass(frozen=True)
class SourceRef:
    """A parsed ``--source`` value: 'pvc:PATH', 'hub', 'modelexpress[:ADDR]', 'peers'."""

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
    if kind == "peers":
        if arg:
            raise ConfigError(f"--source {value!r}: peers takes no argument (use --peer HOST:PORT, --p2p-port)")
        return SourceRef("peers")
    raise ConfigError(
        f"--source {value!r}: unknown source type {kind!r} (use pvc:PATH, hub, modelexpress[:ADDR], peers)")
