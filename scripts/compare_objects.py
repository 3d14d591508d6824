#!/usr/bin/env python3
"""Per-packet cost of two or more builds of the datapath, side by side in one run (e.g. a change against
the commit before it).  Usage: compare_objects.py LABEL=DIR LABEL=DIR ... (each DIR holds bpf_lb.o,
bpf_xdp.o, bpf_pass.o, bpf_xdp_pass.o and bpf_gen.o; build an older commit's with `git archive` + clang).

Two measurements, alternating the builds round by round so drift hits them alike:

- BPF_PROG_TEST_RUN: median ns of single runs of the programs on fresh packets (as `bpflb bench`).  This
  is the program alone: what a redirect helper costs once the program returned (bpf_redirect_neigh's
  neighbour output, say) is not in it.
- Live forwarding: 60-byte UDP frames of 256 established SNAT flows, sent by an XDP live-frames sender
  in one scratch namespace through a node namespace (the build's tc programs on its eth0, behind a
  pass-through XDP program or the build's XDP program) to a sink namespace that counts and drops them.
  The whole path runs in the sender's softirq on one CPU, so 1e9 / rate is the path's cost per packet,
  redirect and neighbour output included; the difference between builds is the difference in cost.

Everything lives in namespaces it creates and deletes; nothing touches the root namespace."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from scapy.layers.inet import IP, TCP, IPOption
from scapy.layers.l2 import Ether

from bpflb.datapath.clustermaps import dsr_member_key, l4_key
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.libbpf import BpfError
from bpflb.datapath.loader import BpfObject, load_lb, load_xdp, tc_attach, xdp_attach
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Mode, Proto
from bpflb_lab import trafficgen as tg
from bpflb_lab.lab.netns import entered

NODE1, CLIENT, REMOTE_POD, LOCAL_POD = "198.18.0.11", "198.18.0.100", "10.244.2.10", "10.244.1.10"
OTHER_NODE = "198.18.0.13"                              # the node a DSR request entered through
SINK_NET_NODE, SINK_ADDR = "198.18.9.1", "198.18.9.2"   # the node's side and the next hop towards the pods


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def state() -> DesiredState:
    fes = {}
    for port, proto, pod, local in ((30080, Proto.TCP, REMOTE_POD, False), (30081, Proto.UDP, REMOTE_POD, False),
                                    (30082, Proto.TCP, LOCAL_POD, True)):
        l4 = L4Addr(IPv4Address(NODE1), port, proto)
        be = Backend(L4Addr(IPv4Address(pod), 8080, proto), pod, "n", local)
        fes[l4] = Frontend(l4, FrontendKind.NODEPORT, "bench/echo", str(port), False, (be,), False)
    return DesiredState("node1", (IPv4Address(NODE1),), fes)


@dataclass
class Topo:
    sender: str
    node: str
    sink: str
    eth0: int
    s0_mac: str
    eth0_mac: str
    pin: Path


@contextlib.contextmanager
def topology() -> Iterator[Topo]:
    tag = uuid.uuid4().hex[:6]
    sender, node, sink = (f"bpflb-cmp-{tag}-{h}" for h in ("s", "n", "d"))
    pin = Path(f"/sys/fs/bpf/bpflb-cmp-{tag}")
    for ns in (sender, node, sink):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip(node, "link", "add", "eth0", "type", "veth", "peer", "name", "s0", "netns", sender)
        ip(node, "link", "add", "eth1", "type", "veth", "peer", "name", "d0", "netns", sink)
        ip(node, "link", "add", "lxc0", "type", "veth", "peer", "name", "pod0")
        for ns, devs in ((node, ("lo", "eth0", "eth1", "lxc0", "pod0")), (sender, ("lo", "s0")), (sink, ("lo", "d0"))):
            for dev in devs:
                ip(ns, "link", "set", dev, "up")
        ip(node, "addr", "add", f"{NODE1}/24", "dev", "eth0")
        ip(node, "addr", "add", f"{SINK_NET_NODE}/24", "dev", "eth1")
        ip(node, "addr", "add", "10.244.1.1/24", "dev", "lxc0")
        ip(node, "route", "add", "10.244.2.0/24", "via", SINK_ADDR)
        ip(sink, "addr", "add", f"{SINK_ADDR}/24", "dev", "d0")
        ip(sender, "addr", "add", f"{CLIENT}/24", "dev", "s0")
        with entered(node):
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
            eth0 = socket.if_nametoindex("eth0")
        mac = {}
        for ns, dev in ((sender, "s0"), (node, "eth0"), (sink, "d0")):
            out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", dev], check=True, capture_output=True,
                                 text=True).stdout
            mac[dev] = out.split("link/ether ")[1].split()[0]
        # Resolved next hops, as on a busy node (the neighbour cache's fast path for every build).
        ip(node, "neigh", "replace", SINK_ADDR, "lladdr", mac["d0"], "dev", "eth1", "nud", "permanent")
        ip(node, "neigh", "replace", CLIENT, "lladdr", mac["s0"], "dev", "eth0", "nud", "permanent")
        ip(node, "neigh", "replace", LOCAL_POD, "lladdr", "02:00:00:00:01:10", "dev", "lxc0", "nud", "permanent")
        pin.mkdir(parents=True)
        with entered(sink):
            tg.attach_in_ns("xdp_sink", "d0", str(pin))
        yield Topo(sender, node, sink, eth0, mac["s0"], mac["eth0"], pin)
    finally:
        for ns in (sender, node, sink):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(pin, ignore_errors=True)


class _Tolerant:
    """An object whose missing maps read as None: an older build lacks maps LBMaps opens for later features
    (none of which the measured paths use)."""

    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj

    def map(self, name: str) -> object:
        try:
            return self.obj.map(name)
        except BpfError:
            return None


class Build:
    """One build's objects loaded (unpinned) with their maps programmed for the node."""

    def __init__(self, label: str, obj_dir: Path, topo: Topo) -> None:
        self.label, self.dir = label, obj_dir
        with entered(topo.node):
            self.lb = load_lb(None, obj_dir)
            self.xdp = load_xdp(None, share_with=self.lb, obj_dir=obj_dir)
            self.xdp_pass = BpfObject(obj_dir / "bpf_xdp_pass.o", None)
        self.maps = LBMaps(_Tolerant(self.lb))   # type: ignore[arg-type]
        self.maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=topo.eth0))
        self.maps.sync(state())
        accept_dsr(self)

    def clear_conntrack(self) -> None:
        for m in (self.maps.ct_fwd, self.maps.ct_rev):
            for key in [k for k, _ in m.items_raw()]:
                m.delete_raw(key)

    def close(self) -> None:
        for obj in (self.xdp_pass, self.xdp, self.lb):
            obj.close()


