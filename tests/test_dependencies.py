"""Every import is a declared dependency, and each lower bound is a version the suite was run against."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQ = re.compile(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][^,;\s]*))?")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(group: str | None = None) -> dict[str, str | None]:
    reqs = PYPROJECT["project"]["optional-dependencies"][group] if group else PYPROJECT["project"]["dependencies"]
    out: dict[str, str | None] = {}
    for r in reqs:
        m = REQ.match(r)
        assert m, r
        out[norm(m.group(1))] = m.group(2)
    return out


def third_party_imports(folder: Path) -> set[str]:
    mods: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ("agent", "tests", "bench", "__future__")}


def distributions(module: str) -> set[str]:
    return {norm(d) for d in importlib.metadata.packages_distributions().get(module, [])}


def test_every_import_of_the_agent_is_a_runtime_dependency() -> None:
    runtime = set(declared())
    missing = {m: distributions(m) for m in third_party_imports(ROOT / "agent") if not distributions(m) & runtime}
    assert missing == {}, "import without a [project.dependencies] entry"


def test_every_installed_import_of_the_tests_is_declared() -> None:
    known = set(declared()) | set(declared("dev"))
    imports = third_party_imports(ROOT / "tests") | third_party_imports(ROOT / "e2e")
    # not installed here (e.g. NVIDIA's modelexpress client, which lives in its own venv): nothing to check;
    # modules of this repository (tools/release.py, once a test put tools/ on sys.path) are not dependencies
    present = {m for m in imports if (spec := importlib.util.find_spec(m)) is not None
               and not str(spec.origin or "").startswith(str(ROOT) + "/")}
    missing = {m: distributions(m) for m in present if not distributions(m) & known}
    assert missing == {}, "test import without a dependency entry"


def test_numpy_and_safetensors_are_not_runtime_dependencies() -> None:
    assert not {"numpy", "safetensors"} & set(declared())


def test_lower_bounds_are_the_pinned_tested_versions() -> None:
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[norm(name)] = version.strip()
    bounds = {**declared(), **{k: v for k, v in declared("dev").items() if k in pins}}
    assert set(pins) <= set(bounds)
    for name, bound in declared().items():
        assert bound is not None, f"{name} has no lower bound"
        assert name in pins, f"{name} is not pinned in .ci/min-versions.txt"
    for name, pin in pins.items():
        bound = bounds[name]
        assert bound is not None and pin.split(".")[: len(bound.split("."))] == bound.split("."), (name, bound, pin)
