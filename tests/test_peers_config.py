"""Settings of the peers source: flags, env and config file, and every bad value named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import load_run_settings
from agent.errors import ConfigError
from agent.sources.base import SourceRef, SourceSettings, parse_source_ref
from agent.sources.factory import open_source, open_sources
from agent.sources.peers.settings import PeerAddr, PeerSettings, parse_peer_addr
from agent.sources.peers.slots import SlottedSource
from agent.sources.peers.source import PeerSource


def run_args(*extra: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["run", "--no-kubernetes", "--models-file", "m.yaml", "--cache-dir", "/tmp/x",
                                      *extra])


def test_flags_win_over_env_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("peers: ['10.0.0.9:7000']\np2pPort: 7100\np2pUploadRate: 1G\noriginConcurrency: 3\n")
    s = load_run_settings(run_args("--config", str(cfg), "--source", "peers", "--source", "hub",
                                   "--peer", "10.0.0.1:6881", "--peer", "[fd00::2]:6881",
                                   "--p2p-download-rate", "200M"),
                          {"MODEL_CACHE_P2P_PORT": "7200"})
    p = s.source_settings.peers
    assert p is not None
    assert p.peers == (PeerAddr("10.0.0.1", 6881, 6882), PeerAddr("fd00::2", 6881, 6882))
    assert (p.port, p.upload_rate, p.download_rate, p.origin_concurrency) == (7200, 1 << 30, 200 << 20, 3)
    assert [r.kind for r in s.sources] == ["peers", "hub"]
    env_only = load_run_settings(run_args("--source", "peers", "--source", "hub"),
                                 {"MODEL_CACHE_PEERS": "a:1,b:2"}).source_settings.peers
    assert env_only is not None and [str(x) for x in env_only.peers] == ["a:1", "b:2"]
    assert env_only.port == 6881 and env_only.bound_index_port == 6882


@pytest.mark.parametrize(("value", "needle"), [
    ("nohost", "--peer 'nohost': expected HOST:PORT"), ("h:0", "expected HOST:PORT"), ("h:65535", "expected HOST:PORT"),
    (":6881", "expected HOST:PORT"), ("h:x", "expected HOST:PORT"),
])
def test_bad_peer_addresses_are_named(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        parse_peer_addr(value)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="--p2p-upload-rate"):
        load_run_settings(run_args("--source", "hub", "--p2p-upload-rate", "fast"), {})
    with pytest.raises(ConfigError, match="--origin-concurrency"):
        load_run_settings(run_args("--source", "hub", "--origin-concurrency", "0"), {})
    with pytest.raises(ConfigError, match="disk I/O 'aio'"):
        PeerSettings(disk_io="aio")


def test_source_ref_and_factory(tmp_path: Path) -> None:
    assert parse_source_ref("peers") == SourceRef("peers")
    with pytest.raises(ConfigError, match="peers takes no argument"):
        parse_source_ref("peers:1.2.3.4")
    with pytest.raises(ConfigError, match="built with its origins"):
        open_source(SourceRef("peers"), SourceSettings())
    srcs = open_sources([SourceRef("peers"), SourceRef("pvc", str(tmp_path))],
                        SourceSettings(peers=PeerSettings(port=0, index_port=0, listen_host="127.0.0.1")))
    try:
        peer, pvc = srcs
        assert isinstance(peer, PeerSource) and isinstance(pvc, SlottedSource)
        assert pvc.kind == "pvc" and pvc.label == f"pvc:{tmp_path}" and peer.origins == [pvc.inner]
        assert pvc.gate is peer.service.gate
    finally:
        for s in srcs:
            s.close()
