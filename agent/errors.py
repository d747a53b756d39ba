"""One exception tree for the agent.

Library errors are chained with ``from`` so the cause stays visible, while callers only need to
know these classes. ``permanent`` tells retry loops whether trying again can help.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    permanent: bool = True


class ConfigError(AgentError):
    """A setting, flag or environment variable is invalid; the message names it."""


class SpecError(AgentError):
    """A model spec is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsafePathError(AgentError):
    """A relative path from a source would escape its folder (absolute, '..', NUL, backslash...)."""


class SourceError(AgentError):
    """A source could not deliver; ``permanent`` is False when a retry may succeed."""

    def __init__(self, message: str, *, permanent: bool = True, reason: str = "error") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason


class NotFoundError(SourceError):
    """Repo, revision or file does not exist at the source."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True, reason="not_found")


class AuthError(SourceError):
    """The source refused our credentials (401/403, gated or private repo)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True, reason="auth")


class TransientSourceError(SourceError):
    """Connection drop, timeout, 5xx/429, UNAVAILABLE: worth retrying."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, permanent=False, reason="transient")
        self.retry_after = retry_after


class ProtocolError(SourceError):
    """A source sent something that breaks its protocol (bad offsets, wrong commit, unknown file)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True, reason="protocol")


class IntegrityError(AgentError):
    """Content does not match its expected size or digest; names the file."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class CorruptStateError(AgentError):
    """One of the agent's own state files (a manifest, a model record) cannot be read or parsed."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class DiskFullError(AgentError):
    """Not enough free space (checked before writing, or ENOSPC while writing).

    ``shortfall`` is how many more bytes the fill needs, when known, so the loop can evict that much.
    """

    permanent = False

    def __init__(self, message: str, *, shortfall: int = 0) -> None:
        super().__init__(message)
        self.shortfall = shortfall


class Cancelled(AgentError):
    """The fill was asked to stop (SIGTERM, the model was dropped); staged bytes are kept for a resume."""

    permanent = False

    def __init__(self, message: str = "fill stopped", *, reason: str = "stopped") -> None:
        super().__init__(message)
        self.reason = reason


class LockedError(AgentError):
    """Another process holds the repo lock and we were told not to wait."""

    permanent = False


class KubeApiError(AgentError):
    """A Kubernetes API call failed. ``status`` is the HTTP code (0: no response, e.g. connection refused).

    429, 5xx and connection errors are transient; ``retry_after`` carries the server's Retry-After.
    """

    def __init__(
        self, message: str, *, status: int = 0, permanent: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.permanent = permanent
        self.retry_after = retry_after


class KubeConflictError(KubeApiError):
    """409 Conflict: someone else wrote first; re-read and decide again."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, status=409, permanent=False, retry_after=retry_after)
