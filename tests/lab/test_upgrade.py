"""Upgrades keep flows, on the wire: connections opened through node1 — one SNAT'd, one by DSR (the backend's
node answering the client directly) — keep working after every agent restarts with another build of the
objects (`make bpf-layout-test`: conntrack half the size, a field added to struct ct_entry), whose maps the
agents take over from the pins, and again after going back to the default build; and the same between the
previous version (its code and objects) and this one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpflb.datapath.libbpf import lib, map_info, objects_dir
from bpflb_lab.bench_kube import baseline_code
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import NODE1, HeldConnection

pytestmark = pytest.mark.privileged

NODES = ("node1", "node2", "node3")
CLIENT = "198.18.0.100"
LAYOUT_TEST_DIR = Path(__file__).resolve().parents[2] / "bpf_objects" / "build-layout-test"
# The version before this one (main at the previous round's start): its lb_stats held 72 counters, this one's 80.
PREVIOUS, PREVIOUS_STATS, STAT_MAX = "64085a5", 72, 80


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(mode="SNAT") as shared:
        yield shared


def ct_shape(lab: Lab, node: str) -> tuple[int, int]:
    """(max_entries, value size) of a node's pinned ct_fwd."""
    fd = lib().bpf_obj_get(str(lab.pin_root / node / "ct_fwd").encode())
    assert fd >= 0
    try:
        info = map_info(fd)
        return int(info.max_entries), int(info.value_size)
    finally:
        os.close(fd)


def restart_all(lab: Lab, obj_dir: Path) -> None:
    assert (obj_dir / "bpf_lb.o").exists(), f"{obj_dir}/bpf_lb.o is missing: run `make bpf bpf-layout-test`"
    for node in NODES:
        lab.restart_agent(node, env={"BPFLB_BPF_DIR": str(obj_dir)})


def test_snat_and_dsr_connections_survive_an_upgrade_and_a_downgrade_of_the_map_layout(lab: Lab) -> None:
    snat = HeldConnection(lab, "client", NODE1, 30080)
    lab.set_mode("DSR")
    dsr = HeldConnection(lab, "client", NODE1, 30080)
    try:
        before = {"snat": snat.ask(), "dsr": dsr.ask()}
        assert before["snat"].split()[1].startswith(f"{NODE1}:"), before      # the pod saw node1 (SNAT)
        assert before["dsr"].split()[1].startswith(f"{CLIENT}:"), before     # the pod saw the client (DSR)
        assert {ct_shape(lab, n) for n in NODES} == {(262144, 48)}

        restart_all(lab, LAYOUT_TEST_DIR)                                     # the upgrade
        assert {ct_shape(lab, n) for n in NODES} == {(131072, 56)}
        assert {"snat": snat.ask(), "dsr": dsr.ask()} == before
        log = lab.paths.agent_log("node1").read_text()
        assert "value layout +layout_test" in log and "map ct_fwd taken over" in log
        assert not any((lab.pin_root / n / "migrating").exists() for n in NODES)

        restart_all(lab, objects_dir())                                       # and back
        assert {ct_shape(lab, n) for n in NODES} == {(262144, 48)}
        assert {"snat": snat.ask(), "dsr": dsr.ask()} == before
        assert "value layout -layout_test" in lab.paths.agent_log("node1").read_text()
        body, error = lab.http_get("client", f"http://{NODE1}:30080/hostname", timeout=2.0)
        assert body and body.startswith("echo-"), error                      # and new connections are served
    finally:
        snat.close()
        dsr.close()


def test_connections_survive_an_upgrade_from_the_previous_version_and_a_downgrade_to_it(lab: Lab) -> None:
    """The real thing, not a test build: every agent runs the previous version (its code and its objects,
    PREVIOUS, checked out and built) on the pins; connections opened through node1 under it (SNAT and DSR)
    keep working when every agent is upgraded to this version, and again after going back to the previous
    one. Between the two, the objects changed (lb_stats grew, programs changed): the agents take the maps over."""
    previous = baseline_code(PREVIOUS)
    env = {"PYTHONPATH": str(previous / "operator"), "BPFLB_BPF_DIR": str(previous / "bpf_objects" / "build"),
           "BPFLB_BPF_INCLUDE": str(previous / "bpf_objects" / "include")}
    imported = subprocess.run([sys.executable, "-c", "import bpflb.agent; print(bpflb.agent.__file__)"],
                              env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    assert imported.startswith(str(previous)), imported       # that environment runs the previous version's code
    lab.set_mode("SNAT")
    for node in NODES:
        lab.restart_agent(node, env=env)
    snat = HeldConnection(lab, "client", NODE1, 30080)
    lab.set_mode("DSR")
    dsr = HeldConnection(lab, "client", NODE1, 30080)
    try:
        before = {"snat": snat.ask(), "dsr": dsr.ask()}
        assert before["snat"].split()[1].startswith(f"{NODE1}:"), before
        assert before["dsr"].split()[1].startswith(f"{CLIENT}:"), before
        assert stats_entries(lab) == PREVIOUS_STATS

        restart_all(lab, objects_dir())                                       # the upgrade
        assert {"snat": snat.ask(), "dsr": dsr.ask()} == before
        assert stats_entries(lab) == STAT_MAX
        assert "map lb_stats taken over" in lab.paths.agent_log("node1").read_text()

        for node in NODES:                                                    # and back
            lab.restart_agent(node, env=env)
        assert {"snat": snat.ask(), "dsr": dsr.ask()} == before
        assert stats_entries(lab) == PREVIOUS_STATS
        body, error = lab.http_get("client", f"http://{NODE1}:30080/hostname", timeout=2.0)
        assert body and body.startswith("echo-"), error
    finally:
        snat.close()
        dsr.close()
        restart_all(lab, objects_dir())         # the module's lab goes on with this version


def stats_entries(lab: Lab) -> int:
    """max_entries of node1's pinned lb_stats (the one map whose size the two versions disagree on)."""
    fd = lib().bpf_obj_get(str(lab.pin_root / "node1" / "lb_stats").encode())
    assert fd >= 0
    try:
        return int(map_info(fd).max_entries)
    finally:
        os.close(fd)
