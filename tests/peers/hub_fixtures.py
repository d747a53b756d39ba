"""pytest fixtures around ``HubServer``: one server per session, faults and log reset per test.

Repos served (every tree listing is paged, ``page_size=4``):

    org/tiny      main + tag v1.0 -> commit A (11 MiB LFS weights, nested original/params.json);
                  dev -> commit B (other seed, 1 MiB weights)
    org/cdn       same files as A; LFS bytes answered with a 302 to the CDN listener (another origin)
    org/gated     gated: 401 + X-Error-Code GatedRepo without ``Authorization: Bearer <TOKEN>``

Use in a test module::

    import tests.peers.hub_fixtures as hub_fixtures
    hub = hub_fixtures.hub          # a fixture: the running server, clean for this test
    hub_models = hub_fixtures.hub_models
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from agent.modelgen import MiB, make_model_dir
from tests.peers.hub_server import HubServer

TOKEN = "hf_test_0123456789abcdefSECRET"
LFS_SIZE = 11 * MiB


@dataclass(frozen=True)
class HubModels:
    src: Path  # files of commit A
    src_dev: Path  # files of commit B
    commit: str  # org/tiny main, v1.0; org/cdn main
    commit_dev: str
    gated_commit: str


@pytest.fixture(scope="session")
def hub_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubServer, HubModels]]:
    root = tmp_path_factory.mktemp("hub-models")
    src, dev, gated = root / "a", root / "b", root / "g"
    make_model_dir(src, weight_bytes=LFS_SIZE, seed=0)
    make_model_dir(dev, weight_bytes=1 * MiB, seed=1)
    make_model_dir(gated, weight_bytes=1 * MiB, seed=2, nested=False)
    with HubServer(token=TOKEN, page_size=4) as server:
        commit = server.add_repo("org/tiny", src, refs=("main",), tags=("v1.0",))
        commit_dev = server.add_repo("org/tiny", dev, refs=("dev",))
        server.add_repo("org/cdn", src, refs=("main",), cdn=True, commit=commit)
        gated_commit = server.add_repo("org/gated", gated, gated=True)
        yield server, HubModels(src, dev, commit, commit_dev, gated_commit)


@pytest.fixture
def hub(hub_session: tuple[HubServer, HubModels]) -> Iterator[HubServer]:
    server = hub_session[0]
    server.clear()
    yield server
    server.clear()


@pytest.fixture
def hub_models(hub_session: tuple[HubServer, HubModels]) -> HubModels:
    return hub_session[1]