def tcp_frame(topo: Topo, sport: int, flags: str, dport: int = 30080) -> bytes:
    return bytes(Ether(src=topo.s0_mac, dst=topo.eth0_mac) / IP(src=CLIENT, dst=NODE1, ttl=64) /
                 TCP(sport=sport, dport=dport, flags=flags))


def test_run_rows(b: Build, topo: Topo, samples: int) -> dict[str, float]:
    rows: dict[str, float] = {}

    def tc(frame: bytes) -> int:
        return b.lb.test_run("lb_ingress", frame, ifindex=topo.eth0).duration_ns

    def xdp(frame: bytes) -> int:
        return b.xdp.test_run_xdp("xdp_lb_prog", frame, ifindex=topo.eth0).duration_ns

    def median(run: object, frames: list[bytes]) -> float:
        return float(statistics.median(run(f) for f in frames))  # type: ignore[operator]

    with entered(topo.node):
        rows["tc non-service packet"] = median(tc, [tcp_frame(topo, 1000, "S", 22)] * samples)
        for hook, run, base in (("tc", tc, 20000), ("XDP", xdp, 40000)):
            b.clear_conntrack()
            rows[f"{hook} SNAT new flow"] = median(run, [tcp_frame(topo, base + i, "S") for i in range(samples)])
            rows[f"{hook} SNAT established flow"] = median(run, [tcp_frame(topo, base, "A")] * samples)
            nat_port = next(int.from_bytes(int(e.nat_port).to_bytes(2, "little"), "big")
                            for k, e in b.maps.flows()
                            if int.from_bytes(int(k.sport).to_bytes(2, "little"), "big") == base)
            reply = bytes(Ether(dst=topo.eth0_mac) / IP(src=REMOTE_POD, dst=NODE1, ttl=63) /
                          TCP(sport=8080, dport=nat_port, flags="A"))
            rows[f"{hook} SNAT reply"] = median(run, [reply] * samples)
        b.clear_conntrack()
        rows["tc local backend, established"] = median(tc, [tcp_frame(topo, 50000, "A", 30082)] * samples)
        option = IPOption(b"\x9a\x08" + (30080).to_bytes(2, "big") + IPv4Address(OTHER_NODE).packed)
        dsr = [bytes(Ether(src=topo.s0_mac, dst=topo.eth0_mac) / IP(src=CLIENT, dst=LOCAL_POD, ttl=63,
                                                                   options=[option]) /
                     TCP(sport=52000 + i, dport=8080, flags="S")) for i in range(samples)]
        rows["tc DSR request accepted (backend node)"] = median(tc, dsr)
    return rows


