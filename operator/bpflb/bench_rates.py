"""`bpflb bench`, rates: forwarding rate and new-connection rate through node1 of a lab built for the run,
for bpflb with XDP acceleration, bpflb at tc, and the same Services as kube-proxy's iptables and nftables
rules (bpflb.kubeproxy), at 10, 1,000 and 10,000 Services; a table, JSON and a PNG chart.

Every (datapath, Service count) cell gets a lab of its own (unique name, always taken down): the state one
measurement leaves (conntrack, NAT ports) never leaks into the next. Each lab holds echo-a on node2 and
echo-b on node3 behind Service default/echo (NodePort 30080/TCP to an accept-and-close listener on 8090,
30081/UDP to 8081), plus N-1 LoadBalancer Services pointed at the same two pods.

- Forwarding rate: 60-byte UDP frames sent to node1:30081 by an XDP live-frames sender in the client
  (bpf_objects/bpf_gen.c, 256 flows), counted and dropped by an XDP sink on both pods' eth0. The
  sender and the whole path run on one CPU (the sender's softirq carries every frame to the pods), so
  a rate is the inverse of the path's total cost. A reference run in the same lab sends the frames
  straight to echo-a through node2, skipping node1; node1's cost per packet is derived from the two.
- Connection rate: TCP connections to node1:30080, 32 in flight from one client process (bpflb-connstorm,
  C), each counted once its handshake completes and then closed with a RST (no TIME_WAIT, as load generators
  do). A reference run right before each window connects straight to an accept listener of echo-a via
  node2 (no load balancer): the ceiling of the client, the bridge and the pods on this machine.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from bpflb import trafficgen as tg
from bpflb.kubeproxy import lab as kplab
from bpflb.lab import Lab, netns, topology
from bpflb.lab.errors import LabUnsupported

DATAPATHS = ("bpflb XDP", "bpflb tc", "kube-proxy iptables", "kube-proxy nftables")
SERVICE_COUNTS = (10, 1_000, 10_000)
QUICK_SERVICE_COUNTS = (10, 1_000)
UDP_PORT, TCP_PORT, ACCEPT_PORT = 30081, 30080, 8090
REFERENCE_PORT = 8091        # an accept listener of echo-a that no Service names (the connections' reference)
FLOWS = 256                  # UDP source ports the sender cycles through (established flows after the first)
CONCURRENCY = 32             # TCP connection attempts in flight
NA_ACCELERATION = "n/a (acceleration not available)"


@dataclass(frozen=True)
class Plan:
    """How long and how often each figure is measured."""

    counts: tuple[int, ...]
    udp_seconds: float
    udp_repeats: int
    tcp_seconds: float
    tcp_repeats: int


FULL = Plan(SERVICE_COUNTS, udp_seconds=1.0, udp_repeats=5, tcp_seconds=1.0, tcp_repeats=2)
QUICK = Plan(QUICK_SERVICE_COUNTS, udp_seconds=0.25, udp_repeats=3, tcp_seconds=0.5, tcp_repeats=1)


@dataclass
class Cell:
    """The figures of one datapath at one Service count (None where not measured; note says why)."""

    datapath: str
    services: int
    udp_pps: float | None = None           # median of the windows, received at the pods
    udp_samples: list[float] = field(default_factory=list)
    sent_pps: float | None = None          # what the sender put on the wire (median)
    reference_pps: float | None = None     # the same frames straight to echo-a, not through node1
    reference_samples: list[float] = field(default_factory=list)   # one right before each udp sample
    conn_per_s: float | None = None        # median
    conn_samples: list[float] = field(default_factory=list)
    conn_reference: float | None = None    # connections straight to echo-a, not through node1 (median)
    conn_reference_samples: list[float] = field(default_factory=list)   # one right before each conn sample
    conn_failed: int = 0
    conn_errors: dict[str, int] = field(default_factory=dict)
    node1_stats: dict[str, int] = field(default_factory=dict)   # bpflb: node1's nonzero datapath counters
    setup: str = ""                        # what loading the Services took
    note: str = ""
    failed: bool = False                   # the measurement broke (note has the error)

    @property
    def node1_ns(self) -> float | None:
        """node1's share of the per-packet cost (ns): the median over the windows of 1/rate - 1/reference,
        each window paired with the reference run just before it (they share the machine's load)."""
        pairs = [(r, ref) for r, ref in zip(self.udp_samples, self.reference_samples, strict=False) if r and ref]
        if not pairs:
            return None
        return float(statistics.median(1e9 / r - 1e9 / ref for r, ref in pairs))


class Unavailable(Exception):
    """This datapath cannot be measured on this build (the cell gets the message as its figure)."""


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the lab

def bench_workload() -> str:
    """The two echo pods and default/echo (30080/TCP to the accept-and-close listener, 30081/UDP)."""
    pods = "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: echo}}}}
spec:
  nodeName: {node}
  containers:
    - name: echo
      ports:
        - {{name: http, containerPort: 8080, protocol: TCP}}
        - {{name: udp, containerPort: 8081, protocol: UDP}}
""" for name, node in (("echo-a", "node2"), ("echo-b", "node3")))
    return pods + f"""---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  type: NodePort
  externalTrafficPolicy: Cluster
  selector: {{app: echo}}
  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: {ACCEPT_PORT}, nodePort: {TCP_PORT}}}
    - {{name: udp, protocol: UDP, port: 8081, targetPort: 8081, nodePort: {UDP_PORT}}}
