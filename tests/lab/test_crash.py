"""`lab down` after a crash: everything is found again by name (namespaces) and by namespace inode
(processes), without relying on the state the crashed run left, or did not leave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpflb_lab.lab import Lab, LabError, netns, topology

pytestmark = pytest.mark.privileged


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry))
    return found


def test_down_after_up_was_killed_halfway(fresh_lab_name: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bpflb_lab.lab", "up", "--name", fresh_lab_name, "--no-agents"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"{fresh_lab_name}-pod-echo-a"
    deadline = time.monotonic() + 20
    while not netns.netns_exists(target) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert topology.lab_namespaces(fresh_lab_name), "the crash left namespaces behind"
    inodes = [i for i in (netns.netns_inode(n) for n in topology.lab_namespaces(fresh_lab_name)) if i]

    Lab(fresh_lab_name).down()
    assert topology.lab_namespaces(fresh_lab_name) == []
    assert netns.pids_in_netns(inodes) == {}
    assert processes_mentioning(f"/run/bpflb/labs/{fresh_lab_name}/") == []
    assert not Lab(fresh_lab_name).exists()


def test_down_finds_processes_by_namespace_when_the_state_is_gone(fresh_lab_name: str, pin_base: Path) -> None:
    lab = Lab(fresh_lab_name, pin_base=pin_base)
    lab.up(agents=False, nodes=2, workload=False)
    stray = subprocess.Popen(netns.nsenter_argv(f"{fresh_lab_name}-node1", ["sleep", "600"]),
                             start_new_session=True)
    (pin_base / fresh_lab_name / "node1").mkdir(parents=True)
    subprocess.run(["rm", "-rf", str(lab.paths.root)], check=True)  # the crash took the state with it

    with pytest.raises(LabError, match="is broken"):
        lab.status()
    report = Lab(fresh_lab_name, pin_base=pin_base).down()
    assert stray.pid in report.killed
    assert stray.wait(timeout=5) == -signal.SIGTERM
    assert topology.lab_namespaces(fresh_lab_name) == []
    assert not (pin_base / fresh_lab_name).exists()
