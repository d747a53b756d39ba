"""Loopback ports for test peers: one free port, or a free pair (a BitTorrent port and its index on +1)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (also what a test wants for "connection refused")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """A port whose successor is free too: the peers source's BitTorrent port, its torrent index on +1."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")
