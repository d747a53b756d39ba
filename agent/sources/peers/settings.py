"""Settings of the peers source, parsed once by ``agent.config`` (no libtorrent import here).

Ports: BitTorrent listens on ``port`` (TCP only: uTP is off); the torrent index (HTTP, metadata only)
listens on ``port + 1``. ``--peer HOST:PORT`` names a peer's BitTorrent port; its index is at PORT+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

DEFAULT_P2P_PORT = 6881
INDEX_PORT_OFFSET = 1
DISK_IO = ("pread", "posix", "mmap")


@dataclass(frozen=True)
class PeerAddr:
    host: str
    port: int  # BitTorrent (TCP)
    index_port: int  # torrent index (HTTP)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_peer_addr(value: str, field_name: str = "--peer") -> PeerAddr:
    """'HOST:PORT' or '[v6]:PORT' -> PeerAddr (index at PORT+1)."""
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65535:
        raise ConfigError(f"{field_name} {value!r}: expected HOST:PORT with a port in 1..65534")
    port = int(port_text)
    return PeerAddr(host, port, port + INDEX_PORT_OFFSET)


@dataclass(frozen=True)
class PeerSettings:
    """One libtorrent session per agent; rates in bytes/s (0: unlimited)."""

    listen_host: str = "0.0.0.0"
    port: int = DEFAULT_P2P_PORT  # 0: any free port (tests)
    index_port: int | None = None  # None: port + 1; 0: any free port (tests)
    peers: tuple[PeerAddr, ...] = ()  # static peers (file mode)
    upload_rate: int = 0
    download_rate: int = 0
    origin_concurrency: int = 2  # nodes per model that fetch from the configured sources at once
    slots_dir: Path | None = None  # shared dir for file-mode origin slots (flock); None: this process only
    disk_io: str = "pread"  # libtorrent disk backend: pread | posix | mmap (see bench/fill_peers.py)
    seed_verify: bool = False  # SHA-1 every piece before serving it, even from blobs the store vouches for
    stall_timeout: float = 30.0  # seconds without a new verified piece before the swarm is given up
    holder_wait: float = 3600.0  # longest wait for another node's origin fill before retrying later
    poll_interval: float = 0.5  # index polling while another node holds the origin slot

    def __post_init__(self) -> None:
        if self.disk_io not in DISK_IO:
            raise ConfigError(f"p2p disk I/O {self.disk_io!r}: use one of {', '.join(DISK_IO)}")
        if self.origin_concurrency < 1:
            raise ConfigError(f"--origin-concurrency: {self.origin_concurrency} must be >= 1")
        if not 0 <= self.port < 65535:
            raise ConfigError(f"--p2p-port: {self.port} is not a port")
        for name in ("upload_rate", "download_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"p2p {name}: must be >= 0")

    @property
    def bound_index_port(self) -> int:
        if self.index_port is not None:
            return self.index_port
        return self.port + INDEX_PORT_OFFSET if self.port else 0
