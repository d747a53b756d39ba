"""The README's and docs/deploy.md's cluster instructions work as written, with kubectl only.

The shell blocks are run as they stand in the docs; only what needs a Docker daemon or a cluster
(`docker build/push`, `kubectl apply`) is replaced by a shell function that records the call, and
`kubectl apply -k DIR` by a real `kubectl kustomize DIR`. The YAML overlays in docs/deploy.md are written
out and rendered, then checked the way tests/test_manifests.py checks the base. Node label clean-up runs
on real kubectl with `--local` (no server needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import typing
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.config import load_config_file, parse_sources
from agent.core.desired import ModelState, ModelStatus
from agent.core.selector import status_key
from agent.k8s.reporter import annotation_statuses
from tests.test_manifests import K8S_VERSIONS, PREFIX, env_of, load_file, one, render, validate_cachedmodel

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
EXAMPLES = MANIFESTS / "examples"
README = ROOT / "README.md"
DEPLOY = ROOT / "docs" / "deploy.md"

Obj = dict[str, typing.Any]


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: cannot render kustomizations")
    return exe


def code_blocks(path: Path, lang: str) -> list[str]:
    """Fenced blocks of one language, de-indented (blocks inside list items are indented in the source)."""
    text = path.read_text()
    return [textwrap.dedent(m.group(2)) for m in re.finditer(rf"^([ \t]*)```{lang}\n(.*?)^\1```$", text, re.M | re.S)]


def block_with(path: Path, lang: str, needle: str) -> str:
    found = [b for b in code_blocks(path, lang) if needle in b]
    assert len(found) == 1, f"{path.name}: expected one ```{lang} block containing {needle!r}, found {len(found)}"
    return found[0]


def default_image() -> tuple[str, str]:
    (entry,) = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["images"]
    return entry["newName"], str(entry["newTag"])


def images(objs: list[Obj] | tuple[Obj, ...]) -> set[str]:
    out = set()
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            out.add(c["image"])
    return out


# ------------------------------------------------------------------------------------ your own image

STUBS = r"""
set -euo pipefail
docker() { printf 'docker %s\n' "$*" >> "$LOG"; }
kubectl() {
  case "$1" in
    kustomize) command kubectl "$@" ;;
    apply)
      printf 'kubectl %s\n' "$*" >> "$LOG"
      if [ "$2" = -k ]; then command kubectl kustomize "$3" > "$OUT/applied.yaml"; fi ;;
    *) printf 'kubectl %s\n' "$*" >> "$LOG" ;;
  esac
}
"""


def run_own_image_block(block: str, tmp_path: Path) -> tuple[list[str], str, Path]:
    """Run a docs block from a directory holding `manifests/` (as the repo root does); return the
    recorded docker/kubectl calls, stdout and the OUT directory."""
    kubectl()
    git_dir = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--absolute-git-dir"], capture_output=True,
                             text=True, check=False)
    if git_dir.returncode != 0:
        pytest.skip("not a git checkout: the block tags the image with the commit")
    work = tmp_path / "repo"
    work.mkdir()
    (work / "manifests").symlink_to(MANIFESTS)
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "calls.log"
    env = {"PATH": os.environ["PATH"], "LOG": str(log), "OUT": str(out), "HOME": str(tmp_path),
           "GIT_DIR": git_dir.stdout.strip()}
    proc = subprocess.run(["bash", "-c", STUBS + block], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"block failed:\n{block}\n{proc.stderr}"
    return log.read_text().splitlines(), proc.stdout, out


def check_own_image_run(calls: list[str], stdout: str) -> str:
    builds = [c for c in calls if c.startswith("docker build ")]
    assert len(builds) == 1, calls
    m = re.fullmatch(r"docker build -t (\S+) \.", builds[0])
    assert m, builds[0]
    ref = m.group(1)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert ref == f"registry.example.com/ml/model-cache-agent:git-{head}"
    assert f"docker push {ref}" in calls, "push the image that was built"
    shown = re.findall(r"image:\s*(\S+)", stdout)
    assert shown == [ref, ref], f"the block's check line must show the built image twice, got {shown}"
    return ref


@pytest.mark.parametrize("doc", [README, DEPLOY], ids=["README", "deploy.md"])
def test_own_image_block_deploys_the_built_image(doc: Path, tmp_path: Path) -> None:
    block = block_with(doc, "bash" if doc == README else "sh", "cat > my-install/kustomization.yaml")
    calls, stdout, out = run_own_image_block(block, tmp_path)
    ref = check_own_image_run(calls, stdout)
    if doc == README:  # the README applies it; deploy.md's step 2 does
        assert "kubectl apply -k my-install" in calls
        applied = [d for d in yaml.safe_load_all((out / "applied.yaml").read_text()) if d]
        assert images(applied) == {ref}
        assert sorted(o["kind"] for o in applied) == sorted(o["kind"] for o in render(str(MANIFESTS)))


def test_overlay_matching_the_bare_name_would_not_change_the_image(tmp_path: Path) -> None:
    """Why the docs match the rendered name: an overlay naming `model-cache-agent` leaves the default image."""
    block = block_with(README, "bash", "cat > my-install/kustomization.yaml")
    name, tag = default_image()
    assert f"  - name: {name}" in block
    _, stdout, _ = run_own_image_block(block.replace(f"  - name: {name}", "  - name: model-cache-agent"),
                                           tmp_path)
    assert set(re.findall(r"image:\s*(\S+)", stdout)) == {f"{name}:{tag}"}


# ----------------------------------------------------------------------------------- released image


def test_release_instructions_name_the_default_image() -> None:
    """README, deploy.md, CHANGELOG and manifests/kustomization.yaml agree on one pullable name and owner."""
    name, tag = default_image()
    owner = re.fullmatch(r"ghcr\.io/([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)/model-cache-agent", name)
    assert owner, f"{name}: expected ghcr.io/<owner>/model-cache-agent"
    url = (f"https://github.com/{owner.group(1)}/model-cache-agent/releases/download/v$VERSION/install.yaml")
    for doc, lang in ((README, "bash"), (DEPLOY, "sh")):
        block = block_with(doc, lang, "git checkout v$VERSION")
        assert f"VERSION={tag}\n" in block, f"{doc.name}: VERSION must be the default image's tag {tag}"
        assert f"kubectl apply -f {url}" in block, doc.name
        assert "kubectl apply -k manifests/" in block
        text = doc.read_text()
        assert f"`{name}:<version>`" in text, doc.name
        for other in re.findall(r"https://github\.com/\S+/install\.yaml", text):
            assert other == url, f"{doc.name}: {other}"
    assert f"github.com/{owner.group(1)}/model-cache-agent" in (ROOT / "CHANGELOG.md").read_text()
    rendered = render(str(MANIFESTS))
    assert images(rendered) == {f"{name}:{tag}"}


# ------------------------------------------------------------------------------------------ examples


def test_examples_render_as_a_directory() -> None:
    objs = render(str(EXAMPLES))
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == [
        ("CachedModel", "qwen3-0-6b"), ("Deployment", "qwen3-0-6b-worker"),
    ]
    cm = one(objs, "CachedModel")
    assert validate_cachedmodel(cm) == []
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(one(objs, "Deployment"), version, strict=True)
    # the worker selects exactly the label the CachedModel's agent sets
    selector = one(objs, "Deployment")["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {f"{PREFIX}/{cm['metadata']['name']}": "ready"}


def test_every_example_is_rendered_or_said_why_not() -> None:
    kustomization = (EXAMPLES / "kustomization.yaml").read_text()
    listed = set(yaml.safe_load(kustomization)["resources"])
    comments = "\n".join(line for line in kustomization.splitlines() if line.startswith("#"))
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name in listed:
            continue
        assert path.name in comments, f"{path.name}: neither in resources nor explained in kustomization.yaml"


# -------------------------------------------------------------------------------- overlays in the docs


def render_doc_overlay(marker: str, tmp_path: Path) -> tuple[Obj, ...]:
    block = block_with(DEPLOY, "yaml", marker)
    m = re.match(r"# (\S+)/kustomization\.yaml", block)
    assert m, "an overlay block starts with '# DIR/kustomization.yaml'"
    (tmp_path / "manifests").symlink_to(MANIFESTS)
    overlay = tmp_path / m.group(1)
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(block)
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    objs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    for o in objs:
        if o["kind"] in ("DaemonSet", "ConfigMap"):
            kubernetes_validate.validate(o, K8S_VERSIONS[-1], strict=True)
    return objs


def overlay_config(objs: tuple[Obj, ...], tmp_path: Path) -> Obj:
    path = tmp_path / "config.yaml"
    path.write_text(one(objs, "ConfigMap", "model-cache-agent")["data"]["config.yaml"])
    config: Obj = load_config_file(str(path))
    return config


def agent_of(objs: tuple[Obj, ...]) -> tuple[Obj, Obj]:
    spec = one(objs, "DaemonSet", "model-cache-agent")["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == "agent")


def test_pvc_source_snippet_is_complete(tmp_path: Path) -> None:
    objs = render_doc_overlay("persistentVolumeClaim", tmp_path)
    spec, agent = agent_of(objs)
    (pvc_volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert pvc_volume["persistentVolumeClaim"]["readOnly"] is True
    (pvc_mount,) = [m for m in agent["volumeMounts"] if m["name"] == pvc_volume["name"]]
    assert pvc_mount["readOnly"] is True
    # the base's own volumes and mounts survive the patch
    assert {"cache", "config", "tmp"} <= {v["name"] for v in spec["volumes"]}
    assert {"cache", "config", "tmp"} <= {m["name"] for m in agent["volumeMounts"]}
    config = overlay_config(objs, tmp_path)
    assert config["sources"][0] == f"pvc:{pvc_mount['mountPath']}"
    (first, *_) = parse_sources(config["sources"])
    assert first.kind == "pvc"
    text = DEPLOY.read_text()
    assert f"--source pvc:{pvc_mount['mountPath']}" in text, "the command-line form of the same source"


def test_modelexpress_snippet_renders(tmp_path: Path) -> None:
    objs = render_doc_overlay("MX_SERVER_ADDRESS", tmp_path)
    _, agent = agent_of(objs)
    assert "MX_SERVER_ADDRESS" in env_of(agent) and "NODE_NAME" in env_of(agent)
    config = overlay_config(objs, tmp_path)
    assert config["sources"][0] == "modelexpress"
    parse_sources(config["sources"])


# ------------------------------------------------------------------------------------- what a node gets


def section(doc: Path, heading: str) -> str:
    text = doc.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_status_annotation_is_documented_field_by_field() -> None:
    text = section(DEPLOY, "## What the agent writes on its Node")
    key = status_key(PREFIX)
    assert f"`{key}`" in text
    compact = ModelStatus(name="m", state="filling", commit="c" * 40, bytes=1, progress=0.5, level="verified",
                          last_error="boom", in_use=True, source="peers").compact()
    full = annotation_statuses({"m": compact}, {"m": ("main", "c" * 40)})["m"]  # + the agent's pin proposal
    documented = re.findall(r"^\s*\| `(\w+)` \|", text, re.M)
    assert sorted(documented) == sorted(full), "the table lists exactly the fields the agent can write"
    state_row = next(line for line in text.splitlines() if line.strip().startswith("| `state`"))
    for state in typing.get_args(ModelState):
        assert f"`{state}`" in state_row, state
    # the example is byte-for-byte what the agent writes for that content
    (example,) = [b.strip() for b in code_blocks(DEPLOY, "json")]
    parsed = json.loads(example)
    assert json.dumps(annotation_statuses(parsed), separators=(",", ":"), sort_keys=True) == example
    for st in parsed.values():
        assert set(st) <= set(full) and st["state"] in typing.get_args(ModelState)
    jsonpath = re.escape(key.replace(".", "\\."))
    assert re.search(rf"jsonpath='\{{\.metadata\.annotations\.{jsonpath}\}}'", text)


def node_json(tmp_path: Path, labels: dict[str, str], annotations: dict[str, str]) -> Path:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": "gpu-1", "labels": labels, "annotations": annotations}}))
    return path


def test_uninstall_removes_every_label_and_the_annotation(tmp_path: Path) -> None:
    block = block_with(DEPLOY, "sh", "kubectl annotate nodes --all")
    (template,) = re.findall(r"-o go-template='([^']+)'", block)
    labels = {"modelcache.dev/qwen3-0-6b": "ready", "modelcache.dev/llama-3-8b": "ready",
              "nvidia.com/gpu.present": "true", "kubernetes.io/hostname": "gpu-1", "modelcache.devices/x": "1"}
    node = node_json(tmp_path, labels, {status_key(PREFIX): "{}", "other": "kept"})
    k = kubectl()
    # the template on a real Node object (kubectl label --local needs one change, hence the dummy)
    keys = subprocess.run([k, "label", "--local", "-f", str(node), "dummy=1", "-o", f"go-template={template}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert sorted(keys) == ["modelcache.dev/llama-3-8b-", "modelcache.dev/qwen3-0-6b-"]
    (label_line,) = [line for line in block.splitlines() if 'kubectl label "$node" $keys' in line]
    assert label_line
    cleaned = json.loads(subprocess.run([k, "label", "--local", "-f", str(node), *keys, "-o", "json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert cleaned["metadata"]["labels"] == {"nvidia.com/gpu.present": "true", "kubernetes.io/hostname": "gpu-1",
                                             "modelcache.devices/x": "1"}
    (annotate,) = re.findall(r"kubectl annotate nodes --all (\S+)", block)
    assert annotate == f"{status_key(PREFIX)}-"
    after = json.loads(subprocess.run([k, "annotate", "--local", "-f", str(node), annotate, "-o", "json"],
                                      capture_output=True, text=True, check=True).stdout)
    assert after["metadata"]["annotations"] == {"other": "kept"}
    # a node the agent never touched yields no keys, and the loop then skips `kubectl label`
    bare = node_json(tmp_path, {"kubernetes.io/hostname": "cpu-1"}, {})
    assert subprocess.run([k, "label", "--local", "-f", str(bare), "dummy=1", "-o", f"go-template={template}"],
                          capture_output=True, text=True, check=True).stdout.strip() == ""
    assert 'if [ -n "$keys" ]' in block


def test_uninstall_and_upgrade_say_what_stays() -> None:
    upgrade = section(DEPLOY, "## Upgrade")
    for topic in ("CRD", "Image bump", "ConfigMap", "Rollback"):
        assert topic in upgrade, topic
    uninstall = section(DEPLOY, "## Uninstall")
    hostpath = load_file(MANIFESTS / "daemonset.yaml")[0]["spec"]["template"]["spec"]["volumes"]
    cache_path = next(v["hostPath"]["path"] for v in hostpath if v["name"] == "cache")
    assert f"rm -rf {cache_path}" in uninstall and "Cached data" in uninstall
    assert "Node labels and the status annotation" in uninstall


def test_pod_security_is_stated_next_to_the_workers() -> None:
    label = "pod-security.kubernetes.io/enforce=privileged"
    placing = section(DEPLOY, "## Placing workers")
    assert f"kubectl label namespace inference {label}" in placing and "`baseline`" in placing
    assert label in README.read_text()
    assert label in (EXAMPLES / "worker-deployment.yaml").read_text()
    ns = one(load_file(MANIFESTS / "namespace.yaml"), "Namespace")["metadata"]["labels"]
    privileges = section(DEPLOY, "## Privileges")
    for key, value in ns.items():
        assert f"{key}={value}" in privileges, f"the agent namespace's label {key}={value}"
