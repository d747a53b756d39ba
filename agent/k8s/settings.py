"""How an agent talks to the API server and shares the cluster-wide work: plain data, no I/O library.

Parsed from the config file by ``agent.config`` (keys listed there, each validated); defined here so
``agent.k8s`` needs nothing from ``agent.config`` (which imports the sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.retry import RetryPolicy

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class KubeSettings:
    """How the agent talks to the API server and shares the cluster-wide work (see agent.k8s.wiring)."""

    qps: float = 5.0  # client-side token bucket, every request incl. watches (client-go's default); 0: off
    burst: int = 10
    request_timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=4, base=0.5, cap=15.0))
    lease_namespace: str = "default"  # where the leader Lease lives: the agent's own namespace
    lease_name: str = "model-cache-agent-leader"
    lease_duration: float = 15.0  # a dead leader is replaced within this
    lease_renew_period: float = 7.5
    lease_renew_deadline: float = 12.0  # a leader that could not renew for this long stops acting
    lease_acquire_jitter: float = 1.0
    aggregate_interval: float = 5.0  # the leader writes each CachedModel status at most this often
    aggregate_node_selector: str = ""  # label selector of the leader's Node watch ("" = all nodes)
    node_status_interval: float = 10.0  # status-annotation-only changes (progress) at most this often
    watch_timeout: float = 900.0  # watch sessions last [t, 2t): reconnects per watch per hour = 3600/1.5t
    desired_debounce: float = 0.2  # a burst of CachedModel events becomes one desired-state change

    @property
    def pin_wait(self) -> float:
        """How long an agent waits for the leader to pin a revision before pinning it itself."""
        return self.lease_duration + 2 * self.aggregate_interval


def default_namespace(env: Mapping[str, str], sa_file: str = SA_NAMESPACE_FILE) -> str:
    """POD_NAMESPACE, else the ServiceAccount's namespace (mounted in every pod), else "default"."""
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        return Path(sa_file).read_text().strip() or "default"
    except OSError:
        return "default"
