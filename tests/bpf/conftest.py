"""Fixtures for BPF unit tests (packet builders and helpers are in packets.py): the real bpf_lb.o loaded
in a scratch namespace that looks like node1 (routes and neighbours for its FIB lookups), its maps programmed by the agent's own code."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpflb.datapath.lbmaps import LBMaps
from bpflb.datapath.loader import load_lb, load_xdp, remove_pins
from bpflb_lab.scratch import scratch_node
from tests.bpf.packets import (  # noqa: F401 - the names this module exported before; new tests import packets
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    LOCAL_POD_MAC,
    LXC_MAC,
    NODE1,
    NODE2,
    NODE2_MAC,
    REMOTE_POD,
    Node,
    XdpNode,
)


@pytest.fixture
def node() -> Iterator[Node]:
    with scratch_node() as sn:
        obj = load_lb(None)
        try:
            yield Node(sn.ns, obj, LBMaps(obj), sn.eth0, sn.lxc0)
        finally:
            obj.close()


@pytest.fixture
def xnode() -> Iterator[XdpNode]:
    with scratch_node() as sn:
        obj = load_lb(None)
        xdp = load_xdp(None, share_with=obj)
        try:
            yield XdpNode(sn.ns, obj, LBMaps(obj), sn.eth0, sn.lxc0, xdp)
        finally:
            xdp.close()
            obj.close()


@pytest.fixture
def pin_root() -> Iterator[Path]:
    """A bpffs directory of the test's own for pinned maps, removed with everything in it afterwards."""
    root = Path(f"/sys/fs/bpf/bpflb-test-{uuid.uuid4().hex[:8]}")
    try:
        yield root
    finally:
        remove_pins(root)
