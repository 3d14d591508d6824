"""A scratch namespace that looks like node1 to the datapath (eth0 on the underlay, lxc0 to a local
pod, a route to node2's pods, permanent neighbours), for BPF unit tests and benchmarks.
BPF_PROG_TEST_RUN's FIB lookups run in the caller's namespace, so callers enter it around test runs."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bpflb_lab.lab.netns import entered

NODE1 = "198.18.0.11"
NODE2 = "198.18.0.12"
CLIENT = "198.18.0.100"
ETH0_MAC = "02:00:00:00:00:11"
NODE2_MAC = "02:00:00:00:00:12"
CLIENT_MAC = "02:00:00:00:00:64"
LXC_MAC = "02:00:00:00:01:01"
LOCAL_POD = "10.244.1.10"
LOCAL_POD_MAC = "02:00:00:00:01:10"
REMOTE_POD = "10.244.2.10"


@dataclass(frozen=True)
class ScratchNode:
    ns: str
    eth0: int
    lxc0: int


def _ip(ns: str, *cmd: str) -> None:
    done = subprocess.run(["ip", "-n", ns, *cmd], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {ns} {' '.join(cmd)}: {done.stderr.strip()}")


@contextmanager
def scratch_node(prefix: str = "bpflb-ut") -> Iterator[ScratchNode]:
    """Create the namespace, yield its interface indexes, always delete it."""
    ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        _ip(ns, "link", "set", "lo", "up")
        _ip(ns, "link", "add", "eth0", "address", ETH0_MAC, "type", "veth", "peer", "name", "wire0")
        _ip(ns, "link", "add", "lxc0", "address", LXC_MAC, "type", "veth", "peer", "name", "pod0")
        for dev in ("eth0", "wire0", "lxc0", "pod0"):
            _ip(ns, "link", "set", dev, "up")
        _ip(ns, "addr", "add", f"{NODE1}/24", "dev", "eth0")
        _ip(ns, "addr", "add", "10.244.1.1/24", "dev", "lxc0")
        _ip(ns, "route", "add", "10.244.2.0/24", "via", NODE2)
        _ip(ns, "neigh", "add", NODE2, "lladdr", NODE2_MAC, "dev", "eth0", "nud", "permanent")
        _ip(ns, "neigh", "add", CLIENT, "lladdr", CLIENT_MAC, "dev", "eth0", "nud", "permanent")
        _ip(ns, "neigh", "add", LOCAL_POD, "lladdr", LOCAL_POD_MAC, "dev", "lxc0", "nud", "permanent")
        with entered(ns):
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
            eth0, lxc0 = socket.if_nametoindex("eth0"), socket.if_nametoindex("lxc0")
        yield ScratchNode(ns, eth0, lxc0)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
