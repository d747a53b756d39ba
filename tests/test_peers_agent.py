"""Two node agents in file mode with ``--source peers``: the second is warmed by the first, not the origin.

The runtime wiring is what is under test here: the service starts with the agent, a published snapshot
is seeded, the status says where the model came from, and the metrics count bytes over the wire.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.modelgen import MiB, make_hub_model
from agent.sources.base import SourceSettings
from agent.sources.peers.settings import PeerAddr, PeerSettings
from tests.agent_harness import running_agent, settings_for, wait_until
from tests.peers.net import free_port_pair

REPO = "org/swarm"


def node_settings(tmp_path: Path, name: str, mf: Path, pvc: Path, port: int, peers: list[int]) -> object:
    ps = PeerSettings(listen_host="127.0.0.1", port=port, slots_dir=tmp_path / "slots", poll_interval=0.1,
                      peers=tuple(PeerAddr("127.0.0.1", p, p + 1) for p in peers))
    return settings_for(tmp_path / f"cache-{name}", mf, ["peers", f"pvc:{pvc}"],
                        source_settings=SourceSettings(peers=ps))


def test_second_node_is_warmed_from_the_first_not_the_origin(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    make_hub_model(pvc / "hub", REPO, weight_bytes=2 * MiB, shards=2)
    mf = tmp_path / "models.yaml"
    mf.write_text(yaml.safe_dump([{"name": "swarm", "repo": REPO}]))
    pa, pb = free_port_pair(), free_port_pair()
    with running_agent(node_settings(tmp_path, "a", mf, pvc, pa, [pb])) as a:  # type: ignore[arg-type]
        wait_until(lambda: a.ready() == {"swarm"}, 30)
        assert a.node_status()["models"]["swarm"]["source"] == "pvc"
        wait_until(lambda: a.metrics().get(("modelcache_p2p_seeding", ()), 0) >= 1, 15)
        with running_agent(node_settings(tmp_path, "b", mf, pvc, pb, [pa])) as b:  # type: ignore[arg-type]
            wait_until(lambda: b.ready() == {"swarm"}, 60)
            st = b.node_status()["models"]["swarm"]
            assert st["source"] == "peers" and st["level"] == "verified"
            m = b.metrics()
            assert m.get(("modelcache_fill_bytes_total", (("source", "peers"),)), 0) >= 2 * MiB
            assert m.get(("modelcache_fill_bytes_total", (("source", "pvc"),)), 0) == 0
            # wire counters come from libtorrent's session stats, refreshed every second
            wait_until(lambda: b.metrics()[("modelcache_p2p_downloaded_bytes_total", ())] >= 2 * MiB, 10)
        wait_until(lambda: a.metrics()[("modelcache_p2p_uploaded_bytes_total", ())] >= 2 * MiB, 10)
