"""Release checks for .github/workflows/release.yml: the git tag is the one source of the version.

The tag ``vX.Y.Z`` gives the package version (setuptools-scm), the image tag and the image in the rendered
``install.yaml``. Two copies live in the tree and must agree with it, or the release stops before anything
is published: CHANGELOG.md's ``## [X.Y.Z] - YYYY-MM-DD`` section and manifests/kustomization.yaml's image,
which must be ``ghcr.io/<repository owner, lower case>/model-cache-agent:X.Y.Z`` so that
``kubectl apply -k manifests/`` at the tag installs exactly what the release pushed.

Standard library only: it runs on the runner's python3 before anything is installed.

    python3 tools/release.py check --tag v0.1.0 --owner OWNER --manifests install.yaml  # prints version=, image=
    python3 tools/release.py notes --version 0.1.0                                      # the CHANGELOG section
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_NAME = "model-cache-agent"
# Final releases and pre-releases whose PEP 440 form is also a valid image tag (no "+", no "-").
TAG_RE = re.compile(r"v(?P<version>(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)(?:(?:a|b|rc)(?:0|[1-9]\d*))?)")
OWNER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
IMAGE_LINE_RE = re.compile(r"^\s*(?:-\s+)?image:\s*[\"']?([^\"'\s]+)", re.M)


class ReleaseError(Exception):
    """A release input that disagrees with the tag; the message names the file to fix."""


def version_from_tag(tag: str) -> str:
    m = TAG_RE.fullmatch(tag)
    if not m:
        raise ReleaseError(f"tag {tag!r}: expected vX.Y.Z or vX.Y.Z(a|b|rc)N, e.g. v0.1.0")
    return m["version"]


def image_for(owner: str) -> str:
    """GHCR names are lower case; GitHub owners are not necessarily."""
    if not OWNER_RE.fullmatch(owner):
        raise ReleaseError(f"repository owner {owner!r}: not a GitHub user or organisation name")
    return f"ghcr.io/{owner.lower()}/{IMAGE_NAME}"


def changelog_section(changelog: str, version: str) -> str:
    """The body of ``## [version] - YYYY-MM-DD`` (Keep a Changelog), without its heading."""
    heading = re.compile(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}[ \t]*$", re.M)
    m = heading.search(changelog)
    if not m:
        raise ReleaseError(
            f"CHANGELOG.md: no '## [{version}] - YYYY-MM-DD' section: move the Unreleased entries under it first"
        )
    end = re.compile(r"^## |^\[[^\]]+\]:", re.M).search(changelog, m.end())
    return changelog[m.end() : end.start() if end else len(changelog)].strip()


def check_images(rendered: str, expected: str, source: str) -> None:
    images = set(IMAGE_LINE_RE.findall(rendered))
    if not images:
        raise ReleaseError(f"{source}: no image: lines; is it the output of kubectl kustomize manifests/?")
    wrong = sorted(images - {expected})
    if wrong:
        raise ReleaseError(
            f"{source}: image {wrong[0]}, expected {expected}: "
            "set images[0].newName and newTag in manifests/kustomization.yaml"
        )


def check(tag: str, owner: str, rendered_path: Path, changelog_path: Path) -> tuple[str, str]:
    version = version_from_tag(tag)
    image = image_for(owner)
    changelog_section(changelog_path.read_text(encoding="utf-8"), version)
    check_images(rendered_path.read_text(encoding="utf-8"), f"{image}:{version}", str(rendered_path))
    return version, image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check the tag against CHANGELOG.md and the rendered manifests")
    c.add_argument("--tag", required=True, help="the git tag, e.g. v0.1.0")
    c.add_argument("--owner", required=True, help="the GitHub repository owner (the GHCR namespace)")
    c.add_argument("--manifests", required=True, type=Path, help="output of `kubectl kustomize manifests/`")
    c.add_argument("--changelog", type=Path, default=ROOT / "CHANGELOG.md", help="default: %(default)s")
    n = sub.add_parser("notes", help="print the CHANGELOG.md section of a version (the release notes)")
    n.add_argument("--version", required=True)
    n.add_argument("--changelog", type=Path, default=ROOT / "CHANGELOG.md", help="default: %(default)s")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            version, image = check(args.tag, args.owner, args.manifests, args.changelog)
            print(f"version={version}\nimage={image}")
        else:
            print(changelog_section(args.changelog.read_text(encoding="utf-8"), args.version))
    except (ReleaseError, OSError) as e:
        print(f"release: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
