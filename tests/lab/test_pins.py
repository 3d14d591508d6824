"""Pins live on the node's bpffs whatever mount namespace the agent starts in: an agent started in a fresh
mount namespace (as a new pod is: `unshare -m`, the host's mounts seen as slaves) finds the node's pinned maps
and the connections opened before keep working; an agent whose /sys/fs/bpf is not the node's bpffs (a private
tmpfs over it) refuses to create maps there, says why, keeps retrying, and the node keeps forwarding with what
it had."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpflb.datapath.libbpf import lib, map_info
from bpflb.datapath.loader import tc_attached_prog_id
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import NODE1, HeldConnection, wait_until

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(mode="SNAT") as shared:
        yield shared


def ingress_prog() -> int | None:
    """The program bpflb attached on this namespace's eth0 ingress (run inside a node)."""
    return tc_attached_prog_id(socket.if_nametoindex("eth0"), ingress=True)


def map_ids(pin_root: Path) -> dict[str, int]:
    out = {}
    for name in ("lb_services", "lb_backends", "ct_fwd", "ct_rev"):
        fd = lib().bpf_obj_get(str(pin_root / name).encode())
        assert fd >= 0, f"no pin {pin_root / name}"
        try:
            out[name] = int(map_info(fd).id)
        finally:
            os.close(fd)
    return out


def test_an_agent_started_in_a_fresh_mount_namespace_keeps_the_pins_and_the_flows(lab: Lab) -> None:
    conn = HeldConnection(lab, "client", NODE1, 30080)
    try:
        first = conn.ask()
        assert not first.startswith("ERROR"), first
        maps = map_ids(lab.pin_root / "node1")
        pid = lab.restart_agent("node1", wrap=["unshare", "-m", "--propagation", "slave", "--"])
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), "not a fresh mount namespace"
        assert map_ids(lab.pin_root / "node1") == maps, "the agent made new maps"
        assert conn.ask() == first            # the same backend, and the same SNAT source the pod saw
    finally:
        conn.close()


def test_an_agent_without_the_nodes_bpffs_refuses_and_changes_nothing(lab: Lab) -> None:
    conn = HeldConnection(lab, "client", NODE1, 30080)
    log = lab.paths.agent_log("node1")
    try:
        first = conn.ask()
        assert not first.startswith("ERROR"), first
        prog = lab.run_in("node1", ingress_prog)
        maps = map_ids(lab.pin_root / "node1")
        before = len(log.read_text())
        private = ["unshare", "-m", "--", "sh", "-c", 'mount -t tmpfs tmpfs /sys/fs/bpf && exec "$@"', "agent"]
        pid = lab.restart_agent("node1", wrap=private, wait_ready=False)
        wait_until("the agent refusing twice (it retries)",
                   lambda: log.read_text()[before:].count("is not on a bpf filesystem") >= 2, 30)
        said = log.read_text()[before:]
        assert "refusing to create maps" in said and "bpflb mount-bpffs" in said
        assert os.path.exists(f"/proc/{pid}"), "the agent exited instead of retrying"
        assert lab.run_in("node1", ingress_prog) == prog, "the programs were replaced"
        assert map_ids(lab.pin_root / "node1") == maps
        assert conn.ask() == first
        body, error = lab.http_get("client", f"http://{NODE1}:30080/hostname", timeout=2.0)
        assert body and body.startswith("echo-"), error          # new flows too: the node kept forwarding
        lab.restart_agent("node1")                                # back in the node's own mount namespace
        assert conn.ask() == first and map_ids(lab.pin_root / "node1") == maps
    finally:
        conn.close()
