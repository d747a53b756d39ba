"""The byte client: plain HTTP GETs with Range resume, redirects followed by hand.

Redirects are followed here, not by httpx2, because the token must only ever go to the endpoint's
own origin: a 302 to a CDN drops ``Authorization`` before the next hop. Staging per file:

    files/<id>.part      contiguous prefix of the file -> resumed with ``Range: bytes=N-``
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from urllib.parse import quote, urljoin, urlparse

import httpx2
import structlog

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.errors import IntegrityError, ProtocolError, TransientSourceError
from agent.sources.base import Progress
from agent.sources.hub.classify import Abandoned, http_error, retry_after

log = structlog.get_logger("agent.sources.hub")
MiB = 1024 * 1024
READ_CHUNK = 1 * MiB
MAX_REDIRECTS = 10


def origin(url: str) -> tuple[str, str, int]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme, 0)


def what_of(plan: ModelPlan, entry: FileEntry) -> str:
    return f"{plan.repo}@{plan.commit[:12]}: {entry.path}"


class HubClient:
    """One connection pool to the endpoint (and whatever CDN it redirects to)."""

    def __init__(self, endpoint: str, token: str | None, label: str, *, timeout: float, max_connections: int) -> None:
        self.endpoint = endpoint
        self.label = label
        self._token = token
        self._home = origin(endpoint)
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(timeout), follow_redirects=False,
            limits=httpx2.Limits(max_connections=max_connections),
            headers={"Accept-Encoding": "identity", "User-Agent": "model-cache-agent"},
        )

    def close(self) -> None:
        self._http.close()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def resolve_url(self, plan: ModelPlan, entry: FileEntry) -> str:
        return f"{self.endpoint}/{plan.repo}/resolve/{plan.commit}/{quote(entry.path)}"

    def at_home(self, url: str) -> bool:
        return origin(url) == self._home

    @contextlib.contextmanager
    def request(self, method: str, url: str, what: str, headers: dict[str, str] | None = None,
                stop_at_foreign_redirect: bool = False) -> Iterator[httpx2.Response]:
        """Follow redirects by hand: the token only ever goes to the endpoint's origin.

        With ``stop_at_foreign_redirect`` the first redirect to another origin (a CDN) is returned
        as-is, like huggingface_hub's metadata call: its Location is where the bytes live.
        """
        hdrs = dict(headers or {})
        if self.at_home(url):
            hdrs.update(self.auth())
        for _ in range(MAX_REDIRECTS):
            resp = self._http.send(self._http.build_request(method, url, headers=hdrs), stream=True)
            try:
                if resp.is_redirect and "Location" in resp.headers:
                    target = urljoin(url, resp.headers["Location"])
                    if not self.at_home(target):
                        hdrs.pop("Authorization", None)
                        if stop_at_foreign_redirect:
                            yield resp
                            return
                    url = target
                    continue
                if resp.status_code >= 400:
                    resp.read()
                    raise http_error(resp.status_code, resp.headers.get("X-Error-Code"), f"{what} at {self.label}",
                                     has_token=bool(self._token), retry_after=retry_after(resp.headers),
                                     detail=resp.headers.get("X-Error-Message") or "")
                yield resp
                return
            finally:
                resp.close()
        raise ProtocolError(f"{what} at {self.label}: more than {MAX_REDIRECTS} redirects")

    def locate(self, plan: ModelPlan, entry: FileEntry) -> tuple[str, dict[str, str]]:
        """HEAD the resolve URL: the final byte URL, and the headers it may receive (no token off-origin)."""
        what = what_of(plan, entry)
        with self.request("HEAD", self.resolve_url(plan, entry), what, stop_at_foreign_redirect=True) as resp:
            commit = resp.headers.get("X-Repo-Commit")
            if commit and commit != plan.commit:
                raise ProtocolError(f"{what}: server answered for commit {commit}, expected {plan.commit}")
            size = resp.headers.get("X-Linked-Size") or (None if resp.is_redirect else
                                                          resp.headers.get("Content-Length"))
            if size is not None and size.isdigit() and int(size) != entry.size:
                raise ProtocolError(f"{what}: size {size} at resolve, {entry.size} in the file list")
            final = str(resp.url)
            if resp.is_redirect:
                final = urljoin(final, resp.headers["Location"])
        return final, (self.auth() if self.at_home(final) else {})

    def stream_into(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress, offset: int,
                    abandoned: Callable[[], bool]) -> None:
        """Stream one file into the store, continuing a staged prefix with ``Range: bytes=offset-``.

        Between chunks: the fill's stop (``Cancelled``, staged bytes kept) and ``abandoned()``.
        """
        what = what_of(plan, entry)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.request("GET", self.resolve_url(plan, entry), what, headers) as resp:
            if offset and resp.status_code == 200:
                log.warning("hub.range_ignored", what=what, offset=offset)  # restart from byte 0
                fill.part_path(entry).unlink(missing_ok=True)
                offset = 0
            elif offset and resp.status_code == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != offset:
                    raise ProtocolError(f"{what}: asked for bytes {offset}-, got "
                                        f"{resp.headers.get('Content-Range')!r}")
            writer = fill.open(entry, resume=offset > 0)
            pos = offset
            try:
                for chunk in resp.iter_raw(READ_CHUNK):
                    fill.check_stop()
                    if abandoned():
                        raise Abandoned(entry.path)
                    if pos + len(chunk) > entry.size:
                        raise IntegrityError(entry.path, f"server sent more than the {entry.size} bytes listed")
                    writer.write(chunk)
                    pos += len(chunk)
                    progress.advance(len(chunk))
                if pos < entry.size:
                    raise TransientSourceError(f"{what}: connection closed at byte {pos} of {entry.size}")
                digests = writer.finish()
            finally:
                writer.close()
        fill.complete(entry, digests)
