"""The pin root must be on the node's bpffs (no root needed to check the rule): the agent refuses a pin root on
any other filesystem with a message that says what to do, never mounts one of its own unless told, and keeps
retrying (reported through the after-sync hook) instead of crash-looping."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.loader import NotOnBpffs, ensure_bpffs, on_bpffs
from bpflb.datapath.memory import MemoryDatapath
from bpflb.model.types import Mode
from tests.unit.helpers import NODE, StaticSource


def test_a_pin_root_on_another_filesystem_is_refused_with_what_to_do(tmp_path: Path) -> None:
    assert not on_bpffs(tmp_path / "pins")
    with pytest.raises(NotOnBpffs) as refused:
        ensure_bpffs(tmp_path / "pins")
    text = str(refused.value)
    assert f"pin root {tmp_path / 'pins'} is not on a bpf filesystem" in text
    assert "refusing to create maps" in text and "bpflb mount-bpffs" in text and "--mount-bpffs" in text
    assert not (tmp_path / "pins").exists()              # nothing created on the wrong filesystem
    with pytest.raises(NotOnBpffs, match="not under /sys/fs/bpf"):
        ensure_bpffs(tmp_path / "pins", mount=True)      # told to mount: only the node's /sys/fs/bpf


class LateDatapath(MemoryDatapath):
    """A datapath whose load fails the first `failures` times, as before the node's bpffs is mounted."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def load(self) -> Mode | None:
        if self.failures:
            self.failures -= 1
            raise NotOnBpffs(2, "pin root /sys/fs/bpf/bpflb is not on a bpf filesystem")
        return super().load()


def test_the_agent_retries_loading_and_reports_why_meanwhile(tmp_path: Path) -> None:
    seen: list[Any] = []
    agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), StaticSource([], [], {"bpfLBMode": "SNAT"}),
                  on_sync=lambda a, report: seen.append((a.last_error, report)), datapath=LateDatapath(2))
    assert agent.start_retrying(first_delay=0.0)
    assert [r for _, r in seen] == [None, None]
    assert all("not on a bpf filesystem" in str(e) for e, _ in seen)
    assert agent.last_error is None and agent.run_once() is not None


def test_a_stopped_agent_stops_retrying(tmp_path: Path) -> None:
    agent = Agent(AgentOptions(NODE, tmp_path), StaticSource([], [], None), datapath=LateDatapath(10**6))
    agent.stop()
    assert agent.start_retrying() is False


@pytest.mark.privileged
def test_mount_bpffs_mounts_one_and_leaves_one_that_is_there(tmp_path: Path) -> None:
    """What the DaemonSet's init container runs, here in a private mount namespace of its own."""
    target = tmp_path / "bpf"
    run = [sys.executable, "-m", "bpflb", "mount-bpffs", str(target)]
    script = f"{shlex.join(run)} && {shlex.join(run)} && stat -f -c %T {shlex.quote(str(target))}"
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"mounted bpffs at {target}", f"bpffs already mounted at {target}", "bpf_fs"]
    assert not on_bpffs(target)                      # the test's own mount namespace never saw it
