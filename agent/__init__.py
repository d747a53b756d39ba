"""model-cache-agent: keeps a node-local Hugging Face cache warm, verified and labelled."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Written at install time by setuptools-scm from the git tag (pyproject.toml [tool.setuptools_scm]).
    __version__ = version("model-cache-agent")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0"
