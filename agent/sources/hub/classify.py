"""HTTP answers and library exceptions from the Hub, turned into the agent's error classes.

One mapping for every path (metadata through huggingface_hub, bytes through our client, the
hf_transfer child's last words), so a 404 means "not found" and a 503 "try again" everywhere, and
every message goes through ``redact``: a mirror that echoes our ``Authorization`` header, or a
library that prints a URL with userinfo, never puts a credential into an error.
"""

from __future__ import annotations

import httpx2

from agent.errors import AgentError, AuthError, NotFoundError, ProtocolError, SourceError, TransientSourceError
from agent.log import redact_text
from agent.sources.hub._hf import HfHubHTTPError, OfflineModeIsEnabled

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_NOT_FOUND = {"RepoNotFound": "repository not found", "RevisionNotFound": "revision not found",
              "EntryNotFound": "file not found"}


def retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds from a ``Retry-After: N`` header (the retry policy caps it); None for absent or a date."""
    value = (headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def http_error(status: int, error_code: str | None, where: str, *, has_token: bool,
               retry_after: float | None = None, detail: str = "") -> SourceError:
    """One place that turns an HTTP status (+ the Hub's X-Error-Code) into our error classes."""
    extra = f": {redact_text(detail)}" if detail else ""
    where = redact_text(where)
    if status in (401, 403):
        hint = ("the configured token was refused (no access to this gated/private repo?)" if has_token else
                "no token is configured (--token-file / HF_TOKEN / Secret): the repo is gated, private "
                "or does not exist")
        return AuthError(f"{where}: HTTP {status}, {hint}{extra}")
    if status == 404:
        return NotFoundError(f"{where}: {_NOT_FOUND.get(error_code or '', 'not found')} (HTTP 404){extra}")
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientSourceError(f"{where}: HTTP {status}{extra}", retry_after=retry_after)
    return SourceError(f"{where}: HTTP {status}{extra}", permanent=True, reason=f"http_{status}")


def classify(exc: BaseException, where: str, *, has_token: bool) -> BaseException:
    """A library exception as one of ours (chained); our own errors pass through unchanged."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        r = exc.response
        err: AgentError = http_error(r.status_code, r.headers.get("X-Error-Code"), where, has_token=has_token,
                                     retry_after=retry_after(r.headers), detail=r.headers.get("X-Error-Message") or "")
    elif isinstance(exc, OfflineModeIsEnabled):
        err = SourceError(f"{redact_text(where)}: HF_HUB_OFFLINE is set, the Hub cannot be reached", reason="offline")
    elif isinstance(exc, httpx2.TransportError):
        err = TransientSourceError(redact_text(f"{where}: {type(exc).__name__}: {exc}"))
    else:
        err = ProtocolError(redact_text(f"{where}: {type(exc).__name__}: {exc}"))
    err.__cause__ = exc
    return err


class Abandoned(AgentError):
    """Another file of the same fill failed, or the source is closing: this file stops quietly."""
