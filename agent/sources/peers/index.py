"""The torrent index: how a node without the bytes gets the info dict of a (repo, commit, file set).

A v1 info-hash covers the piece hashes, so it cannot be derived from the plan alone; a node that
holds (or is downloading) the torrent serves its info dict over plain HTTP, keyed by the plan key
that every node derives from trusted metadata::

    GET /p2p/v1/info/<plan key, 64 hex>   -> 200 application/x-bittorrent (the bencoded info dict) | 404

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
MAX_INFO_BYTES = 16 * 1024 * 1024  # 1 TB with 1 MiB pieces is 20 MB... with our piece rule, far below this


class _Handler(BaseHTTPRequestHandler):
    server: IndexServer

    def do_GET(self) -> None:
        m = INFO_PATH.match(self.path)
        info = self.server.lookup(m.group(1)) if m else None
        if info is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-bittorrent")
        self.send_header("Content-Length", str(len(info)))
        self.end_headers()
        self.wfile.write(info)

    def log_message(self, format: str, *args: object) -> None:
        pass


class IndexServer(ThreadingHTTPServer):
    """Serves info dicts of the torrents this node seeds or downloads, from ``lookup(key)``."""

    daemon_threads = True

    def __init__(self, host: str, port: int, lookup: Callable[[str], bytes | None]) -> None:
        self.lookup = lookup
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


def fetch_info(peer: PeerAddr, key: str, *, timeout: float = 2.0) -> bytes | None:
    """The info dict ``peer`` serves for ``key``; None when it has none or cannot be reached."""
    conn = http.client.HTTPConnection(peer.host, peer.index_port, timeout=timeout)
    try:
        conn.request("GET", f"/p2p/v1/info/{key}")
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        length = int(resp.getheader("Content-Length") or -1)
        if not 0 < length <= MAX_INFO_BYTES:
            return None
        data = resp.read(length)
        return data if len(data) == length else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            conn.close()
