"""/healthz and /readyz: alive from the first second, dead when an agent thread died (issue 10 items 6, 12)."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.metrics import Health
from tests.agent_harness import running_agent, settings_for, wait_until
from tests.peers.net import free_port


def test_a_dead_thread_fails_healthz_and_names_it() -> None:
    now = [100.0]
    h = Health(max_pass_age=30.0, last_pass=lambda: 95.0, clock=lambda: now[0])
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    h.watch("loop", lambda: True)
    assert h.alive() == (True, "ok")
    h.watch("scrub", done.is_alive)
    assert h.alive() == (False, "dead: scrub")


def test_a_stalled_loop_fails_healthz_but_not_before_its_first_pass() -> None:
    now = [1000.0]
    last = [0.0]
    h = Health(max_pass_age=30.0, last_pass=lambda: last[0], clock=lambda: now[0])
    assert h.alive()[0]  # no pass yet (waiting for the API): alive, not ready
    assert h.ready() == (False, "initial scan not done")
    last[0] = 990.0
    h.ready_when(lambda: True)
    assert h.alive()[0] and h.ready() == (True, "ok")
    now[0] = 1021.0
    ok, why = h.alive()
    assert not ok and why.startswith("loop stalled")


def test_healthz_is_served_while_the_api_server_cannot_be_reached(tmp_path: Path) -> None:
    mf = tmp_path / "models.yaml"
    mf.write_text("[]\n")
    settings = settings_for(tmp_path / "cache", mf, ["hub"], kubernetes=True,
                            kube_host=f"http://127.0.0.1:{free_port()}")
    with running_agent(settings) as agent:
        assert agent.get("/healthz") == (200, "ok\n")  # a liveness probe must not restart a patient agent
        code, body = agent.get("/readyz")
        assert code == 503 and "waiting for the API server" in body
        assert agent.get("/nope")[0] == 404 and agent.get("/metrics")[0] == 200
    wait_until(lambda: agent.result == [0], 10)
