"""The torrent index: which files of a snapshot a node serves, and the info dict of each file's torrent.

A v1 info-hash covers the piece hashes, so it cannot be derived from the plan alone; a node that
holds a file (published, or verified in staging while the rest of its fill goes on) serves its info
dict over plain HTTP, keyed by the file key that every node derives from trusted metadata::

    GET /p2p/v1/files/<commit key, 64 hex> -> 200 text/plain: the file keys served for that (repo, commit),
                                              one per line (empty: none yet)
    GET /p2p/v1/info/<file key, 64 hex>    -> 200 application/x-bittorrent (the bencoded info dict) | 404

Nothing here is trusted: the caller checks the info dict against its own layout (``check_info``) and
every file against the plan's digest after download. The server serves metadata only (no file
bytes, no paths of this node), so it cannot be used to read anything outside the torrents.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from agent.sources.peers.settings import PeerAddr

INFO_PATH = re.compile(r"^/p2p/v1/info/([0-9a-f]{64})$")
FILES_PATH = re.compile(r"^/p2p/v1/files/([0-9a-f]{64})$")
KEY = re.compile(r"^[0-9a-f]{64}$")
MAX_LISTING_BYTES = 4 * 1024 * 1024  # 65 bytes a file: 64k files
MAX_INFO_BYTES = 16 * 1024 * 1024  # 1 TB with 1 MiB pieces is 20 MB... with our piece rule, far below this


class _Handler(BaseHTTPRequestHandler):
    server: IndexServer

    def do_GET(self) -> None:
        if m := FILES_PATH.match(self.path):
            keys = self.server.listing(m.group(1))
            self._reply("text/plain", "".join(k + "\n" for k in keys).encode())
            return
        m = INFO_PATH.match(self.path)
        info = self.server.lookup(m.group(1)) if m else None
        if info is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._reply("application/x-bittorrent", info)

    def _reply(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class IndexServer(ThreadingHTTPServer):
    """Serves the file keys this node shares per snapshot (``listing``) and their info dicts (``lookup``)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, lookup: Callable[[str], bytes | None],
                 listing: Callable[[str], list[str]]) -> None:
        self.lookup = lookup
        self.listing = listing
        super().__init__((host, port), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="p2p-index", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> IndexServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


def _get(peer: PeerAddr, path: str, limit: int, timeout: float) -> bytes | None:
    conn = http.client.HTTPConnection(peer.host, peer.index_port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        length = int(resp.getheader("Content-Length") or -1)
        if not 0 <= length <= limit:
            return None
        data = resp.read(length)
        return data if len(data) == length else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def fetch_info(peer: PeerAddr, key: str, *, timeout: float = 2.0) -> bytes | None:
    """The info dict ``peer`` serves for file ``key``; None when it has none or cannot be reached."""
    data = _get(peer, f"/p2p/v1/info/{key}", MAX_INFO_BYTES, timeout)
    return data or None


def fetch_listing(peer: PeerAddr, commit_key: str, *, timeout: float = 2.0) -> set[str] | None:
    """The file keys ``peer`` serves for a snapshot; None when it cannot be reached. Malformed lines are dropped."""
    data = _get(peer, f"/p2p/v1/files/{commit_key}", MAX_LISTING_BYTES, timeout)
    if data is None:
        return None
    return {line for line in data.decode("ascii", "replace").splitlines() if KEY.match(line)}
