"""Keep credentials out of everything a person or a file can see (pure: strings in, strings out).

Credentials reach the agent in three shapes, and each leaks in its own way:

- userinfo in an endpoint URL (``HF_ENDPOINT=http://user:pass@mirror``): shown wherever the URL is
  (source labels, manifests, ``HTTP Request:`` lines, library error messages);
- an ``Authorization`` header value (``Bearer hf_...``, ``Basic dXNlcjpwYXNz``): echoed back in
  error bodies by some proxies and mirrors;
- a bare token (``hf_...``) pasted into a message by a library.

``strip_userinfo`` is for URLs we show or store on purpose; ``redact`` is the backstop applied to
every message and log line. Both are idempotent and leave text without secrets unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# scheme://userinfo@host: userinfo runs up to the last '@' before the path (passwords may hold '@' unescaped)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"<>]+(?:@[^/\s@?#'\"<>]+)*)@")
# Authorization: <scheme> <credentials> in headers, JSON, reprs; also a bare "Bearer <token>"
_AUTH_HEADER = re.compile(
    r"(?P<key>\b(?:proxy-)?authorization\b['\"]?\s*[:=]\s*['\"]?)(?P<scheme>(?:Bearer|Basic|Token|Digest|Negotiate)\s+)?(?P<value>[^\s'\",;}]+)",
    re.IGNORECASE,
)
_AUTH_SCHEME = re.compile(r"(?P<scheme>\b(?:Bearer|Basic)\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})")
# Hugging Face user and org tokens (hf_ + at least 20 alphanumerics), as the Hub issues them
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def strip_userinfo(url: str) -> str:
    """``http://user:pass@host:8080/x`` -> ``http://host:8080/x``; anything else is returned as is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if not parts.netloc or "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask URL userinfo, Authorization values, Hub tokens and every string in ``secrets``."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['key']}{m['scheme'] or ''}{MASK}", text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m['scheme']}{MASK}", text)
    return _HF_TOKEN.sub(MASK, text)
