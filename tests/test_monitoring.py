"""Monitoring objects: every metric an alert or a dashboard panel queries is one the agent exports.

A query on a misspelled metric returns nothing, so its alert can never fire and its panel stays empty:
the failure is silent in production, which is why it is checked here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "manifests" / "monitoring"
METRIC_RE = re.compile(r"\bmodelcache_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# --- FALLBACK: the metric contract as written in the task brief, used only while agent.metrics
# --- (the real exporter) cannot be imported. Delete once the exporter is always present.
CONTRACT_METRIC_NAMES = frozenset({
    "modelcache_model_ready", "modelcache_models_desired", "modelcache_models_ready", "modelcache_model_bytes",
    "modelcache_fill_progress_ratio", "modelcache_model_verification",
    "modelcache_fill_bytes_total", "modelcache_fill_failures_total", "modelcache_verify_failures_total",
    "modelcache_repairs_total", "modelcache_scrub_bytes_total", "modelcache_fill_duration_seconds",
    "modelcache_cache_bytes", "modelcache_disk_free_bytes", "modelcache_disk_total_bytes",
})

Obj = dict[str, Any]


def exported_metric_names() -> frozenset[str]:
    """Names the agent exports: the real exporter's list when importable, else the contract above."""
    try:
        from agent.metrics import METRIC_NAMES
    except ImportError:  # FALLBACK (see CONTRACT_METRIC_NAMES)
        return CONTRACT_METRIC_NAMES
    return frozenset(METRIC_NAMES)


def base_name(name: str, known: frozenset[str]) -> str:
    """modelcache_fill_duration_seconds_bucket -> modelcache_fill_duration_seconds (histogram series)."""
    if name in known:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def load(name: str) -> Obj:
    doc: Obj = yaml.safe_load((MONITORING / name).read_text())
    return doc


def rules() -> list[Obj]:
    return [r for g in load("prometheusrule.yaml")["spec"]["groups"] for r in g["rules"]]


def dashboard() -> Obj:
    doc: Obj = json.loads((MONITORING / "dashboard.json").read_text())
    return doc


def panels(dash: Obj) -> list[Obj]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [str(r["expr"]) for r in rules()]


def referenced(exprs: list[str]) -> set[str]:
    known = exported_metric_names()
    return {base_name(m, known) for e in exprs for m in METRIC_RE.findall(e)}


# ------------------------------------------------------------------------------------------ metric names


def test_rules_query_only_exported_metrics() -> None:
    names = referenced(rule_exprs())
    assert len(names) >= 5, names  # the regex really finds the names
    assert names <= exported_metric_names(), f"unknown metrics in PrometheusRule: {names - exported_metric_names()}"


def test_dashboard_queries_only_exported_metrics() -> None:
    names = referenced(dashboard_exprs())
    assert len(names) >= 10, names
    assert names <= exported_metric_names(), f"unknown metrics in dashboard: {names - exported_metric_names()}"


def test_a_misspelled_metric_is_caught() -> None:
    """Guard for the two tests above."""
    assert referenced(["rate(modelcache_fill_byte_total[5m])"]) - exported_metric_names() == {
        "modelcache_fill_byte_total"
    }
    assert referenced(["modelcache_fill_duration_seconds_bucket"]) == {"modelcache_fill_duration_seconds"}


def test_contract_names_still_exported() -> None:
    """When the real exporter is present, nothing the contract promises has been renamed away."""
    pytest.importorskip("agent.metrics", reason="agent.metrics not importable: contract list in use")
    assert exported_metric_names() >= CONTRACT_METRIC_NAMES


def test_the_coverage_formula_is_the_documented_one() -> None:
    coverage = "sum(modelcache_models_ready) / sum(modelcache_models_desired)"
    assert coverage in rule_exprs()
    assert coverage in dashboard_exprs()


# ------------------------------------------------------------------------------------------------ alerts

RULE_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {"oneOf": [
                        {
                            "type": "object",
                            "required": ["alert", "expr", "labels", "annotations"],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]+$"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                "labels": {
                                    "type": "object",
                                    "required": ["severity"],
                                    "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
                                },
                                "annotations": {"type": "object", "required": ["summary", "description"]},
                            },
                        },
                        {
                            "type": "object",
                            "required": ["record", "expr"],
                            "additionalProperties": False,
                            "properties": {
                                "record": {"type": "string", "pattern": "^[a-z_]+:[a-z_]+:[a-z_]+$"},
                                "expr": {"type": "string", "minLength": 1},
                                "labels": {"type": "object"},
                            },
                        },
                    ]}},
                },
            }}},
        },
    },
}


def test_prometheus_rule_is_well_formed() -> None:
    jsonschema.validate(load("prometheusrule.yaml"), RULE_SCHEMA)
    alerts = [r["alert"] for r in rules() if "alert" in r]
    assert len(alerts) == len(set(alerts))


def test_required_alerts_exist() -> None:
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    exprs = {name: rule_expr_expanded(r["expr"]) for name, r in by_name.items()}
    assert "modelcache_models_ready" in exprs["ModelCacheCoverageLow"] and by_name["ModelCacheCoverageLow"]["for"]
    assert "modelcache_verify_failures_total" in exprs["ModelCacheVerifyFailures"]
    assert "modelcache_fill_progress_ratio" in exprs["ModelCacheFillStuck"]
    assert "modelcache_fill_failures_total" in exprs["ModelCacheFillFailing"]
    assert "modelcache_disk_free_bytes" in exprs["ModelCacheDiskLow"]


def rule_expr_expanded(expr: str) -> str:
    """Inline recording rules so an alert on ``modelcache:coverage:ratio`` shows the metrics beneath it."""
    records = {r["record"]: r["expr"] for r in rules() if "record" in r}
    for name, body in records.items():
        expr = expr.replace(name, f"({body})")
    return expr


def test_recording_rules_used_are_defined() -> None:
    records = {r["record"] for r in rules() if "record" in r}
    used = {m for e in rule_exprs() + dashboard_exprs() for m in re.findall(r"\bmodelcache:[a-z_]+:[a-z_]+", e)}
    assert used <= records


@pytest.mark.parametrize("expr", rule_exprs() + dashboard_exprs())
def test_expressions_are_balanced(expr: str) -> None:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], expr
    assert not stack, expr


def test_agent_down_alert_uses_the_scrape_job_name() -> None:
    """ServiceMonitor jobLabel takes the job name from that label on the Service."""
    monitor, service = load("servicemonitor.yaml"), load("service.yaml")
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    down = next(r for r in rules() if r.get("alert") == "ModelCacheAgentDown")
    assert f'up{{job="{job}"}}' in down["expr"]


# ------------------------------------------------------------------------------- Service + ServiceMonitor


def test_service_monitor_reaches_the_agent_pods() -> None:
    monitor, service = load("servicemonitor.yaml"), load("service.yaml")
    ds = yaml.safe_load((ROOT / "manifests" / "daemonset.yaml").read_text())
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["model-cache"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert container_ports[port["targetPort"]] == port["port"] == 9400
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in (
        endpoint["relabelings"]
    )


# -------------------------------------------------------------------------------------------- dashboard


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert dash["uid"] == "model-cache-agent"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for topic in ("coverage per model", "throughput by source", "failures", "disk"):
        assert topic in titles, topic
    for p in panels(dash):
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_dashboard_configmap_is_the_raw_json() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render manifests/monitoring")
    proc = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = cm["data"].values()
    assert json.loads(content) == dashboard()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "PrometheusRule", "Service", "ServiceMonitor"]
    assert all(o["metadata"]["namespace"] == "model-cache" for o in objs)
