"""The rate benchmark's workload: what is measured (datapaths, Service counts, the quick and full plans), the
cell a measurement fills, and the lab built for each cell (the echo pods, N LoadBalancer Services, the
datapath: bpflb's agents or kube-proxy's rules) with the traffic's sinks and listeners in place.
The method itself is the package's docstring (bpflb_lab.rates)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bpflb.datapath.libbpf import objects_dir
from bpflb_lab import trafficgen as tg
from bpflb_lab.kubeproxy import lab as kplab
from bpflb_lab.lab import Lab, netns, topology
from bpflb_lab.lab.errors import LabUnsupported

UDP_PORT, TCP_PORT, ACCEPT_PORT = 30081, 30080, 8090
REFERENCE_PORT = 8091        # an accept listener of echo-a that no Service names (the connections' reference)
FORWARDED_PORT = 8092        # another one, reached through node1 by plain IP forwarding (the forwarded reference)
FORWARDED_TABLE = 92         # the routing table of the forwarded reference's rules (client and node2)
DATAPATHS = ("bpflb XDP", "bpflb tc", "kube-proxy iptables", "kube-proxy nftables")
SERVICE_COUNTS = (10, 1_000, 10_000)
QUICK_SERVICE_COUNTS = (10, 1_000)
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
    kube_proxy_nodes: tuple[str, ...] = ()   # the nodes that load kube-proxy's rules (empty: every node)


FULL = Plan(SERVICE_COUNTS, udp_seconds=1.0, udp_repeats=5, tcp_seconds=1.0, tcp_repeats=5)
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
    conn_forwarded: float | None = None    # connections to echo-a forwarded by node1's kernel, no LB (median)
    conn_forwarded_samples: list[float] = field(default_factory=list)   # one right before each conn sample
    forwarded_per_conn: float | None = None  # packets node1 forwarded per forwarded connection (>= 4: both ways)
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
def _cell_lab(datapath: str, services: int, acceleration: str, cell: Cell,
              kube_proxy_nodes: tuple[str, ...] = ()) -> Iterator[Lab]:
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
            # Every node, as kube-proxy runs in a cluster (and bpflb's agents in its cells): the SNAT'd SYN
            # meets node2's rules as well as node1's.
            mode = datapath.removeprefix("kube-proxy ")
            done = kplab.install(lab, mode, list(kube_proxy_nodes) or None)
            cell.setup = (f"{done[0].summary} on {', '.join(d.node for d in done)}; loaded in "
                          f"{max(d.seconds for d in done):.1f}s at most")
            _untracked_references(lab, [d.node for d in done])
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


def _forwarded_route(lab: Lab) -> None:
    """The forwarded reference's path: connections to echo-a:FORWARDED_PORT go client -> node1 -> node2 -> pod
    and their replies pod -> node2 -> node1 -> client, the hops of a connection SNAT'd by node1, forwarded by
    node1's kernel with no load balancer.  Policy rules on the port keep every other flow's route as it was.
    node1 already routes the pod CIDRs to their nodes and the client on-link, and sends no ICMP redirects."""
    pod, node1, table = lab.pod_ip("echo-a"), lab.node_ip(1), FORWARDED_TABLE
    netns.ip_batch(lab.netns("client"), [f"route add {pod}/32 via {node1} table {table}",
                                         f"rule add ipproto tcp dport {FORWARDED_PORT} lookup {table} pref {table}"])
    netns.ip_batch(lab.netns("node2"), [
        f"route add {topology.CLIENT_IP}/32 via {node1} table {table}",
        f"rule add from {pod} ipproto tcp sport {FORWARDED_PORT} lookup {table} pref {table}"])


def _untracked_references(lab: Lab, nodes: list[str]) -> None:
    """In kube-proxy's cells every node tracks connections for its rules: the references' packets are exempted
    (raw NOTRACK), so they meet neither conntrack nor the rules.  (In bpflb's cells its programs see them as
    packets of no Service, the path every packet of a node takes.)"""
    for node in nodes:
        for port in (REFERENCE_PORT, FORWARDED_PORT):
            for flag in ("--dport", "--sport"):
                lab.exec(node, ["iptables", "-w", "-t", "raw", "-I", "PREROUTING", "-p", "tcp", flag, str(port),
                                "-j", "NOTRACK"], check=True)


def forwarded_packets(lab: Lab) -> int:
    """Packets node1's kernel has forwarded (Ip: ForwDatagrams of its namespace)."""
    lines = [ln.split() for ln in lab.exec("node1", ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
             if ln.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def _prepare_traffic(lab: Lab) -> list[subprocess.Popen[bytes]]:
    """Sinks on the pods, XDP on the fabric side of every host's veth, the listeners, a wide port range for
    the client, and the neighbours resolved along the path (one real request of each kind)."""
    pin = lab.pin_root / "bench"
    # A pass-through XDP program on the fabric end of every host's veth, in every cell: veth then carries
    # frames by NAPI, which the XDP cells need (Lab.up(acceleration=...) attaches the same) and which makes
    # every crossing cheaper; the other cells get it too, or their whole path would be slower than the XDP
    # cells' for reasons that are not node1's.
    for host in ("client", "node1", "node2", "node3"):
        lab.run_in("fabric", tg.attach_in_ns, "xdp_pass", host)
        if host != "client" and not _xdp_on(lab, host):
            lab.run_in(host, tg.attach_in_ns, "xdp_pass", "eth0")   # NAPI the other way too (see above)
    for pod in ("echo-a", "echo-b"):
        lab.run_in(pod, tg.attach_in_ns, "xdp_sink", "eth0", str(pin / pod))
    netns.write_sysctls(lab.netns("client"), {"net.ipv4.ip_local_port_range": "1024 65535"})
    listeners = [("echo-a", ACCEPT_PORT), ("echo-b", ACCEPT_PORT), ("echo-a", REFERENCE_PORT),
                 ("echo-a", FORWARDED_PORT)]
    # The listeners are C (native/connbench.c `serve`: accept and close): a Python accept loop cost ~10 us of
    # CPU per connection on this 2-core machine and was part of every row's ceiling, the reference's too.
    server = str(objects_dir() / "connbench")
    procs = [subprocess.Popen(netns.nsenter_argv(lab.netns(pod), [server, "serve", str(port)]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
             for pod, port in listeners]
    # The reference connections go to echo-a through node2, routed, bypassing node1.
    netns.ip_batch(lab.netns("client"), [f"route add {topology.pod_cidr(2)} via {lab.node_ip(2)}"])
    _forwarded_route(lab)
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
