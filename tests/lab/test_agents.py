"""Agents as the lab runs them: spawned in each node's namespace from the command template, waited for
through <pin-root>/ready, reported with their log when they die or hang (a stand-in agent that programs
nothing; the real agent and datapath are tested in test_datapath.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bpflb_lab.lab import Lab, LabError
from bpflb_lab.lab.core import ENV_AGENT_CMD

pytestmark = pytest.mark.privileged

FAKE = Path(__file__).with_name("fake_agent.py")


def fake_cmd(behaviour: str) -> str:
    return (f"{sys.executable} {FAKE} --node {{node}} --source-dir {{source_dir}} --pin-root {{pin_root}} "
            f"--behaviour {behaviour}")


def test_up_waits_for_every_agent_and_down_removes_the_pin_root(fresh_lab_name: str, pin_base: Path) -> None:
    lines: list[str] = []
    lab = Lab(fresh_lab_name, pin_base=pin_base, agent_cmd=fake_cmd("ready"), log=lines.append)
    lab.up(nodes=2, workload=False)
    assert any("agent node2 ready" in line for line in lines)
    status = lab.status()
    assert [(a["node"], a["alive"], a["ready"]) for a in status["agents"]] == [("node1", True, True),
                                                                             ("node2", True, True)]
    log = Path(status["agents"][0]["log"]).read_text()
    assert "fake agent node1: ready" in log
    # the agent really runs inside its node's namespace
    pid = status["agents"][1]["pid"]
    node2_inode = Path(f"/run/netns/{fresh_lab_name}-node2").stat().st_ino
    assert Path(f"/proc/{pid}/ns/net").readlink() == Path(f"net:[{node2_inode}]")
    lab.down()
    assert not (pin_base / fresh_lab_name).exists()


def test_agent_command_from_the_environment(fresh_lab_name: str, pin_base: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_AGENT_CMD, fake_cmd("ready"))
    lab = Lab(fresh_lab_name, pin_base=pin_base)
    lab.up(nodes=1, workload=False)
    assert lab.agent_argv(lab.state(), "node1") == [
        sys.executable, str(FAKE), "--node", "node1", "--source-dir", str(lab.paths.cluster),
        "--pin-root", str(pin_base / fresh_lab_name / "node1"), "--behaviour", "ready"]
    assert lab.status()["agents"][0]["ready"]


def test_a_dying_agent_fails_up_with_its_log(fresh_lab_name: str, pin_base: Path) -> None:
    lab = Lab(fresh_lab_name, pin_base=pin_base, agent_cmd=fake_cmd("die"))
    with pytest.raises(LabError, match=r"(?s)agent on node\d exited \(code 3\).*simulated failure"):
        lab.up(nodes=2, workload=False)
    assert not lab.exists(), "a failed bring-up removes what it created"


def test_an_agent_that_never_gets_ready_times_out(fresh_lab_name: str, pin_base: Path) -> None:
    lab = Lab(fresh_lab_name, pin_base=pin_base, agent_cmd=fake_cmd("hang"))
    with pytest.raises(LabError, match="agents node1 not ready after 1s"):
        lab.up(nodes=1, workload=False, agent_timeout=1.0)
    assert not lab.exists()
