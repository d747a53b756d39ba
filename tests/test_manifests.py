"""The deployable manifests: valid Kubernetes objects that keep the properties the agent relies on.

Everything is checked offline: ``kubectl kustomize`` renders the base and monitoring kustomizations,
``kubernetes-validate`` (bundled OpenAPI schemas, strict: unknown fields are errors) checks built-in
kinds, and our CRD's openAPIV3Schema checks CachedModels through ``jsonschema``. CEL rules cannot be
evaluated offline, so each one has a Python twin below and a test fails if the two sets drift apart.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent.config import DEFAULT_CACHE_DIR, DEFAULT_HF_TOKEN_FILE, DEFAULT_MX_TOKEN_FILE, load_config_file
from agent.core.spec import parse_model_spec
from agent.errors import ConfigError, SpecError

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
NAMESPACE = "model-cache"
PREFIX = "modelcache.dev"
AGENT_UID = 65532
# Oldest Kubernetes we support (CRD CEL validation rules are GA from 1.29) and the newest schema bundled.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------- helpers


@cache
def render(path: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    proc = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def base() -> tuple[Obj, ...]:
    return render(str(MANIFESTS))


def monitoring() -> tuple[Obj, ...]:
    return render(str(MANIFESTS / "monitoring"))


def load_file(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def daemonset() -> Obj:
    return one(base(), "DaemonSet", "model-cache-agent")


def pod_spec() -> Obj:
    return daemonset()["spec"]["template"]["spec"]


def agent_container() -> Obj:
    return next(c for c in pod_spec()["containers"] if c["name"] == "agent")


def volume(spec: Obj, name: str) -> Obj:
    return next(v for v in spec["volumes"] if v["name"] == name)


def mount(container: Obj, name: str) -> Obj:
    return next(m for m in container["volumeMounts"] if m["name"] == name)


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def agent_config() -> Obj:
    cm = one(base(), "ConfigMap", "model-cache-agent")
    data: Obj = yaml.safe_load(cm["data"]["config.yaml"])
    return data


def crd() -> Obj:
    """Read from the file, not the render, so the CRD checks also run where kubectl is missing."""
    return one(load_file(MANIFESTS / "crd.yaml"), "CustomResourceDefinition", "cachedmodels.modelcache.dev")


def crd_schema() -> Obj:
    (version,) = crd()["spec"]["versions"]
    schema: Obj = version["schema"]["openAPIV3Schema"]
    return schema


# ----------------------------------------------------------------------- CEL rules and their Python twins

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# rule text exactly as in crd.yaml -> the same predicate in Python (applied to the value at the rule's path)
CEL_TWINS: dict[str, Callable[[Any], bool]] = {
    "self.metadata.name.size() <= 63": lambda o: len(o["metadata"]["name"]) <= 63,
    "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')": lambda o: bool(
        _DNS1123_LABEL.search(o["metadata"]["name"])
    ),
    "!self.contains('..') && !self.contains('--')": lambda s: ".." not in s and "--" not in s,
    "!self.matches('[.]lock(/|$)')": lambda s: not re.search(r"[.]lock(/|$)", s),
}


def cel_rules(schema: Obj, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every (property path, rule) in a structural schema."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"]
    for key, sub in schema.get("properties", {}).items():
        yield from cel_rules(sub, (*path, key))
    if "items" in schema:
        yield from cel_rules(schema["items"], (*path, "[]"))


def validate_cachedmodel(obj: Obj) -> list[str]:
    """Problems the API server would report for ``obj``: schema errors plus CEL rules (via their twins)."""
    errors = [e.message for e in jsonschema.Draft202012Validator(crd_schema()).iter_errors(obj)]
    if errors:
        return errors
    for path, rule in cel_rules(crd_schema()):
        value: Any = obj
        for key in path:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            if not CEL_TWINS[rule](value):
                errors.append(f"{'.'.join(path) or '<root>'}: {rule}")
    return errors


def example_cachedmodel() -> Obj:
    return one(load_file(EXAMPLES / "cachedmodel.yaml"), "CachedModel")


def with_changes(**changes: Any) -> Obj:
    """The example CachedModel with dotted paths replaced (None deletes)."""
    obj = copy.deepcopy(example_cachedmodel())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = obj
        for key in parents:
            target = target[key]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return obj


# ------------------------------------------------------------------------------------- render + schemas


def test_base_renders_only_the_install_objects() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base())
    assert kinds == [
        ("ClusterRole", "model-cache-agent"),
        ("ClusterRoleBinding", "model-cache-agent"),
        ("ConfigMap", "model-cache-agent"),
        ("CustomResourceDefinition", "cachedmodels.modelcache.dev"),
        ("DaemonSet", "model-cache-agent"),
        ("Namespace", NAMESPACE),
        ("NetworkPolicy", "model-cache-agent"),
        ("PriorityClass", "model-cache-agent"),
        ("Role", "model-cache-agent"),
        ("RoleBinding", "model-cache-agent"),
        ("ServiceAccount", "model-cache-agent"),
    ]
    for o in base():
        if o["kind"] in ("ConfigMap", "DaemonSet", "ServiceAccount", "Role", "RoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE
    rendered = one(base(), "CustomResourceDefinition", "cachedmodels.modelcache.dev")
    assert rendered["spec"] == crd()["spec"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_strictly(version: str) -> None:
    checked = 0
    for o in base() + monitoring():
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not in kubernetes-validate's schema set: see test_monitoring_objects_are_well_formed
        kubernetes_validate.validate(o, version, strict=True)
        checked += 1
    assert checked >= 9


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_example_workloads_validate_strictly(version: str) -> None:
    for name in ("worker-deployment.yaml", "worker-soft-affinity.yaml"):
        for o in load_file(EXAMPLES / name):
            kubernetes_validate.validate(o, version, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    """Guard for the test above: the validator really rejects unknown fields offline."""
    ds = copy.deepcopy(daemonset())
    ds["spec"]["template"]["spec"]["tolerationz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


def test_examples_are_not_installed_by_the_base() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert not any("examples" in r or "monitoring" in r for r in kustomization["resources"])
    assert not [o for o in base() if o["kind"] in ("CachedModel", "Deployment", "DynamoGraphDeployment")]


# ------------------------------------------------------------------------------------------------- CRD


def test_crd_names_scope_and_columns() -> None:
    spec = crd()["spec"]
    assert (spec["group"], spec["scope"]) == ("modelcache.dev", "Cluster")
    assert spec["names"]["plural"] == "cachedmodels" and spec["names"]["kind"] == "CachedModel"
    # "cm" is ConfigMap's: kubectl resolves built-ins first, so a CRD short name "cm" would be dead.
    assert "cm" not in spec["names"].get("shortNames", [])
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Repo": ".spec.repo",
        "Revision": ".spec.revision",
        "Resolved": ".status.resolvedRevision",
        "Ready": ".status.readyNodes",
        "Desired": ".status.desiredNodes",
        "Age": ".metadata.creationTimestamp",
    }


def test_crd_status_schema_has_every_field_the_agent_writes() -> None:
    """A structural schema silently prunes unknown status fields: the pin (resolvedFrom) would vanish."""
    status = crd_schema()["properties"]["status"]["properties"]
    assert set(status) >= {
        "resolvedRevision", "resolvedFrom", "resolvedAt", "readyNodes", "desiredNodes", "failedNodes", "conditions",
        "observedGeneration",
    }
    cond = status["conditions"]
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]


def untyped_nodes(schema: Obj, path: str = "") -> Iterator[str]:
    """Schema nodes without a type: the API server rejects such a CRD as non-structural."""
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        yield path or "<root>"
    for key, sub in schema.get("properties", {}).items():
        yield from untyped_nodes(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from untyped_nodes(schema[key], f"{path}.{key}")


def test_crd_schema_is_structural() -> None:
    assert list(untyped_nodes(crd_schema())) == []
    assert list(untyped_nodes({"type": "object", "properties": {"x": {"items": {}}}})) == [".x", ".x.items"]
    # metadata may only be described as a bare object (name rules go through CEL)
    assert crd_schema()["properties"]["metadata"] == {"type": "object"}


def test_every_cel_rule_has_a_python_twin() -> None:
    rules = {rule for _, rule in cel_rules(crd_schema())}
    assert rules == set(CEL_TWINS), "crd.yaml CEL rules and CEL_TWINS differ: update both together"
    # the name-length rule in particular sits at the root, where metadata.name is visible to CEL
    assert ((), "self.metadata.name.size() <= 63") in set(cel_rules(crd_schema()))


def test_example_cachedmodel_is_valid() -> None:
    assert validate_cachedmodel(example_cachedmodel()) == []
    parse_model_spec(example_cachedmodel())


GOOD_CASES: dict[str, Obj] = {
    "default revision": {"spec__revision": None},
    "tag with dots": {"spec__revision": "v1.0.2"},
    "commit": {"spec__revision": "0123456789abcdef0123456789abcdef01234567"},
    "pr ref": {"spec__revision": "refs/pr/12"},
    "63-char name": {"metadata__name": "m" * 63},
    "no sources": {"spec__sources": None},
    "expression selector": {"spec__nodeSelector": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}},
    "pvc subpath": {"spec__pvcSubpath": "models/Qwen3-0.6B.v2"},
    "pvc subpath with dotted parts": {"spec__pvcSubpath": ".hidden/..x/org_a/name-b"},
}

BAD_CASES: dict[str, Obj] = {
    "repo without org": {"spec__repo": "Qwen3-0.6B"},
    "repo with three parts": {"spec__repo": "a/b/c"},
    "repo with ..": {"spec__repo": "org/na..me"},
    "repo with --": {"spec__repo": "org--x/name"},
    "repo missing": {"spec__repo": None},
    "revision with ..": {"spec__revision": "main..evil"},
    "revision climbing": {"spec__revision": "../etc"},
    "revision leading -": {"spec__revision": "-main"},
    "revision trailing /": {"spec__revision": "release/"},
    "revision .lock": {"spec__revision": "main.lock"},
    "revision with space": {"spec__revision": "my branch"},
    "64-char name": {"metadata__name": "m" * 64},
    "uppercase name": {"metadata__name": "Qwen3"},
    "unknown source": {"spec__sources": ["s3"]},
    "priority not int": {"spec__priority": "high"},
    "pvc subpath climbing": {"spec__pvcSubpath": "org/../../etc"},
    "pvc subpath absolute": {"spec__pvcSubpath": "/mnt/org/name"},
    "pvc subpath trailing /": {"spec__pvcSubpath": "org/name/"},
    "pvc subpath dot": {"spec__pvcSubpath": "./org"},
}


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_crd_accepts(case: str) -> None:
    obj = with_changes(**GOOD_CASES[case])
    assert validate_cachedmodel(obj) == []
    parse_model_spec(obj)  # the agent agrees


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_crd_rejects_what_the_agent_rejects(case: str) -> None:
    obj = with_changes(**BAD_CASES[case])
    assert validate_cachedmodel(obj), f"CRD accepted {case}"
    with pytest.raises(SpecError):
        parse_model_spec(obj)


def test_name_over_63_is_caught_only_by_cel() -> None:
    """The schema itself cannot bound metadata.name; without the CEL rule a 64-char name would pass."""
    obj = with_changes(metadata__name="m" * 64)
    assert list(jsonschema.Draft202012Validator(crd_schema()).iter_errors(obj)) == []
    assert validate_cachedmodel(obj) == ["<root>: self.metadata.name.size() <= 63"]


# ------------------------------------------------------------------------------------------------ RBAC


def granted(role: Obj) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def test_rbac_is_exactly_least_privilege() -> None:
    """The same sets tests/test_k8s_wiring.py proves the agent uses (and no more) against an enforcing API."""
    assert granted(one(base(), "ClusterRole", "model-cache-agent")) == {
        ("", "nodes", "get"), ("", "nodes", "list"), ("", "nodes", "watch"), ("", "nodes", "patch"),
        ("", "pods", "list"), ("", "pods", "watch"),
        ("modelcache.dev", "cachedmodels", "get"), ("modelcache.dev", "cachedmodels", "list"),
        ("modelcache.dev", "cachedmodels", "watch"), ("modelcache.dev", "cachedmodels/status", "patch"),
        ("", "events", "create"), ("", "events", "patch"),
    }
    role = one(base(), "Role", "model-cache-agent")
    assert role["metadata"]["namespace"] == NAMESPACE  # leases only in the agent's own namespace
    assert granted(role) == {("coordination.k8s.io", "leases", v) for v in ("get", "list", "watch", "create", "update")}


def test_rbac_binds_the_daemonset_service_account() -> None:
    binding = one(base(), "ClusterRoleBinding", "model-cache-agent")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "model-cache-agent",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod_spec()["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    one(base(), "ServiceAccount", pod_spec()["serviceAccountName"])
    rb = one(base(), "RoleBinding", "model-cache-agent")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "model-cache-agent"}
    assert rb["subjects"] == binding["subjects"] and rb["metadata"]["namespace"] == NAMESPACE


# ------------------------------------------------------------------------------------------- DaemonSet


def test_cache_hostpath_and_one_path_everywhere() -> None:
    """hostPath, mountPath, MODEL_CACHE_DIR and config cacheDir must all name one directory."""
    cache_volume = volume(pod_spec(), "cache")["hostPath"]
    assert cache_volume == {"path": DEFAULT_CACHE_DIR, "type": "DirectoryOrCreate"}
    agent = agent_container()
    assert mount(agent, "cache")["mountPath"] == DEFAULT_CACHE_DIR
    assert not mount(agent, "cache").get("readOnly")
    assert env_of(agent)["MODEL_CACHE_DIR"]["value"] == DEFAULT_CACHE_DIR
    assert agent_config()["cacheDir"] == DEFAULT_CACHE_DIR


def test_config_is_accepted_by_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(agent_config()))
    assert load_config_file(str(path)) == agent_config()
    path.write_text(yaml.safe_dump({**agent_config(), "cacheDirectory": "/x"}))
    with pytest.raises(ConfigError):  # guard: unknown keys really are rejected
        load_config_file(str(path))
    config_mount = mount(agent_container(), "config")["mountPath"]
    args = agent_container()["args"]
    assert args[0] == "run" and args[args.index("--config") + 1] == f"{config_mount}/config.yaml"
    assert volume(pod_spec(), "config")["configMap"]["name"] == "model-cache-agent"


def test_node_name_from_downward_api() -> None:
    assert env_of(agent_container())["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_probes_and_metrics_port() -> None:
    agent = agent_container()
    port = agent_config()["metricsPort"]
    by_name = {p["name"]: p for p in agent["ports"]}
    container_port = by_name["metrics"]
    assert container_port["containerPort"] == port == 9400
    assert (by_name["p2p"]["containerPort"], by_name["p2p-index"]["containerPort"]) == (6881, 6882)  # index = +1
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = agent[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (port, container_port["name"])


def test_scheduling_on_gpu_nodes() -> None:
    spec = pod_spec()
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    priority = one(base(), "PriorityClass", spec["priorityClassName"])
    assert 0 < priority["value"] < 1_000_000_000  # below the system-* classes
    strategy = daemonset()["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # two agents must never share one hostPath


def test_termination_budget_fits_in_grace_period() -> None:
    assert agent_config()["terminationBudgetSeconds"] + 10 <= pod_spec()["terminationGracePeriodSeconds"]


def test_agent_runs_non_root_with_nothing_extra() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == AGENT_UID
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    ctx = agent_container()["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "runAsUser" not in ctx and not ctx.get("privileged")
    assert mount(agent_container(), "tmp")["mountPath"] == "/tmp"
    assert "emptyDir" in volume(spec, "tmp")


def test_only_the_init_container_is_root_and_only_to_chown() -> None:
    (init,) = pod_spec()["initContainers"]
    ctx = init["securityContext"]
    assert ctx["runAsUser"] == 0
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    script = "\n".join(init["command"])
    assert f"chown -R {AGENT_UID}:{AGENT_UID}" in script
    assert mount(init, "cache")["mountPath"] == DEFAULT_CACHE_DIR
    assert init["image"] == agent_container()["image"]


def test_resources_are_set() -> None:
    for c in pod_spec()["containers"] + pod_spec()["initContainers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


def test_image_is_pinned() -> None:
    image = agent_container()["image"]
    assert re.fullmatch(r"[^:]+(:[0-9][\w.-]*|@sha256:[0-9a-f]{64})", image), image


def test_tokens_mounted_where_the_agent_reads_them() -> None:
    spec, agent = pod_spec(), agent_container()
    hf = volume(spec, "hf-token")["secret"]
    assert hf["optional"] is True
    assert f"{mount(agent, 'hf-token')['mountPath']}/token" == DEFAULT_HF_TOKEN_FILE
    (source,) = volume(spec, "modelexpress-token")["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "modelexpress"
    assert f"{mount(agent, 'modelexpress-token')['mountPath']}/{token['path']}" == DEFAULT_MX_TOKEN_FILE
    assert all(m.get("readOnly") for m in agent["volumeMounts"] if m["name"] in ("hf-token", "modelexpress-token"))


def test_namespace_admits_hostpath() -> None:
    labels = one(base(), "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_matches_the_daemonset() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) == 2, "builder + final stage"
    final = text[text.rindex("\nFROM ") :]
    assert re.search(rf"^USER {AGENT_UID}(:{AGENT_UID})?$", final, re.M)
    assert 'ENTRYPOINT ["model-cache-agent"]' in final and 'CMD ["run"]' in final
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert not re.search(r"^RUN .*(apt-get|pip install)", final, re.M), "no installs in the final stage"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^model-cache-agent = "agent\.cli:main"$', pyproject, re.M)


# ---------------------------------------------------------------------------------------------- examples


def label_key() -> str:
    return f"{PREFIX}/{example_cachedmodel()['metadata']['name']}"


def node_cache_hub() -> str:
    return f"{volume(pod_spec(), 'cache')['hostPath']['path']}/hub"


def assert_reads_node_cache(spec: Obj, container: Obj, *, hard: bool) -> None:
    hp = volume(spec, "model-cache")["hostPath"]
    assert hp["path"] == node_cache_hub()
    m = mount(container, "model-cache")
    assert m["readOnly"] is True
    if hard:
        assert hp["type"] == "Directory"


def test_worker_deployment_selects_ready_nodes() -> None:
    dep = one(load_file(EXAMPLES / "worker-deployment.yaml"), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {label_key(): "ready"}
    (container,) = spec["containers"]
    assert_reads_node_cache(spec, container, hard=True)
    env = env_of(container)
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["HF_HUB_CACHE"]["value"] == mount(container, "model-cache")["mountPath"]


def test_soft_affinity_prefers_and_never_requires() -> None:
    path = EXAMPLES / "worker-soft-affinity.yaml"
    assert "autoscaler" in path.read_text()  # the comment saying why
    dep = one(load_file(path), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    affinity = spec["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity
    assert "nodeSelector" not in spec
    (pref,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["preference"]["matchExpressions"] == [{"key": label_key(), "operator": "In", "values": ["ready"]}]
    (container,) = spec["containers"]
    assert_reads_node_cache(spec, container, hard=False)


def test_dynamo_graph_deployment_worker_selects_ready_nodes() -> None:
    dgd = one(load_file(EXAMPLES / "dynamo-graph-deployment.yaml"), "DynamoGraphDeployment")
    assert dgd["apiVersion"] == "nvidia.com/v1alpha1"
    workers = [s for s in dgd["spec"]["services"].values() if s["componentType"] == "worker"]
    assert workers
    for svc in workers:
        extra = svc["extraPodSpec"]
        assert extra["nodeSelector"] == {label_key(): "ready"}
        assert_reads_node_cache(extra, extra["mainContainer"], hard=True)
        env = {e["name"]: e["value"] for e in svc["envs"]}
        assert env["HF_HUB_OFFLINE"] == "1"
        assert env["HF_HUB_CACHE"] == mount(extra["mainContainer"], "model-cache")["mountPath"]
        # extraPodSpec is a core PodSpec plus mainContainer: check that part against the real schema
        pod_fields = {k: v for k, v in extra.items() if k != "mainContainer"}
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dgd-worker"},
            "spec": {**pod_fields, "containers": [{"name": "main", **extra["mainContainer"]}]},
        }
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_networkpolicy_admits_only_agents_to_the_peer_ports_and_anyone_to_metrics() -> None:
    objs = base()
    (np,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in np["spec"]["podSelector"]["matchLabels"].items())
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    peer_rule, open_rule = np["spec"]["ingress"]
    assert {p["port"] for p in peer_rule["ports"]} == {"p2p", "p2p-index"} <= ports
    assert peer_rule["from"][0]["podSelector"]["matchLabels"] == np["spec"]["podSelector"]["matchLabels"]
    assert "from" not in open_rule and [p["port"] for p in open_rule["ports"]] == ["metrics"]
