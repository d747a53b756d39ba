"""The small version of bench/control_plane.py: three agents, every goal of the control plane checked.

The full run (N = 10, 25, 50, a compressed hour each) is ``python -m bench.control_plane``; this one
takes ~30 s with timers divided by 3 (rollout, failover) and 10 (steady state).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.modelgen import make_hub_model
from bench import control_plane as cp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_three_agents_meet_the_control_plane_goals(tmp_path: Path) -> None:
    make_hub_model(tmp_path / "pvc" / "hub", cp.REPO, weight_bytes=64 * 1024, seed=1, workdir=tmp_path / "gen")
    r = cp.measure(3, "inproc", tmp_path, tmp_path / "pvc", k_rollout=3.0, k_steady=10.0, steady_window=10.0)
    ro, fo, st = r["rollout"], r["failover"], r["steady"]
    assert ro["node_writes_per_node"] <= 2  # label + annotation per model state change, coalesced
    assert ro["cachedmodel_status_writes"] <= 4  # bounded by time (interval 5/3 s), not by nodes
    assert ro["conflicts"] == 0 and ro["errors"] == 0
    assert fo["failover_seconds"] is not None and fo["failover_seconds"] <= fo["lease_duration"]
    assert fo["ready_changed_during_failover"] == [] and fo["status_writes_after_failover"] == 0
    assert st["conflicts"] == 0 and st["cachedmodel_status_writes"] == 0 and st["node_writes"] == 0
    assert st["leader_changes"] == 0
    # Per node and hour: Lease renewals (480 for the leader, shared by 3) + a few watch reconnects.
    assert st["requests_per_node_hour"] <= 480 / 3 + 20, st