def accept_dsr(b: Build) -> None:
    """OTHER_NODE:30080 names LOCAL_POD:8080, in whichever maps the build has (older ones lack lb_dsr_backends)."""
    fe = L4Addr(IPv4Address(OTHER_NODE), 30080, Proto.TCP)
    b.lb.map("lb_dsr_frontends").update_raw(l4_key(fe), b"\x01")
    b.lb.map("lb_local_backends").update_raw(l4_key(L4Addr(IPv4Address(LOCAL_POD), 8080, Proto.TCP)), b"\x01")
    with contextlib.suppress(BpfError):
        b.lb.map("lb_dsr_backends").update_raw(
            dsr_member_key(L4Addr(IPv4Address(0), 30080, Proto.TCP), L4Addr(IPv4Address(LOCAL_POD), 8080, Proto.TCP)),
            b"\x01")


def live_rate(b: Build, topo: Topo, xdp_mode: bool, seconds: float) -> float:
    """Frames per second reaching the sink through the node with this build attached."""
    with entered(topo.node):
        tc_attach(b.lb.prog_fd("lb_ingress"), topo.eth0, ingress=True)
        tc_attach(b.lb.prog_fd("lb_egress"), topo.eth0, ingress=False)
        prog = b.xdp.prog_fd("xdp_lb_prog") if xdp_mode else b.xdp_pass.prog_fd("xdp_pass")
        xdp_attach(prog, topo.eth0, "Native")
    frame = tg.udp_frame(topo.s0_mac, topo.eth0_mac, CLIENT, NODE1, 30081)
    with entered(topo.sender):
        tg.live_send_in_ns(frame, 0.2, "s0", cpu=0)          # the 256 flows exist before counting
        before = tg.read_sink(topo.pin)
        sent = tg.live_send_in_ns(frame, seconds, "s0", cpu=0)
        got = tg.read_sink(topo.pin) - before
    if got < sent.sent * 0.9:
        print(f"  !! {b.label}: only {got} of {sent.sent} frames reached the sink", file=sys.stderr)
    return got / sent.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", help="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    specs = [(s.split("=", 1)[0], Path(s.split("=", 1)[1]).resolve()) for s in args.builds]
    runs: dict[str, dict[str, list[float]]] = {label: {} for label, _ in specs}
    with topology() as topo:
        builds = [Build(label, d, topo) for label, d in specs]
        try:
            for r in range(args.rounds):
                print(f"  .. round {r + 1}/{args.rounds}", file=sys.stderr)
                for b in builds:
                    for name, value in test_run_rows(b, topo, args.samples).items():
                        runs[b.label].setdefault(name, []).append(value)
                    for mode, xdp_mode in (("tc", False), ("XDP", True)):
                        b.clear_conntrack()
                        rate = live_rate(b, topo, xdp_mode, args.seconds)
                        runs[b.label].setdefault(f"live {mode}: SNAT established, ns/packet", []).append(1e9 / rate)
        finally:
            for b in builds:
                b.close()
    labels = [label for label, _ in specs]
    names = list(runs[labels[0]])
    width = max(len(n) for n in names) + 2
    print(f"{'median ns over rounds':<{width}}" + "".join(f"{label:>14}" for label in labels) +
          "".join(f"{label + '-' + labels[0]:>16}" for label in labels[1:]))
    for name in names:
        vals = [statistics.median(runs[label][name]) for label in labels]
        print(f"{name:<{width}}" + "".join(f"{v:>14.0f}" for v in vals) +
              "".join(f"{v - vals[0]:>+16.0f}" for v in vals[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
