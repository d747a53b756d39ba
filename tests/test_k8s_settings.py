"""The Kubernetes block of the settings: every key parsed, every bad value named, the Lease timings consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import kube_settings_from, load_config_file
from agent.errors import ConfigError
from agent.k8s.settings import KubeSettings, default_namespace


def test_defaults_and_every_key(tmp_path: Path) -> None:
    assert kube_settings_from({}, {"POD_NAMESPACE": "model-cache"}) == KubeSettings(lease_namespace="model-cache")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiQps: 20\napiBurst: 40\napiRequestTimeoutSeconds: 5\napiRetryAttempts: 6\napiRetryBaseSeconds: 0.2\n"
        "apiRetryCapSeconds: 10\nleaseNamespace: ops\nleaseName: mca-leader\nleaseDurationSeconds: 30\n"
        "leaseRenewPeriodSeconds: 10\nleaseRenewDeadlineSeconds: 20\nleaseAcquireJitterSeconds: 2\n"
        "aggregateIntervalSeconds: 2\naggregateNodeSelector: 'nvidia.com/gpu.present=true'\n"
        "nodeStatusIntervalSeconds: 30\nwatchTimeoutSeconds: 600\ndesiredDebounceSeconds: 0.5\n")
    ks = kube_settings_from(load_config_file(str(cfg)), {})
    assert (ks.qps, ks.burst, ks.request_timeout, ks.retry.attempts, ks.retry.base, ks.retry.cap) == \
        (20, 40, 5, 6, 0.2, 10)
    assert (ks.lease_namespace, ks.lease_name, ks.lease_duration, ks.lease_renew_period,
            ks.lease_renew_deadline, ks.lease_acquire_jitter) == ("ops", "mca-leader", 30, 10, 20, 2)
    assert (ks.aggregate_interval, ks.aggregate_node_selector, ks.node_status_interval, ks.watch_timeout,
            ks.desired_debounce) == (2, "nvidia.com/gpu.present=true", 30, 600, 0.5)
    assert ks.pin_wait == 34


@pytest.mark.parametrize(("conf", "names"), [
    ({"apiQps": float("nan")}, "apiQps"),
    ({"apiQps": "fast"}, "apiQps"),
    ({"apiBurst": 0}, "apiBurst"),
    ({"apiBurst": 2.5}, "apiBurst"),
    ({"watchTimeoutSeconds": float("inf")}, "watchTimeoutSeconds"),
    ({"aggregateIntervalSeconds": -1}, "aggregateIntervalSeconds"),
    ({"leaseRenewDeadlineSeconds": 14.5}, "leaseRenewDeadlineSeconds"),  # would overlap a new leader's start
    ({"leaseRenewPeriodSeconds": 13}, "leaseRenewPeriodSeconds"),
    ({"leaseAcquireJitterSeconds": 15}, "leaseAcquireJitterSeconds"),
    ({"leaseNamespace": "Not_A_Namespace"}, "leaseNamespace"),
    ({"leaseName": "x" * 70}, "leaseName"),
])
def test_bad_values_name_their_key(conf: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        kube_settings_from(conf, {})


def test_namespace_comes_from_the_pod(tmp_path: Path) -> None:
    sa = tmp_path / "namespace"
    sa.write_text("from-sa\n")
    assert default_namespace({"POD_NAMESPACE": "a"}, str(sa)) == "a"
    assert default_namespace({}, str(sa)) == "from-sa"
    assert default_namespace({}, str(tmp_path / "missing")) == "default"


def test_unknown_keys_are_still_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiQPS: 5\n")  # a typo
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config_file(str(cfg))
