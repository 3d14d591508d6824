"""Neighbour handling, live: BPF_PROG_TEST_RUN returns a redirect verdict without performing it, so these tests
attach the real bpf_lb.o to a scratch node's device and send real frames through it.

- Every tc redirect goes through the kernel's neighbour subsystem (fib.h): a STALE entry with a wrong MAC is
  re-verified because bpflb uses it (STALE -> DELAY -> PROBE -> re-resolution), and the traffic then reaches the
  real next hop; with bpf_redirect and the FIB's MAC it went to the dead MAC for as long as the entry lived.
- The agent's neighbour hygiene (bpflb.datapath.neighbours): when a machine leaves a bridge of the node, the
  IPv4 neighbours pointing at its MAC are forgotten at once, so a new pod given its address is resolved afresh
  instead of being sent to the old MAC for the kernel's reachable time and probes."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.loader import load_lb, tc_attach
from bpflb.datapath.neighbours import NeighbourHygiene, StationGone
from bpflb.model.types import Mode, Proto
from bpflb_lab.lab.netns import entered
from tests.bpf.packets import (
    CLIENT,
    NODE1,
    REMOTE_POD,
    backend,
    fe,
    state,
    wait_for,
)

pytestmark = pytest.mark.privileged

NEXT_HOP = "198.18.9.2"
WRONG_MAC = "02:de:ad:00:00:01"
ETH_P_ALL = 0x0003


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def mac_of(ns: str, dev: str) -> str:
    return ip(ns, "-o", "link", "show", dev).split("link/ether ")[1].split()[0]


def neigh_state(ns: str, addr: str, dev: str) -> tuple[str, str]:
    """(lladdr, state) of a neighbour entry, ("", "") when there is none."""
    words = ip(ns, "neigh", "show", addr, "dev", dev).split()
    if not words:
        return "", ""
    return (words[words.index("lladdr") + 1] if "lladdr" in words else ""), words[-1]


@dataclass
class Routed:
    """sender --eth0-- node (bpf_lb.o on eth0, route to the pods via NEXT_HOP on eth1) --eth1-- sink."""

    sender: str
    node: str
    sink: str
    frames_at_sink: list[bytes]

    def send(self, sport: int) -> None:
        """One UDP datagram from the client to NODE1:30081 (a Service whose backend is behind NEXT_HOP)."""
        payload = b"neigh"
        udp = struct.pack("!HHHH", sport, 30081, 8 + len(payload), 0) + payload
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(CLIENT),
                          socket.inet_aton(NODE1))
        total = sum(struct.unpack("!10H", hdr))
        total = (total & 0xFFFF) + (total >> 16)
        hdr = hdr[:10] + struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF) + hdr[12:]
        frame = bytes.fromhex(mac_of(self.node, "eth0").replace(":", "")) + \
            bytes.fromhex(mac_of(self.sender, "s0").replace(":", "")) + b"\x08\x00" + hdr + udp
        with entered(self.sender), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("s0", 0))
            s.send(frame)

    def delivered_to(self, mac: str) -> int:
        want = bytes.fromhex(mac.replace(":", ""))
        return sum(1 for f in list(self.frames_at_sink) if f[:6] == want and f[12:14] == b"\x08\x00")


@pytest.fixture
def routed() -> Iterator[Routed]:
    tag = uuid.uuid4().hex[:6]
    sender, node, sink = (f"bpflb-ut-{tag}-{h}" for h in ("s", "n", "d"))
    for ns in (sender, node, sink):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    stop = threading.Event()
    frames: list[bytes] = []
    obj = None
    try:
        ip(node, "link", "add", "eth0", "type", "veth", "peer", "name", "s0", "netns", sender)
        ip(node, "link", "add", "eth1", "type", "veth", "peer", "name", "d0", "netns", sink)
        for ns, devs in ((node, ("lo", "eth0", "eth1")), (sender, ("s0",)), (sink, ("d0",))):
            for dev in devs:
                ip(ns, "link", "set", dev, "up")
        ip(node, "addr", "add", f"{NODE1}/24", "dev", "eth0")
        ip(node, "addr", "add", "198.18.9.1/24", "dev", "eth1")
        ip(node, "route", "add", "10.244.2.0/24", "via", NEXT_HOP)
        ip(sink, "addr", "add", f"{NEXT_HOP}/24", "dev", "d0")
        ip(sender, "addr", "add", f"{CLIENT}/24", "dev", "s0")
        with entered(node):
            for path, value in (("ipv4/ip_forward", "1"),
                                # The kernel's probe timers, short (these are the kernel's to run, not bpflb's):
                                ("ipv4/neigh/eth1/delay_first_probe_time", "1"),
                                ("ipv4/neigh/eth1/retrans_time_ms", "100"), ("ipv4/neigh/eth1/ucast_solicit", "1")):
                with open(f"/proc/sys/net/{path}", "w") as f:
                    f.write(value)
            obj = load_lb(None)
            eth0 = socket.if_nametoindex("eth0")
            tc_attach(obj.prog_fd("lb_ingress"), eth0, ingress=True)
        maps = LBMaps(obj)
        maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=eth0))
        maps.sync(state(fe(NODE1, 30081, (backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP),),
                           proto=Proto.UDP)))
        with entered(sink):
            sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sniffer.bind(("d0", 0))
            sniffer.settimeout(0.1)

        def sniff() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    frames.append(sniffer.recv(2048))

        thread = threading.Thread(target=sniff, daemon=True)
        thread.start()
        yield Routed(sender, node, sink, frames)
        stop.set()
        thread.join()
        sniffer.close()
    finally:
        if obj is not None:
            obj.close()
        for ns in (sender, node, sink):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_a_stale_wrong_mac_is_reverified_because_bpflb_uses_it(routed: Routed) -> None:
    real = mac_of(routed.sink, "d0")
    ip(routed.node, "neigh", "replace", NEXT_HOP, "lladdr", WRONG_MAC, "dev", "eth1", "nud", "stale")
    routed.send(47000)
    # The kernel saw the entry in use: it left STALE (DELAY, then PROBE) instead of staying there forever.
    wait_for("the kernel to start verifying the next hop",
             lambda: neigh_state(routed.node, NEXT_HOP, "eth1")[1] in ("DELAY", "PROBE", "FAILED", "REACHABLE",
                                                                      "INCOMPLETE"))
    # Its probes of the dead MAC go unanswered, it resolves the address again, and traffic follows.
    sport = iter(range(47001, 48000))
    wait_for("a datagram delivered to the next hop's real MAC", lambda: routed.delivered_to(real) > 0,
             step=lambda: routed.send(next(sport)))
    assert neigh_state(routed.node, NEXT_HOP, "eth1")[0] == real


def test_a_missing_neighbour_is_resolved_by_the_kernel(routed: Routed) -> None:
    real = mac_of(routed.sink, "d0")
    with contextlib.suppress(subprocess.CalledProcessError):
        ip(routed.node, "neigh", "del", NEXT_HOP, "dev", "eth1")
    sport = iter(range(48000, 49000))
    wait_for("a datagram delivered after ARP", lambda: routed.delivered_to(real) > 0,
             step=lambda: routed.send(next(sport)))


# ---------------------------------------------------------------------------------------------- hygiene


@dataclass
class Bridged:
    node: str
    pods: dict[str, str]       # pod name -> namespace


def _first_syn_answered(addr: str, port: int) -> bool:
    """In the node: connect once; True when the first SYN was answered (accepted or refused), no retransmission."""
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((addr, port))
    except ConnectionRefusedError:
        pass
    except OSError:
        return False
    finally:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        s.close()
    return int(struct.unpack_from("=I", info, 100)[0]) == 0      # tcpi_total_retrans


@pytest.fixture
def bridged() -> Iterator[Bridged]:
    tag = uuid.uuid4().hex[:6]
    node = f"bpflb-ut-{tag}-n"
    pods = {p: f"bpflb-ut-{tag}-{p}" for p in ("a", "b")}
    subprocess.run(["ip", "netns", "add", node], check=True)
    try:
        ip(node, "link", "add", "cni0", "address", "02:62:6c:62:00:01", "type", "bridge")
        ip(node, "addr", "add", "10.9.0.1/24", "dev", "cni0")
        ip(node, "link", "set", "cni0", "up")
        for i, p in enumerate(pods, start=10):
            add_pod(node, p, pods[p], f"10.9.0.{i}")
        yield Bridged(node, pods)
    finally:
        for ns in (node, *pods.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def add_pod(node: str, name: str, ns: str, addr: str) -> None:
    subprocess.run(["ip", "netns", "add", ns], check=True)
    ip(node, "link", "add", f"veth{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip(node, "link", "set", f"veth{name}", "master", "cni0")
    ip(node, "link", "set", f"veth{name}", "up")
    ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
    ip(ns, "link", "set", "eth0", "up")


def remove_pod(node: str, name: str, ns: str) -> None:
    """Delete the pod's veth right away (a namespace's devices otherwise go when the kernel gets to it), then
    its namespace."""
    ip(node, "link", "del", f"veth{name}")
    subprocess.run(["ip", "netns", "del", ns], check=True)


def test_a_mac_leaving_the_bridge_takes_its_neighbour_entries_with_it(bridged: Bridged) -> None:
    node = bridged.node
    with entered(node):
        assert _first_syn_answered("10.9.0.10", 9) and _first_syn_answered("10.9.0.11", 9)
    old_mac = neigh_state(node, "10.9.0.10", "cni0")[0]
    assert old_mac and neigh_state(node, "10.9.0.11", "cni0")[0]
    ip(node, "neigh", "add", "10.9.0.50", "lladdr", old_mac, "dev", "cni0", "nud", "permanent")   # an admin's
    events: list[tuple[StationGone, list[str]]] = []
    with entered(node):
        hygiene = NeighbourHygiene(on_forget=lambda gone, forgotten: events.append((gone, forgotten)))
        hygiene.start()
    try:
        remove_pod(node, "a", bridged.pods["a"])
        wait_for("the old pod's neighbour entry to be forgotten",
                 lambda: neigh_state(node, "10.9.0.10", "cni0") == ("", ""))
        assert any(g.mac == old_mac and forgotten == ["10.9.0.10"] for g, forgotten in events), events
        assert neigh_state(node, "10.9.0.11", "cni0")[0], "another pod's entry stays"
        assert neigh_state(node, "10.9.0.50", "cni0") == (old_mac, "PERMANENT"), "permanent entries stay"
        # A new pod takes the address with a new MAC and says nothing: the node's first SYN reaches it.
        add_pod(node, "c", bridged.pods["a"], "10.9.0.10")
        with entered(node):
            assert _first_syn_answered("10.9.0.10", 9)
        assert neigh_state(node, "10.9.0.10", "cni0")[0] == mac_of(bridged.pods["a"], "eth0") != old_mac
    finally:
        hygiene.stop()


def test_without_the_hygiene_the_kernel_keeps_the_dead_mac(bridged: Bridged) -> None:
    """The control: the same replacement without the watcher leaves the old MAC in place."""
    node = bridged.node
    with entered(node):
        assert _first_syn_answered("10.9.0.10", 9)
    old_mac = neigh_state(node, "10.9.0.10", "cni0")[0]
    remove_pod(node, "a", bridged.pods["a"])
    add_pod(node, "c", bridged.pods["a"], "10.9.0.10")
    assert neigh_state(node, "10.9.0.10", "cni0")[0] == old_mac
    with entered(node):
        assert not _first_syn_answered("10.9.0.10", 9)


def test_an_address_asked_for_while_its_new_pod_came_up_is_resolved_without_the_kernels_wait(bridged: Bridged) -> None:
    """Traffic to the address between the old pod's going and the new pod's coming leaves the kernel resolving it
    (INCOMPLETE), asking again only after its retransmit time (here 10 s, 1 s by default). The watcher asks for
    each address it forgot, from the bridge, until the kernel holds a new MAC: the new pod's reply completes the
    pending entry at once, well before the kernel's own next request."""
    node = bridged.node
    with entered(node):
        assert _first_syn_answered("10.9.0.10", 9)
    old_mac = neigh_state(node, "10.9.0.10", "cni0")[0]
    subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.neigh.cni0.retrans_time_ms=10000"],
                   check=True)
    with entered(node):
        hygiene = NeighbourHygiene()
        hygiene.start()
    try:
        remove_pod(node, "a", bridged.pods["a"])
        wait_for("the old pod's neighbour entry to be forgotten",
                 lambda: neigh_state(node, "10.9.0.10", "cni0") == ("", ""))
        with entered(node), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"while it is away", ("10.9.0.10", 9))             # the kernel starts resolving: no answer
        assert neigh_state(node, "10.9.0.10", "cni0")[1] == "INCOMPLETE"
        add_pod(node, "c", bridged.pods["a"], "10.9.0.10")
        # Within 3 s of the new pod's coming, the kernel's own next request being 10 s away.
        wait_for("the kernel's entry to hold the new pod's MAC",
                 lambda: neigh_state(node, "10.9.0.10", "cni0")[0] == mac_of(bridged.pods["a"], "eth0"), timeout=3)
        assert neigh_state(node, "10.9.0.10", "cni0")[0] != old_mac
    finally:
        hygiene.stop()