"""


def bench_services(count: int, pods: list[tuple[str, str]]) -> dict[str, Any]:
    """count LoadBalancer Services (clusterIP 10.96.0.0/16, ingress 198.19.0.0/16, port 80) with an
    EndpointSlice each naming pods [(ip, node)], as one `kind: List` (JSON: quick for agents to read)."""
    items: list[dict[str, Any]] = []
    for i in range(count):
        name = f"svc-{i:05d}"
        n = i + 256
        items.append({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
            "spec": {"type": "LoadBalancer", "clusterIP": f"10.96.{n >> 8}.{n & 255}",
                     "allocateLoadBalancerNodePorts": False, "externalTrafficPolicy": "Cluster",
                     "selector": {"app": "echo"},
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": f"198.19.{n >> 8}.{n & 255}"}]}}})
        items.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-1", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": True}}
                          for ip, node in pods]})
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _lab_up(lab: Lab, datapath: str, acceleration: str) -> None:
    kwargs: dict[str, Any] = {"agents": datapath.startswith("bpflb"), "workload": False}
    if datapath == "bpflb XDP":
        if "acceleration" not in inspect.signature(Lab.up).parameters:
            raise Unavailable(NA_ACCELERATION)
        kwargs["acceleration"] = acceleration
    try:
        lab.up(**kwargs)
    except LabUnsupported as exc:
        raise Unavailable(NA_ACCELERATION.replace(")", f": {exc})")) from exc


def _xdp_on(lab: Lab, host: str, device: str = "eth0") -> bool:
    return "prog/xdp" in lab.exec(host, ["ip", "-d", "link", "show", device]).stdout


def _lb_entries(lab: Lab) -> int:
    """Entries of node1's pinned lb_services map (frontends and their backend slots)."""
    from bpflb.inspect import open_pinned

    m = open_pinned(lab.pin_root / "node1", "lb_services")
    try:
        return sum(1 for _ in m.items_raw())
    finally:
        m.close()


def _wait_synced(lab: Lab, services: int, timeout: float = 120.0) -> float:
    """Wait until node1's agent has programmed at least one entry per Service and the count has settled."""
    start = time.monotonic()
    last, since = -1, start
    while True:
        now = time.monotonic()
        count = _lb_entries(lab)
        if count != last:
            last, since = count, now
        elif count >= services and now - since >= 0.5:
            return now - start
        if now - start > timeout:
            raise RuntimeError(f"node1's agent holds {count} lb_services entries {timeout:.0f}s after "
                               f"{services:,} Services were written; see {lab.paths.logs}")
        time.sleep(0.1)


