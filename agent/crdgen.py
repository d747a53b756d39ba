"""Write the CachedModel ``spec`` schema from ``agent.core.schema`` into ``manifests/crd.yaml``.

``python -m agent.crdgen`` rewrites the lines between the ``BEGIN spec schema`` and ``END spec
schema`` markers (the rest of the CRD, its comments included, is left as it is); ``--check``
exits 1 when the file is out of date. Run it after changing ``SPEC_SCHEMA`` or ``SOURCE_KINDS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from agent.core.schema import SPEC_SCHEMA

BEGIN = "# BEGIN spec schema"
END = "# END spec schema"
DEFAULT_CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd.yaml"


class _Dumper(yaml.SafeDumper):
    """Block style, except short lists of scalars and small all-scalar mappings (``{type: string}``)."""


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool)


def _list(d: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(_scalar(v) for v in data) and len(str(data)) <= 60
    return d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _dict(d: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = len(data) <= 3 and all(_scalar(v) for v in data.values()) and len(str(data)) <= 60
    return d.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)


_Dumper.add_representer(list, _list)
_Dumper.add_representer(dict, _dict)


def spec_block(indent: int) -> list[str]:
    """``spec:`` and its schema as YAML lines at ``indent`` spaces."""
    body = yaml.dump(SPEC_SCHEMA, Dumper=_Dumper, sort_keys=False, width=200, indent=2)
    pad = " " * indent
    return [f"{pad}spec:", *(f"{pad}  {line}" for line in body.splitlines())]


def sync(text: str) -> str:
    """``text`` (a crd.yaml) with the spec schema between the markers replaced by the current one."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.strip().startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"expected one '{BEGIN}' line followed by one '{END}' line")
    begin, end = starts[0], ends[0]
    indent = len(lines[begin]) - len(lines[begin].lstrip())
    return "\n".join([*lines[: begin + 1], *spec_block(indent), *lines[end:]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.crdgen", description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", type=Path, default=DEFAULT_CRD, help="CRD file (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="only report whether the file is up to date (exit 1 if not)")
    args = ap.parse_args(argv)
    text = args.path.read_text()
    new = sync(text)
    if args.check:
        if new != text:
            print(f"{args.path}: spec schema is out of date; run: python -m agent.crdgen {args.path}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.path.write_text(new)
        print(f"{args.path}: spec schema updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
