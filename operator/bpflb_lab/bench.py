"""`bpflb bench`: the datapath's per-packet BPF cost (BPF_PROG_TEST_RUN) for each path, with 1, 1,000
and 10,000 Services programmed, side by side with a pass-through program measured in the same run."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from scapy.layers.inet import IP, TCP, IPOption
from scapy.layers.l2 import Ether

from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.libbpf import objects_dir
from bpflb.datapath.loader import BpfObject, load_lb, load_xdp
from bpflb.model.cluster import ANY_NODE, DsrFrontendKind
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Mode, Proto
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import (
    CLIENT,
    CLIENT_MAC,
    ETH0_MAC,
    LOCAL_POD,
    NODE1,
    NODE2_MAC,
    REMOTE_POD,
    scratch_node,
)

SERVICE_COUNTS = (1, 1_000, 10_000)
OTHER_NODE = "198.18.0.13"   # the node a DSR request entered through, seen from a backend's node
PATHS = ("pass-through program", "non-service packet",
         "SNAT new flow", "SNAT established flow", "SNAT reply (node1)",
         "DSR new flow (SYN + option)", "DSR established flow", "DSR reply (backend node)",
         "XDP pass-through program", "XDP non-service packet",
         "XDP SNAT new flow", "XDP SNAT established flow", "XDP SNAT reply (node1)",
         "XDP DSR new flow (SYN + option)", "XDP DSR established flow")


def floor_of(path: str) -> str:
    """The floor a path is compared with: the minimal program of its own hook."""
    return "XDP pass-through program" if path.startswith("XDP") else "pass-through program"


@dataclass
class Column:
    services: int
    single: dict[str, float] = field(default_factory=dict)   # median ns, repeat=1, distinct packets
    looped: dict[str, float] = field(default_factory=dict)   # ns, repeat=N on one unchanged packet
    sync_seconds: float = 0.0


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _services(n: int) -> DesiredState:
    """n frontends: the measured NodePort plus n-1 LoadBalancer IPs, two remote backends each."""
    fes: dict[L4Addr, Frontend] = {}
    measured = L4Addr(IPv4Address(NODE1), 30080, Proto.TCP)
    backends = (Backend(L4Addr(IPv4Address(REMOTE_POD), 8080, Proto.TCP), "echo-a", "node2", False),)
    fes[measured] = Frontend(measured, FrontendKind.NODEPORT, "default/echo", "http", False, backends, False)
    base = int(IPv4Address("198.19.0.1"))
    for i in range(n - 1):
        l4 = L4Addr(IPv4Address(base + i), 80, Proto.TCP)
        bes = tuple(Backend(L4Addr(IPv4Address(int(IPv4Address("10.244.2.0")) + 1 + (i * 2 + j) % 250), 8080,
                                   Proto.TCP), f"pod-{i}-{j}", "node2", False) for j in range(2))
        fes[l4] = Frontend(l4, FrontendKind.LOADBALANCER, f"bench/svc-{i}", "http", False, bes, False)
    return DesiredState("node1", (IPv4Address(NODE1),), fes)


def _syn(sport: int, flags: str = "S", dst: str = NODE1, dport: int = 30080) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=dst, ttl=64) /
                 TCP(sport=sport, dport=dport, flags=flags))


def _flow_rows(col: Column, maps: LBMaps, eth0: int, run: Callable[[bytes], int], hook: str,
               samples: int) -> None:
    """The new-flow, established and reply rows of SNAT and DSR through one hook (tc: "", XDP: "XDP "),
    each mode from empty conntrack tables.  The SNAT reply row answers the flow the established row used."""
    for mode, name, base in ((Mode.SNAT, "SNAT", 20000), (Mode.DSR, "DSR", 30000)):
        if hook:
            base += 30000
        maps.set_config(NodeConfig(mode=mode, snat_addr=IPv4Address(NODE1), ext_ifindex=eth0))
        _clear_conntrack(maps)
        label = "new flow" if mode is Mode.SNAT else "new flow (SYN + option)"
        col.single[f"{hook}{name} {label}"] = _median(run, [_syn(base + i) for i in range(samples)])
        col.single[f"{hook}{name} established flow"] = _median(run, [_syn(base, "A")] * samples)
        if mode is Mode.SNAT:
            nat_port = next(_host16(e.nat_port) for k, e in maps.flows() if _host16(k.sport) == base)
            reply = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1, ttl=63) /
                          TCP(sport=8080, dport=nat_port, flags="A"))
            col.single[f"{hook}SNAT reply (node1)"] = _median(run, [reply] * samples)


def _clear_conntrack(maps: LBMaps) -> None:
    """Each new-flow row starts from empty conntrack tables: rows do not share the SNAT port space."""
    for m in (maps.ct_fwd, maps.ct_rev):
        for key in [k for k, _ in m.items_raw()]:
            m.delete_raw(key)


def _host16(be: int) -> int:
    return int.from_bytes(int(be).to_bytes(2, "little"), "big")


def _median(run: Callable[[bytes], int], frames: list[bytes]) -> float:
    return float(statistics.median(run(f) for f in frames))


def _measure(ns: str, eth0: int, n: int, samples: int, loops: int, pass_obj: BpfObject,
             xdp_pass: BpfObject) -> Column:
    col = Column(n)
    obj = load_lb(None)
    xdp = load_xdp(None, share_with=obj)
    try:
        maps = LBMaps(obj)
        maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=eth0))
        started = time.perf_counter()
        maps.sync(_services(n))
        col.sync_seconds = time.perf_counter() - started

        def lb(frame: bytes) -> int:
            return obj.test_run("lb_ingress", frame, ifindex=eth0).duration_ns

        def floor(frame: bytes) -> int:
            return pass_obj.test_run("pass", frame, ifindex=eth0).duration_ns

        with entered(ns):
            other = _syn(40000, dport=22)
            col.single["pass-through program"] = _median(floor, [other] * samples)
            col.single["non-service packet"] = _median(lb, [other] * samples)
            col.looped["pass-through program"] = pass_obj.test_run("pass", other, ifindex=eth0,
                                                                   repeat=loops).duration_ns
            col.looped["non-service packet"] = obj.test_run("lb_ingress", other, ifindex=eth0,
                                                            repeat=loops).duration_ns
            # New flows need distinct packets; the established and reply rows repeat one packet of
            # one flow (each run gets a fresh copy of it), exactly like the pass-through floor.
            _flow_rows(col, maps, eth0, lb, "", samples)
            # The same node as a backend's node: a DSR request for its pod records the reply state,
            # then the pod's reply is rewritten on egress.
            ClusterMaps(obj).sync({L4Addr(IPv4Address(OTHER_NODE), 30080, Proto.TCP): DsrFrontendKind.NODEPORT},
                                  set(), set(), dsr_backends=[(L4Addr(ANY_NODE, 30080, Proto.TCP),
                                                               L4Addr(IPv4Address(LOCAL_POD), 8080, Proto.TCP))])
            request = bytes(Ether(src=NODE2_MAC, dst=ETH0_MAC) /
                            IP(src=CLIENT, dst=LOCAL_POD, ttl=63,
                               options=[IPOption(b"\x9a\x08" + (30080).to_bytes(2, "big") +
                                                 IPv4Address(OTHER_NODE).packed)]) /
                            TCP(sport=45000, dport=8080, flags="S"))
            obj.test_run("lb_ingress", request, ifindex=eth0)
            pod_reply = bytes(Ether(src=ETH0_MAC, dst=CLIENT_MAC) / IP(src=LOCAL_POD, dst=CLIENT, ttl=64) /
                              TCP(sport=8080, dport=45000, flags="A"))

            def egress(frame: bytes) -> int:
                return obj.test_run("lb_egress", frame, ifindex=eth0).duration_ns

            col.single["DSR reply (backend node)"] = _median(egress, [pod_reply] * samples)

            # The same paths at XDP (its own flows; the maps are the tc object's).
            def at_xdp(frame: bytes) -> int:
                return xdp.test_run_xdp("xdp_lb_prog", frame, ifindex=eth0).duration_ns

            def xdp_floor(frame: bytes) -> int:
                return xdp_pass.test_run_xdp("xdp_pass", frame, ifindex=eth0).duration_ns

            col.single["XDP pass-through program"] = _median(xdp_floor, [other] * samples)
            col.single["XDP non-service packet"] = _median(at_xdp, [other] * samples)
            _flow_rows(col, maps, eth0, at_xdp, "XDP ", samples)
    finally:
        xdp.close()
        obj.close()
    return col


def _table(cols: list[Column]) -> str:
    head = f"{'path (median ns, repeat=1)':<33}" + "".join(f"{c.services:>10,} svc" for c in cols) + \
        f"{'x pass':>9}{'growth':>9}"
    lines = [head, "-" * len(head)]
    for path in PATHS:
        row = [c.single[path] for c in cols]
        ratio = row[-1] / cols[-1].single[floor_of(path)]
        growth = row[-1] / row[0] if row[0] else float("nan")
        lines.append(f"{path:<33}" + "".join(f"{v:>14.0f}" for v in row) + f"{ratio:>8.2f}x{growth:>8.2f}x")
    lines.append("")
    lines.append(f"{'same packet, repeat loop (ns)':<33}" + "".join(f"{c.services:>10,} svc" for c in cols))
    for path in ("pass-through program", "non-service packet"):
        lines.append(f"{path:<33}" + "".join(f"{c.looped[path]:>14.0f}" for c in cols))
    lines.append("")
    lines.append("map programming (LBMaps.sync): " +
                 ", ".join(f"{c.services:,} services in {c.sync_seconds * 1000:.0f} ms" for c in cols))
    return "\n".join(lines)


NOTE = """\
Method: BPF_PROG_TEST_RUN repeats a program on the same skb, and every translating path changes
it, so each figure is the median of single runs (repeat=1), each on a fresh copy of the packet:
one packet of one flow for the established and reply rows (like the pass-through floor), a new
flow per run for the new-flow rows (so they include creating the conntrack and NAT entries; each
new-flow row starts from empty conntrack tables).
The DSR reply row runs the egress program of a backend's node on a pod's reply.
A repeat=1 figure includes the kernel's timer overhead and the caches the Python caller cooled
between runs; compare the repeat-loop figures of the two rows that leave the packet unchanged.
'x pass' = cost at the largest Service count / the pass-through program of the same hook (tc or
XDP); 'growth' = largest / 1 Service."""


def run_bench(quick: bool = False, out_dir: Path | None = None) -> int:
    samples, loops = (300, 100_000) if quick else (3000, 1_000_000)
    print(f"bpflb bench: per-packet BPF cost, {samples} packets per figure", file=sys.stderr)
    pass_obj = BpfObject(objects_dir() / "bpf_pass.o", None)
    xdp_pass = BpfObject(objects_dir() / "bpf_xdp_pass.o", None)
    cols: list[Column] = []
    try:
        with scratch_node("bpflb-bench") as sn:
            for n in SERVICE_COUNTS:
                _progress(f"{n:,} services: programming maps and timing {len(PATHS)} paths")
                cols.append(_measure(sn.ns, sn.eth0, n, samples, loops, pass_obj, xdp_pass))
    finally:
        xdp_pass.close()
        pass_obj.close()
    table = _table(cols)
    print(table)
    print()
    print(NOTE)
    out = out_dir or Path("results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-datapath.txt").write_text(table + "\n\n" + NOTE + "\n")
    (out / "bench-datapath.json").write_text(json.dumps(
        [{"services": c.services, "single_ns": c.single, "loop_ns": c.looped, "sync_s": c.sync_seconds}
         for c in cols], indent=2))
    print(f"\nwritten: {out / 'bench-datapath.txt'}, {out / 'bench-datapath.json'}", file=sys.stderr)
    missing = [p for c in cols for p in PATHS if p not in c.single]
    return 1 if missing else 0