@contextlib.contextmanager
def _cell_lab(datapath: str, services: int, acceleration: str, cell: Cell) -> Iterator[Lab]:
    """A lab for one cell, with the datapath and the Services in place; always taken down."""
    lab = Lab(f"bpflb-rates-{secrets.token_hex(3)}")
    acceptors: list[subprocess.Popen[bytes]] = []
    try:
        start = time.monotonic()
        _lab_up(lab, datapath, acceleration)
        lab.apply(bench_workload())
        if datapath == "bpflb XDP" and not _xdp_on(lab, "node1"):
            raise Unavailable(NA_ACCELERATION.replace(")", ": no XDP program on node1's eth0)"))
        pods = [(lab.pod_ip(p), node) for p, node in (("echo-a", "node2"), ("echo-b", "node3"))]
        (lab.paths.cluster / "bench-services.json").write_text(json.dumps(bench_services(services - 1, pods)))
        if datapath.startswith("bpflb"):
            took = _wait_synced(lab, services)
            cell.setup = f"{services:,} Services programmed by the agents in {took:.1f}s"
        else:
            mode = datapath.removeprefix("kube-proxy ")
            [done] = kplab.install(lab, mode, ["node1"])
            cell.setup = f"{done.summary}; loaded in {done.seconds:.1f}s"
        acceptors = _prepare_traffic(lab)
        _progress(f"{datapath}, {services:,} Services: lab {lab.name} ready in {time.monotonic() - start:.1f}s "
                  f"({cell.setup})")
        yield lab
    finally:
        with contextlib.suppress(Exception):
            lab.down()
        for proc in acceptors:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=5)


def _listening_in_ns(port: int) -> bool:
    """A TCP socket listens on port in this namespace (/proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in list(f)[1:])


def _prepare_traffic(lab: Lab) -> list[subprocess.Popen[bytes]]:
    """Sinks on the pods, XDP on the fabric side of the client's veth, the listeners, a wide port range for
    the client, and the neighbours resolved along the path (one real request of each kind)."""
    pin = lab.pin_root / "bench"
    lab.run_in("fabric", tg.attach_in_ns, "xdp_pass", "client")
    for pod in ("echo-a", "echo-b"):
        lab.run_in(pod, tg.attach_in_ns, "xdp_sink", "eth0", str(pin / pod))
    netns.write_sysctls(lab.netns("client"), {"net.ipv4.ip_local_port_range": "1024 65535"})
    listeners = [("echo-a", ACCEPT_PORT), ("echo-b", ACCEPT_PORT), ("echo-a", REFERENCE_PORT)]
    procs = [subprocess.Popen(netns.nsenter_argv(lab.netns(pod), [sys.executable, "-m", "bpflb.trafficgen",
                                                                  "accept", str(port)]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, "PYTHONPATH": _src_root()})
             for pod, port in listeners]
    # The reference connections go to echo-a through node2, routed, bypassing node1.
    netns.ip_batch(lab.netns("client"), [f"route add {topology.pod_cidr(2)} via {lab.node_ip(2)}"])
    deadline = time.monotonic() + 15
    for pod, port in listeners:
        while not lab.run_in(pod, _listening_in_ns, port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the accept listener on {pod}:{port} did not start")
            time.sleep(0.05)
    node1 = lab.node_ip(1)
    for _ in range(20):
        udp = lab.connections("client", node1, UDP_PORT, 4, proto="UDP", timeout=0.5)
        tcp = lab.run_in("client", functools.partial(tg.connection_storm_in_ns, node1, TCP_PORT, 0.05, 2))
        if all(r.ok for r in udp) and tcp.ok and not tcp.failed:
            return procs
    raise RuntimeError(f"node1:{UDP_PORT}/UDP or node1:{TCP_PORT}/TCP does not answer in lab {lab.name}")


def _src_root() -> str:
    import bpflb

    return str(Path(bpflb.__file__).resolve().parent.parent)


# ------------------------------------------------------------------------------------------ measuring

def _udp(lab: Lab, frame: bytes, sinks: list[str], seconds: float) -> tuple[float, float]:
    """(pps received by the sinks, pps sent) over one sender run."""
    pin = lab.pin_root / "bench"
    before = sum(tg.read_sink(pin / s) for s in sinks)
    sent = lab.run_in("client", functools.partial(tg.live_send_in_ns, frame, seconds, flows=FLOWS,
                                                  cpu=(os.cpu_count() or 1) - 1), timeout=seconds + 60)
    got = sum(tg.read_sink(pin / s) for s in sinks) - before
    return got / sent.seconds, sent.rate


def _measure(lab: Lab, plan: Plan, cell: Cell) -> None:
    client_mac = _mac(lab, "client")
    to_node1 = tg.udp_frame(client_mac, _mac(lab, "node1"), str(topology.CLIENT_IP), lab.node_ip(1), UDP_PORT)
    direct = tg.udp_frame(client_mac, _mac(lab, "node2"), str(topology.CLIENT_IP), lab.pod_ip("echo-a"), 8081)
    refs, rates, sent = [], [], []
    for _ in range(plan.udp_repeats):
        refs.append(_udp(lab, direct, ["echo-a"], plan.udp_seconds)[0])
        got, out = _udp(lab, to_node1, ["echo-a", "echo-b"], plan.udp_seconds)
        rates.append(got)
        sent.append(out)
    cell.udp_samples = rates
    cell.reference_samples = refs
    cell.udp_pps = statistics.median(rates)
    cell.sent_pps = statistics.median(sent)
    cell.reference_pps = statistics.median(refs)
    failed, errors = 0, Counter[str]()
    conns, conn_refs = [], []
    for _ in range(plan.tcp_repeats):
        ref = lab.run_in("client", functools.partial(tg.connection_storm_in_ns, lab.pod_ip("echo-a"), REFERENCE_PORT,
                                                     plan.tcp_seconds, CONCURRENCY), timeout=plan.tcp_seconds + 60)
        conn_refs.append(ref.rate)
        r = lab.run_in("client", functools.partial(tg.connection_storm_in_ns, lab.node_ip(1), TCP_PORT,
                                                   plan.tcp_seconds, CONCURRENCY), timeout=plan.tcp_seconds + 60)
        conns.append(r.rate)
        failed += r.failed
        errors.update(r.errors)
    cell.conn_samples = conns
    cell.conn_per_s = statistics.median(conns)
    cell.conn_reference_samples = conn_refs
    cell.conn_reference = statistics.median(conn_refs)
    cell.conn_failed = failed
    cell.conn_errors = dict(errors)
    if cell.datapath.startswith("bpflb"):
        cell.node1_stats = _node1_stats(lab)
        if cell.datapath == "bpflb XDP" and not cell.node1_stats.get("xdp_tx"):
            cell.note = "XDP forwarded nothing on node1 (counter xdp_tx is 0): this cell measured tc"


def _node1_stats(lab: Lab) -> dict[str, int]:
    """node1's datapath counters that are not zero (whether XDP forwarded, why connections failed)."""
    from bpflb.datapath.lbmaps import read_stats
    from bpflb.inspect import open_pinned

    stats = open_pinned(lab.pin_root / "node1", "lb_stats")
    try:
        return {k: v for k, v in read_stats(stats).items() if v}
    finally:
        stats.close()


