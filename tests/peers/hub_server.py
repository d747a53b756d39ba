"""A loopback Hugging Face Hub for tests, e2e runs and benchmarks: real HTTP, real faults.

It speaks the subset of the Hub protocol that ``huggingface_hub`` and the agent's hub source use:

    GET  /api/models/{org}/{name}/revision/{rev}            -> {"id", "sha", "siblings"}
    GET  /api/models/{org}/{name}/tree/{rev}?recursive=true  -> files and folders, paged with Link: rel="next"
    HEAD /{org}/{name}/resolve/{rev}/{path}                  -> ETag, X-Repo-Commit, X-Linked-Etag/-Size
    GET  /{org}/{name}/resolve/{rev}/{path}                  -> bytes (Range), or 302 to the CDN for LFS files
    GET  {cdn}/cdn/{sha256}?sig=...                          -> bytes (Range), on a second port (another origin)

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the Hub sends
them. No Xet headers are ever advertised. Every request is logged (origin, method, path, Range, status,
bytes sent) and faults are injected per test with ``add_fault`` (status bursts, 429 + Retry-After,
a connection cut mid-body, a stall, a same-size corrupted body).

Usage::

    with HubServer(token="hf_secret") as hub:
        commit = hub.add_repo("org/model", model_dir, refs=("main",), tags=("v1.0",))
        ... HF_ENDPOINT=hub.url ...
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlencode

from aiohttp import web

from agent.core.plan import guess_algo
from agent.modelgen import fake_commit, file_digests

FaultKind = Literal["status", "cut", "stall", "corrupt", "norange"]
Origin = Literal["hub", "cdn"]
CHUNK = 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class ServedFile:
    """One file of a commit: where its bytes live and the ids the Hub would publish for it."""

    path: str
    source: Path
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for LFS files), the tree listing's "oid"
    sha256: str | None  # set for LFS files

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, ServedFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    cdn: bool = False


@dataclass
class Fault:
    """A misbehaviour applied to the next ``count`` matching requests.

    ``path`` is an fnmatch pattern over the decoded URL path (e.g. ``*/resolve/*config.json``).
    ``status``: answer ``status`` with ``headers`` instead. ``cut``: send ``after`` body bytes then drop the
    connection. ``stall``: send ``after`` bytes then go silent for ``seconds``. ``corrupt``: flip one byte
    of a body of at least 2 bytes (same size). ``norange``: ignore the Range header and send the whole file
    with 200 (as some proxies do). ``range_start`` restricts to requests whose Range starts there.
    """

    kind: FaultKind
    path: str = "*"
    count: int = 1
    origin: Origin | None = None
    method: str | None = None
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0
    seconds: float = 30.0
    range_start: int | None = None
    echo_auth: bool = False  # the error message repeats the request's Authorization header, as some proxies do
    fired: int = 0


@dataclass
class RequestRecord:
    origin: Origin
    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int = 0
    range: str | None = None
    body_start: int | None = None  # first byte offset of the body served
    bytes_sent: int = 0
    fault: FaultKind | None = None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def _digest_of(rel: str, disk: Path) -> tuple[str, str, int]:
    data = disk.read_bytes()
    if guess_algo(rel, len(data)) == "sha256":
        return "sha256", hashlib.sha256(data).hexdigest(), len(data)
    return "git-sha1", git_blob_sha1(data), len(data)


def parse_range(value: str | None, size: int) -> tuple[int, int] | Literal["bad"] | None:
    """Single 'bytes=a-b' / 'a-' / '-n' range -> inclusive (start, end), None for no range, 'bad' for 416."""
    if not value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    a, _, b = spec.strip().partition("-")
    if a == "":
        n = int(b)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else "bad"
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size or end < start:
        return "bad"
    return start, min(end, size - 1)


class HubServer:
    """Hub endpoints on one port, a CDN on another; started in a background thread with its own loop."""

    def __init__(self, *, token: str | None = None, page_size: int = 1000, host: str = "127.0.0.1") -> None:
        self.token = token
        self.page_size = page_size
        self.host = host
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[RequestRecord] = []
        self._mu = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.cdn_port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{self.host}:{self.cdn_port}"

    def start(self) -> HubServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="hub-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(10)
        return self

    async def _start(self) -> None:
        for origin in ("hub", "cdn"):
            app = web.Application(client_max_size=1024**2)
            app.router.add_route("*", "/{tail:.*}", self._handle_hub if origin == "hub" else self._handle_cdn)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
            await runner.setup()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            site = web.SockSite(runner, sock)
            await site.start()
            port = sock.getsockname()[1]
            if origin == "hub":
                self.port = port
            else:
                self.cdn_port = port
            self._runners.append(runner)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def _stop() -> None:
            for r in self._runners:
                await r.cleanup()
            current = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not current]
            for t in pending:  # stalled handlers still sleeping
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content -----------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, src: Path, *, refs: Iterable[str] = ("main",), tags: Iterable[str] = (),
        gated: bool = False, cdn: bool = False, commit: str | None = None, extra: dict[str, Path] | None = None,
    ) -> str:
        """Serve the files under ``src`` as a new commit of ``repo_id``; branches and tags point at it.

        ``extra`` adds repo paths served from other files, for listings no folder can hold (``conf`` and
        ``conf/inner.json``: a path that is both a file and a folder).
        """
        files: dict[str, ServedFile] = {}
        digests = file_digests(src)
        for rel, disk in (extra or {}).items():
            digests[rel] = _digest_of(rel, disk)
        for rel, (algo, digest, size) in digests.items():
            if algo == "sha256":
                oid = git_blob_sha1(lfs_pointer(digest, size))
                files[rel] = ServedFile(rel, (extra or {}).get(rel, src / rel), size, oid, digest)
            else:
                files[rel] = ServedFile(rel, (extra or {}).get(rel, src / rel), size, digest, None)
        commit = commit or fake_commit(((p, f.etag) for p, f in files.items()), salt=repo_id)
        with self._mu:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.gated = repo.gated or gated
            repo.cdn = repo.cdn or cdn
            repo.commits[commit] = files
            for ref in (*refs, *tags):
                repo.refs[ref] = commit
        return commit

    def files(self, repo_id: str, commit: str) -> dict[str, ServedFile]:
        return self.repos[repo_id].commits[commit]

    # -- faults and log ----------------------------------------------------------------------------

    def add_fault(self, kind: FaultKind, path: str = "*", **kw: object) -> Fault:
        fault = Fault(kind, path, **kw)  # type: ignore[arg-type]
        with self._mu:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._mu:
            self.faults.clear()
            self.log.clear()

    def requests(self, origin: Origin | None = None, method: str | None = None,
                 path: str = "*") -> list[RequestRecord]:
        with self._mu:
            return [r for r in self.log if (origin is None or r.origin == origin)
                    and (method is None or r.method == method) and fnmatch.fnmatchcase(r.path, path)]

    def _take_fault(self, rec: RequestRecord, kinds: tuple[FaultKind, ...], body_len: int = 0,
                    start: int | None = None) -> Fault | None:
        with self._mu:
            for f in self.faults:
                if f.kind not in kinds or f.fired >= f.count:
                    continue
                if f.origin not in (None, rec.origin) or f.method not in (None, rec.method):
                    continue
                if not fnmatch.fnmatchcase(rec.path, f.path):
                    continue
                if f.range_start is not None and f.range_start != start:
                    continue
                if f.kind == "corrupt" and body_len < 2:
                    continue
                if f.kind in ("cut", "stall") and body_len <= f.after:
                    continue
                f.fired += 1
                rec.fault = f.kind
                return f
        return None

    def _record(self, origin: Origin, request: web.Request) -> RequestRecord:
        rec = RequestRecord(origin, request.method, unquote(request.path), request.query_string,
                            {k.lower(): v for k, v in request.headers.items()}, range=request.headers.get("Range"))
        with self._mu:
            self.log.append(rec)
        return rec

    # -- handlers ----------------------------------------------------------------------------------

    def _error(self, rec: RequestRecord, status: int, code: str | None, message: str,
               headers: dict[str, str] | None = None) -> web.Response:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        rec.status = status
        return web.json_response({"error": message}, status=status, headers=h)

    def _authorized(self, repo: Repo, request: web.Request) -> bool:
        return not repo.gated or (self.token is not None
                                  and request.headers.get("Authorization") == f"Bearer {self.token}")

    async def _handle_hub(self, request: web.Request) -> web.StreamResponse:
        rec = self._record("hub", request)
        fault = self._take_fault(rec, ("status",))
        if fault is not None:
            echo = f"; you sent Authorization: {request.headers.get('Authorization')}" if fault.echo_auth else ""
            return self._error(rec, fault.status, None, f"injected {fault.status}{echo}", fault.headers)
        stall = self._take_fault(rec, ("stall",), 1) if rec.path.startswith("/api/") else None
        if stall is not None:
            await asyncio.sleep(stall.seconds)  # an API that accepts the request and never answers (in time)
        parts = [unquote(p) for p in request.raw_path.split("?", 1)[0].split("/")[1:]]
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
            repo_id, op, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
            if op == "revision" and rest:
                return self._revision(rec, request, repo_id, "/".join(rest))
            if op == "tree" and rest:
                return self._tree(rec, request, repo_id, rest[0], "/".join(rest[1:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return await self._resolve(rec, request, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._error(rec, 404, None, "no such endpoint")

    def _lookup(self, rec: RequestRecord, request: web.Request, repo_id: str,
                rev: str) -> tuple[Repo, str] | web.Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(rec, 404, "RepoNotFound", "Repository not found")
        if not self._authorized(repo, request):
            return self._error(rec, 401, "GatedRepo",
                               f"Access to model {repo_id} is restricted. You must be authenticated to access it.")
        commit = rev if rev in repo.commits else repo.refs.get(rev)
        if commit is None:
            return self._error(rec, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, commit

    def _revision(self, rec: RequestRecord, request: web.Request, repo_id: str, rev: str) -> web.Response:
        found = self._lookup(rec, request, repo_id, rev)
        if isinstance(found, web.Response):
            return found
        repo, commit = found
        rec.status = 200
        return web.json_response({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "sha": commit, "private": False, "gated": "auto" if repo.gated else False, "disabled": False,
            "tags": [], "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])],
        })

    def _tree(self, rec: RequestRecord, request: web.Request, repo_id: str, rev: str, sub: str) -> web.Response:
        found = self._lookup(rec, request, repo_id, rev)
        if isinstance(found, web.Response):
            return found
        repo, commit = found
        files = repo.commits[commit]
        recursive = request.query.get("recursive", "false").lower() in ("true", "1")
        prefix = f"{sub}/" if sub else ""
        dirs: set[str] = set()
        for p in files:
            if p.startswith(prefix):
                segs = p[len(prefix):].split("/")[:-1]
                for i in range(1, len(segs) + 1):
                    dirs.add(prefix + "/".join(segs[:i]))
        items: list[dict[str, object]] = []
        for d in sorted(dirs):
            if recursive or "/" not in d[len(prefix):]:
                tree_id = hashlib.sha1(f"{commit}:{d}".encode()).hexdigest()
                items.append({"type": "directory", "oid": tree_id, "size": 0, "path": d})
        for p, f in sorted(files.items()):
            if not p.startswith(prefix) or (not recursive and "/" in p[len(prefix):]):
                continue
            item: dict[str, object] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
            if f.sha256:
                item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.sha256, f.size))}
            items.append(item)
        items.sort(key=lambda i: str(i["path"]))
        cursor = int(request.query.get("cursor", "0"))
        page = items[cursor:cursor + self.page_size]
        headers: dict[str, str] = {}
        if cursor + self.page_size < len(items):
            q = dict(request.query)
            q["cursor"] = str(cursor + self.page_size)
            base = f"{self.url}/api/models/{repo_id}/tree/{quote(rev, safe='')}" + (f"/{quote(sub)}" if sub else "")
            headers["Link"] = f'<{base}?{urlencode(q)}>; rel="next"'
        rec.status = 200
        return web.json_response(page, headers=headers)

    async def _resolve(self, rec: RequestRecord, request: web.Request, repo_id: str, rev: str,
                       path: str) -> web.StreamResponse:
        found = self._lookup(rec, request, repo_id, rev)
        if isinstance(found, web.Response):
            return found
        repo, commit = found
        f = repo.commits[commit].get(path)
        if f is None:
            return self._error(rec, 404, "EntryNotFound", f"{path} does not exist at {commit}",
                               {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.sha256:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
            if repo.cdn:
                headers["ETag"] = f'"{f.oid}"'
                headers["Location"] = f"{self.cdn_url}/cdn/{f.sha256}?sig={hashlib.sha1(path.encode()).hexdigest()}"
                rec.status = 302
                return web.Response(status=302, headers=headers)
        return await self._send_file(rec, request, f, headers)

    async def _handle_cdn(self, request: web.Request) -> web.StreamResponse:
        rec = self._record("cdn", request)
        fault = self._take_fault(rec, ("status",))
        if fault is not None:
            return self._error(rec, fault.status, None, f"injected {fault.status}", fault.headers)
        parts = request.path.split("/")
        if len(parts) == 3 and parts[1] == "cdn" and "sig=" in request.query_string:
            with self._mu:
                found = [f for r in self.repos.values() for fs in r.commits.values() for f in fs.values()
                         if f.sha256 == parts[2]]
            if found:
                return await self._send_file(rec, request, found[0], {"ETag": f'"{parts[2]}"',
                                                                      "Accept-Ranges": "bytes"})
        return self._error(rec, 404, None, "no such object")

    async def _send_file(self, rec: RequestRecord, request: web.Request, f: ServedFile,
                         headers: dict[str, str]) -> web.StreamResponse:
        rng = parse_range(request.headers.get("Range"), f.size)
        if rng is not None and request.method == "GET" and self._take_fault(rec, ("norange",), f.size):
            rng = None
        if rng == "bad":
            return self._error(rec, 416, None, "range not satisfiable", {"Content-Range": f"bytes */{f.size}"})
        start, end = (0, f.size - 1) if rng is None else rng
        length = max(end - start + 1, 0)
        resp = web.StreamResponse(status=200 if rng is None else 206, headers=headers)
        resp.content_length = length
        if rng is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        rec.status = resp.status
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        rec.body_start = start
        fault = self._take_fault(rec, ("cut", "stall", "corrupt"), length, start)
        await resp.prepare(request)
        limit = length if fault is None or fault.kind == "corrupt" else fault.after
        flip = length // 2 if fault is not None and fault.kind == "corrupt" else -1
        sent = 0
        try:
            with open(f.source, "rb") as fh:
                fh.seek(start)
                while sent < limit:
                    data = fh.read(min(CHUNK, limit - sent))
                    if not data:
                        break
                    if 0 <= flip - sent < len(data):
                        b = bytearray(data)
                        b[flip - sent] ^= 0xFF
                        data = bytes(b)
                    await resp.write(data)
                    sent += len(data)
                    rec.bytes_sent = sent
        except ConnectionError:  # the client went away (a killed downloader, a timeout): normal here
            return resp
        if fault is not None and fault.kind in ("cut", "stall"):
            if fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` until true (server-side effects land a moment after the client returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def tree_json(server: HubServer, repo_id: str, commit: str) -> str:
    """The listing as huggingface_hub 2.x caches it (for debugging a layout comparison)."""
    files = server.files(repo_id, commit)
    data = {"format_version": 1, "files": {
        p: ({"size": f.size, "blob_id": f.oid, "lfs_sha256": f.sha256, "lfs_size": f.size} if f.sha256
            else {"size": f.size, "blob_id": f.oid}) for p, f in sorted(files.items())}}
    return json.dumps(data, indent=1)


def main(argv: list[str] | None = None) -> None:
    """Serve model folders until killed, for e2e scripts in other processes:

        python -m tests.peers.hub_server --repo org/name=DIR [--repo ...] [--tag v1.0] [--token T] [--cdn]

    Prints one JSON line ``{"url": ..., "cdn_url": ..., "commits": {repo: commit}}`` once ready.
    """
    import argparse
    import signal

    ap = argparse.ArgumentParser(description="loopback Hugging Face Hub for tests")
    ap.add_argument("--repo", action="append", required=True, help="org/name=DIR (repeatable)")
    ap.add_argument("--tag", action="append", default=[], help="extra ref for every repo (repeatable)")
    ap.add_argument("--token", default=None, help="repos become gated behind this Bearer token")
    ap.add_argument("--cdn", action="store_true", help="redirect LFS downloads to the CDN origin")
    ap.add_argument("--page-size", type=int, default=1000)
    args = ap.parse_args(argv)
    server = HubServer(token=args.token, page_size=args.page_size).start()
    commits = {}
    for spec in args.repo:
        repo_id, _, src = spec.partition("=")
        commits[repo_id] = server.add_repo(repo_id, Path(src), tags=args.tag, gated=args.token is not None,
                                           cdn=args.cdn)
    print(json.dumps({"url": server.url, "cdn_url": server.cdn_url, "commits": commits}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