def _drops(cell: Cell) -> dict[str, int]:
    return {k: v for k, v in cell.node1_stats.items() if k.startswith("drop")}


def _mac(lab: Lab, host: str) -> str:
    link = lab.exec(host, ["ip", "-o", "link", "show", "eth0"], check=True).stdout
    return link.split("link/ether ")[1].split()[0]


def measure_cell(datapath: str, services: int, plan: Plan, acceleration: str) -> Cell:
    cell = Cell(datapath, services)
    try:
        with _cell_lab(datapath, services, acceleration, cell) as lab:
            _measure(lab, plan, cell)
    except Unavailable as exc:
        cell.note = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others' figures
        cell.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        cell.failed = True
        traceback.print_exc(file=sys.stderr)
    _progress(f"{datapath}, {services:,} Services: " + (cell.note or (
        f"UDP {(cell.udp_pps or 0) / 1e3:,.0f} kpps at the pods (sent {(cell.sent_pps or 0) / 1e3:,.0f}, "
        f"reference {(cell.reference_pps or 0) / 1e3:,.0f}); TCP {cell.conn_per_s:,.0f} conn/s"
        + (f", {cell.conn_failed} failed {cell.conn_errors}" if cell.conn_failed else "")
        + (f"; node1 drops {_drops(cell)}" if _drops(cell) else "")
        + (f"; node1 xdp_tx {cell.node1_stats.get('xdp_tx', 0):,}" if cell.datapath == "bpflb XDP" else ""))))
    return cell


# ------------------------------------------------------------------------------------------ reporting

def _fmt(value: float | None, cell: Cell, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "n/a" if cell.note else "-"
    return f"{value / scale:,.{digits}f}"


def _grid(title: str, cells: list[Cell], counts: tuple[int, ...], value: Callable[[Cell], str],
          last: Callable[[list[Cell]], str] | None = None, last_head: str = "") -> list[str]:
    head = f"{title:<30}" + "".join(f"{c:>11,} svc" for c in counts) + (f"{last_head:>12}" if last else "")
    lines = [head, "-" * len(head)]
    for dp in DATAPATHS:
        row = [next((c for c in cells if c.datapath == dp and c.services == n), None) for n in counts]
        if all(r is None for r in row):
            continue
        text = "".join(f"{(value(r) if r else '-'):>15}" for r in row)
        present = [r for r in row if r is not None]
        lines.append(f"{dp:<30}{text}" + (f"{last(present):>12}" if last else ""))
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _growth(attr: str) -> Callable[[list[Cell]], str]:
    def fn(row: list[Cell]) -> str:
        first, final = getattr(row[0], attr), getattr(row[-1], attr)
        return f"{final / first:.2f}x" if first and final else "n/a"
    return fn


def _get(cells: list[Cell], dp: str, n: int) -> Cell | None:
    return next((c for c in cells if c.datapath == dp and c.services == n), None)


def goals(cells: list[Cell], counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """The issue's goals, as ratios of figures measured in this run."""
    out: list[dict[str, Any]] = []
    at = 1_000 if 1_000 in counts else counts[-1]
    whats = (("udp_pps", "forwarding"), ("conn_per_s", "connections"))

    def value(dp: str, n: int, attr: str) -> float | None:
        c = _get(cells, dp, n)
        return getattr(c, attr) if c else None

    for dp, goal in (("bpflb XDP", 3.0), ("bpflb tc", 1.5)):
        for attr, what in (*whats, ("node1_ns", "node1 ns/packet")):
            mine, theirs = value(dp, at, attr), value("kube-proxy iptables", at, attr)
            r = _ratio(theirs, mine) if attr == "node1_ns" else _ratio(mine, theirs)   # cost: lower is better
            out.append({"goal": f"{dp} vs iptables, {what}, {at:,} svc", "target": f">= {goal:g}x",
                        "ratio": r, "met": None if r is None else r >= goal})
    lo, hi = counts[0], counts[-1]
    if hi > lo:
        for dp in ("bpflb XDP", "bpflb tc"):
            for attr, what in whats:
                r = _ratio(value(dp, hi, attr), value(dp, lo, attr))
                out.append({"goal": f"{dp} flat, {what}, {hi:,} / {lo:,} svc", "target": "within 10%",
                            "ratio": r, "met": None if r is None else abs(r - 1) <= 0.1})
        for attr, what in whats:
            r = _ratio(value("kube-proxy iptables", hi, attr), value("kube-proxy iptables", lo, attr))
            out.append({"goal": f"iptables degrades, {what}, {hi:,} / {lo:,} svc", "target": "< 0.9x",
                        "ratio": r, "met": None if r is None else r < 0.9})
    return out


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    virt = ""
    with contextlib.suppress(OSError):
        if "hypervisor" in Path("/proc/cpuinfo").read_text():
            virt = " under a hypervisor"
    return (f"{date.today().isoformat()}, {os.cpu_count()} vCPU {model}{virt}, Linux {platform.release()}, "
            f"{_iptables_version()}")


def _iptables_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    return "iptables unknown"


def table(cells: list[Cell], counts: tuple[int, ...]) -> str:
    lines = _grid("UDP forwarding (kpps at pods)", cells, counts,
                  lambda c: _fmt(c.udp_pps, c, 1e3), _growth("udp_pps"), "growth")
    lines.append(f"{'reference: straight to echo-a':<30}" + "".join(
        f"{_fmt(statistics.median(refs) if refs else None, Cell('', 0), 1e3):>15}"
        for refs in ([c.reference_pps for c in cells if c.services == n and c.reference_pps] for n in counts)))
    lines.append("")
    lines += _grid("node1 ns/packet (derived)", cells, counts, lambda c: _fmt(c.node1_ns, c), _growth("node1_ns"),
                   "growth")
    lines.append("")
    lines += _grid("new TCP connections/s", cells, counts, lambda c: _fmt(c.conn_per_s, c),
                   _growth("conn_per_s"), "growth")
    lines.append(f"{'reference: straight to echo-a':<30}" + "".join(
        f"{_fmt(statistics.median(refs) if refs else None, Cell('', 0)):>15}"
        for refs in ([c.conn_reference for c in cells if c.services == n and c.conn_reference] for n in counts)))
    troubled = [c for c in cells if c.conn_failed or _drops(c)]
    if troubled:
        lines.append("connection windows with failed attempts (conn/s per window; failures; node1's drop counters):")
        for c in troubled:
            parts = [" then ".join(f"{v:,.0f}" for v in c.conn_samples)]
            if c.conn_failed:
                parts.append(f"{c.conn_failed} failed (" + ", ".join(f"{k} {v}" for k, v in c.conn_errors.items()) + ")")
            if _drops(c):
                parts.append(", ".join(f"{k} {v:,}" for k, v in _drops(c).items()))
            lines.append(f"  {c.datapath} at {c.services:,}: " + "; ".join(parts))
    notes = sorted({c.note for c in cells if c.note})
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    lines.append("")
    lines.append("goals (ratios of figures measured in this run):")
    for g in goals(cells, counts):
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        lines.append(f"  {g['goal']:<50}{ratio:>7}   goal {g['target']:<11} {verdict}")
    return "\n".join(lines)


NOTE = """\
Method: one lab per cell (namespaces: client, fabric bridge, node1..3, echo-a on node2, echo-b on
node3), so no conntrack or NAT state carries over. UDP: 60-byte frames, 256 flows, from an XDP
live-frames sender (BPF_PROG_TEST_RUN, BPF_F_TEST_XDP_LIVE_FRAMES, XDP_TX out of the client's eth0) to
node1:30081, counted and dropped by XDP sinks on the pods' eth0. The sender's CPU carries every frame
through the bridge, node1, node2 and into the pods, so a rate is 1 / the whole path's cost on one CPU.
'reference' sends the same frames straight to echo-a via node2; node1 ns/packet = 1e9/rate -
1e9/reference (node1 and one more bridge crossing; the median over the windows, each paired with the
reference run just before it). TCP: one client process (bpflb-connstorm, C; the Python client it
replaced capped every row near 25k/s here), 32 connects in flight, each closed by RST once established,
to an accept-and-close listener in the pods (the Python echo server would cap every row at ~2.5k/s);
its reference connects straight to echo-a via node2, right before each window: the ceiling without a
load balancer. A 2-vCPU VM runs the client, the 'network' and all nodes: compare rows, not absolute
numbers; the reference row shows how much the machine's speed moved between cells."""


def chart(cells: list[Cell], counts: tuple[int, ...], path: Path) -> None:
    """A PNG of UDP kpps and TCP connections/s against the number of Services, one line per datapath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, attr, scale, label in ((axes[0], "udp_pps", 1e3, "UDP forwarding via node1 (kpps at the pods)"),
                                   (axes[1], "conn_per_s", 1.0, "new TCP connections/s via node1")):
        for dp in DATAPATHS:
            pts = [(c.services, getattr(c, attr) / scale) for n in counts
                   if (c := _get(cells, dp, n)) is not None and getattr(c, attr)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=dp)
        ax.set_xscale("log")
        ax.set_xticks(list(counts), [f"{n:,}" for n in counts])
        ax.set_xlabel("Services")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bpflb vs kube-proxy, {machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_rate_bench(quick: bool = False, out_dir: Path | None = None, *, acceleration: str = "Native",
                   datapaths: tuple[str, ...] = DATAPATHS, counts: tuple[int, ...] | None = None) -> int:
    """Measure every cell, print the table, write bench-rates.{txt,json,png}; 0 when every cell has its
    figures (a datapath that is not available counts as having them: its cells say n/a and why)."""
    plan = QUICK if quick else FULL
    counts = counts or plan.counts
    started = time.monotonic()
    print(f"bpflb bench: rates, {len(datapaths)} datapaths x {len(counts)} Service counts, one lab each",
          file=sys.stderr)
    cells = [measure_cell(dp, n, plan, acceleration) for dp in datapaths for n in counts]
    text = table(cells, counts)
    print(text)
    print()
    print(NOTE)
    out = out_dir or Path("results")
    out.mkdir(parents=True, exist_ok=True)
    where = machine()
    (out / "bench-rates.txt").write_text(f"{where}\n\n{text}\n\n{NOTE}\n")
    (out / "bench-rates.json").write_text(json.dumps({
        "machine": where, "quick": quick, "counts": list(counts), "seconds": round(time.monotonic() - started, 1),
        "cells": [{**asdict(c), "node1_ns": c.node1_ns} for c in cells], "goals": goals(cells, counts)}, indent=2))
    chart(cells, counts, out / "bench-rates.png")
    print(f"\nwritten: {out / 'bench-rates.txt'}, {out / 'bench-rates.json'}, {out / 'bench-rates.png'} "
          f"({time.monotonic() - started:.0f}s)", file=sys.stderr)
    missing = [c for c in cells if c.failed or (not c.note and (c.udp_pps is None or c.conn_per_s is None))]
    return 1 if missing else 0
