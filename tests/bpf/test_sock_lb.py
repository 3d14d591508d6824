"""BPF tests of the socket LB (bpf_sock.o) with real sockets: the kernel has no BPF_PROG_TEST_RUN for cgroup
sock_addr programs, so the programs are attached to a scratch cgroup v2 directory, a client process moves
itself into it and, from a scratch "pod" namespace, connects to Service addresses that no route leads to;
only a translated socket reaches the listeners of the fake backends in a second namespace.  The maps are
programmed by the agent's own code (LBMaps, from DesiredStates or from translate())."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from bpflb.datapath.cgroup import attach_cgroup, attached_programs, cgroup2_mountpoint, detach_cgroup
from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.libbpf import BpfError
from bpflb.datapath.loader import BpfObject, ensure_bpffs, load_lb, load_sock
from bpflb.model import maglev
from bpflb.model.cluster import NodeInfo
from bpflb.model.translate import translate
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Proto,
)
from bpflb.sources.base import Snapshot
from bpflb_lab.lab.netns import entered

pytestmark = pytest.mark.privileged

CLIENT_POD = "10.244.1.10"                     # the client pod; also a backend in the hairpin test
PODS = {"echo-a": "10.244.1.11", "echo-b": "10.244.1.12", "echo-c": "10.244.1.13"}
NODE1 = "198.18.0.11"                          # a NodePort address (routed nowhere in these namespaces)
CLUSTER_IP = "10.96.0.10"
BACKEND_PORT = 8080
CLIENT_MODULE = "bpflb_lab.sockclient"
ECONNREFUSED, EHOSTUNREACH, ENETUNREACH = 111, 113, 101


def l4(addr: str, port: int, proto: Proto = Proto.TCP) -> L4Addr:
    return L4Addr(IPv4Address(addr), port, proto)


def backend(name: str, proto: Proto = Proto.TCP) -> Backend:
    addr = CLIENT_POD if name == "self" else PODS[name]
    return Backend(l4(addr, BACKEND_PORT, proto), name, "node1", True)


def cluster_ip(names: list[str], *, port: int = 80, proto: Proto = Proto.TCP, addr: str = CLUSTER_IP,
               algorithm: Algorithm = Algorithm.RANDOM, affinity: int = 0, local_only: bool = False,
               no_endpoints: bool = False) -> Frontend:
    return Frontend(l4(addr, port, proto), FrontendKind.CLUSTER_IP, "default/echo", "", local_only,
                    tuple(backend(n, proto) for n in names), no_endpoints, algorithm=algorithm,
                    affinity_timeout=affinity)


def state(*frontends: Frontend, seed: int = 0) -> DesiredState:
    return DesiredState("node1", (IPv4Address(NODE1),), {f.l4: f for f in frontends},
                        settings=AgentSettings(maglev_table_size=251, maglev_seed=seed))


# -- the scratch world: two namespaces, fake backends, a cgroup ------------------------------------------


def _ip(ns: str, *cmd: str) -> None:
    done = subprocess.run(["ip", "-n", ns, *cmd], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {ns} {' '.join(cmd)}: {done.stderr.strip()}")


class Backends:
    """Listeners of the fake backends (TCP and UDP on BACKEND_PORT of each address), served by one thread
    of this process, which is outside the test cgroup.  A TCP peer gets "NAME PEER_IP:PEER_PORT\\n" and
    is closed; a UDP datagram is answered with the same line."""

    def __init__(self, where: dict[str, tuple[str, str]]) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        for name, (ns, addr) in where.items():
            with entered(ns):
                tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((addr, BACKEND_PORT))
            tcp.listen(128)
            udp.bind((addr, BACKEND_PORT))
            for s in (tcp, udp):
                s.setblocking(False)
                self.sel.register(s, selectors.EVENT_READ, name)
                self.socks.append(s)
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                name, s = key.data, key.fileobj
                if name is None:
                    return
                assert isinstance(s, socket.socket)
                try:
                    if s.type == socket.SOCK_STREAM:
                        conn, peer = s.accept()
                        conn.setblocking(True)
                        conn.sendall(f"{name} {peer[0]}:{peer[1]}\n".encode())
                        conn.close()
                    else:
                        _, peer = s.recvfrom(256)
                        s.sendto(f"{name} {peer[0]}:{peer[1]}\n".encode(), peer)
                except (BlockingIOError, ConnectionError):
                    continue

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        for s in [*self.socks, self._wake_r, self._wake_w]:
            s.close()


def _remove_cgroup(path: Path) -> None:
    """rmdir once the cgroup holds no process (an exited child leaves it asynchronously)."""
    events = path / "cgroup.events"
    deadline = time.monotonic() + 10
    while events.exists() and "populated 1" in events.read_text():
        assert time.monotonic() < deadline, f"{path} still holds processes"
        time.sleep(0.01)
    if path.exists():
        path.rmdir()


@dataclass
class SockLab:
    """A node's socket LB on a scratch cgroup, a client pod namespace and a backends namespace."""

    client_ns: str
    backend_ns: str
    cgroup: Path
    lb: BpfObject
    sock: BpfObject
    maps: LBMaps
    extra_ns: list[str] = field(default_factory=list)

    def program(self, st: DesiredState) -> None:
        self.maps.sync(st)

    def run(self, ops: list[dict[str, Any]], *, ns: str | None = None, cgroup: Path | None = None
            ) -> list[list[dict[str, Any]]]:
        """Run the client script's operations in the cgroup (default: the test's) and a namespace."""
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup hierarchy from the child.
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns or self.client_ns}", "--", sys.executable,
                               "-m", CLIENT_MODULE, str(cgroup or self.cgroup)], input=json.dumps(ops),
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        result: list[list[dict[str, Any]]] = json.loads(proc.stdout)
        return result

    def one(self, op: str, addr: str, port: int, count: int = 1, **kw: Any) -> list[dict[str, Any]]:
        return self.run([{"op": op, "addr": addr, "port": port, "count": count}], **kw)[0]

    def stats(self) -> dict[str, int]:
        return self.maps.stats()

    def pod_namespace(self, addr: str) -> str:
        """Another client pod namespace (addr/32 on a veth to the backends' namespace), for behaviour that
        is per namespace."""
        ns = f"{self.client_ns}-x{len(self.extra_ns)}"
        peer = f"x{len(self.extra_ns)}"
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        self.extra_ns.append(ns)
        _ip(ns, "link", "set", "lo", "up")
        _ip(self.backend_ns, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip(ns, "addr", "add", f"{addr}/32", "dev", "eth0")
        for where, dev in ((ns, "eth0"), (self.backend_ns, peer)):
            _ip(where, "link", "set", dev, "up")
        _ip(ns, "route", "add", "10.244.1.0/24", "dev", "eth0")
        _ip(self.backend_ns, "route", "add", f"{addr}/32", "dev", peer)
        return ns


@pytest.fixture
def lab() -> Iterator[SockLab]:
    mnt = cgroup2_mountpoint(Path("/sys/fs/cgroup/unified"))     # hybrid here; /sys/fs/cgroup when pure v2
    if mnt is None:
        pytest.fail("no cgroup v2 hierarchy is mounted (the socket LB needs one; CI has it at "
                    "/sys/fs/cgroup/unified)", pytrace=False)
    tag = uuid.uuid4().hex[:8]
    client_ns, backend_ns = f"bpflb-sk-{tag}-c", f"bpflb-sk-{tag}-b"
    cgroup = mnt / f"bpflb-test-sock-{tag}"
    made: list[str] = []
    objs: list[BpfObject] = []
    backends: Backends | None = None
    attachment = None
    cgroup.mkdir()
    try:
        for ns in (client_ns, backend_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
            _ip(ns, "link", "set", "lo", "up")
        _ip(client_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", backend_ns)
        _ip(client_ns, "addr", "add", f"{CLIENT_POD}/24", "dev", "eth0")
        for i, addr in enumerate(PODS.values()):
            _ip(backend_ns, "addr", "add", f"{addr}/24" if i == 0 else f"{addr}/32", "dev", "eth0")
        for ns in (client_ns, backend_ns):
            _ip(ns, "link", "set", "eth0", "up")
        backends = Backends({**{n: (backend_ns, a) for n, a in PODS.items()}, "self": (client_ns, CLIENT_POD)})
        lb = load_lb(None)
        objs.append(lb)
        sock = load_sock(None, share_with=lb)
        objs.append(sock)
        maps = LBMaps(lb)
        maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=1))
        attachment = attach_cgroup(sock, cgroup)
        sl = SockLab(client_ns, backend_ns, cgroup, lb, sock, maps)
        try:
            yield sl
        finally:
            made += sl.extra_ns
    finally:
        if attachment is not None:
            attachment.detach()
        if backends is not None:
            backends.close()
        for obj in reversed(objs):
            obj.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        _remove_cgroup(cgroup)


def names(results: list[dict[str, Any]]) -> list[str]:
    return [r["reply"].split()[0] for r in results]


# -- TCP, connected and unconnected UDP --------------------------------------------------------------------


def test_tcp_connect_reaches_a_backend_and_the_peer_shows_as_the_service(lab: SockLab) -> None:
    lab.program(state(cluster_ip(["echo-a", "echo-b", "echo-c"])))
    before = lab.stats()
    out = lab.one("tcp", CLUSTER_IP, 80, count=30)
    assert all("errno" not in r for r in out), out
    assert set(names(out)) == {"echo-a", "echo-b", "echo-c"}            # 30 draws: all three (p ~ 1e-5)
    for r in out:
        assert r["peer"] == [CLUSTER_IP, 80]                            # getpeername4
        assert r["reply"].split()[1].startswith(f"{CLIENT_POD}:")     # the backend sees the pod, no NAT
    after = lab.stats()
    assert after["sock_connect"] - before["sock_connect"] == 30
    assert after["sock_reverse"] - before["sock_reverse"] == 30        # the getpeername of each
    # Not a frontend: untouched, and the untranslated ClusterIP of another port leads nowhere.
    direct = lab.one("tcp", PODS["echo-b"], BACKEND_PORT)[0]
    assert direct["peer"] == [PODS["echo-b"], BACKEND_PORT] and names([direct]) == ["echo-b"]
    assert lab.one("tcp", CLUSTER_IP, 81)[0]["errno"] == ENETUNREACH
    assert lab.stats()["sock_connect"] == after["sock_connect"]


def test_connected_udp_reaches_a_backend_and_replies_come_from_the_service(lab: SockLab) -> None:
    lab.program(state(cluster_ip(["echo-a", "echo-b"], port=53, proto=Proto.UDP)))
    out = lab.one("udp", CLUSTER_IP, 53, count=20)
    assert all("errno" not in r for r in out), out
    assert set(names(out)) == {"echo-a", "echo-b"}
    for r in out:
        assert r["peer"] == [CLUSTER_IP, 53]
        assert r["source"] == [CLUSTER_IP, 53]                         # recvmsg4 on the connected socket
        assert r["reply"].split()[1].startswith(f"{CLIENT_POD}:")


def _random_udp_pick(cookie: int, count: int) -> int:
    """sock.h's slot for a UDP socket to a Random frontend: the cookie's jhash, seed 0."""
    return maglev.jhash_3words(cookie & 0xFFFFFFFF, cookie >> 32, int(Proto.UDP), 0) % count + 1


def test_unconnected_udp_one_backend_per_socket_and_replies_from_the_service(lab: SockLab) -> None:
    order = ["echo-a", "echo-b", "echo-c"]
    lab.program(state(cluster_ip(order, port=53, proto=Proto.UDP)))
    before = lab.stats()
    sockets = lab.run([{"op": "udp_unconn", "addr": CLUSTER_IP, "port": 53, "count": 5} for _ in range(12)])
    picked = []
    for datagrams in sockets:
        assert all("errno" not in d for d in datagrams), datagrams
        assert all(d["source"] == [CLUSTER_IP, 53] for d in datagrams)   # recvmsg4: the Service answered
        got = set(names(datagrams))
        assert len(got) == 1, datagrams                                 # the socket keeps its backend
        assert got == {order[_random_udp_pick(datagrams[0]["cookie"], 3) - 1]}
        picked.append(got.pop())
    assert len(set(picked)) >= 2, picked                                # sockets spread (p of one ~ 1e-5)
    after = lab.stats()
    assert after["sock_sendmsg"] - before["sock_sendmsg"] == 60
    assert after["sock_reverse"] - before["sock_reverse"] == 60


def test_unconnected_udp_to_a_maglev_frontend_uses_its_table(lab: SockLab) -> None:
    """The socket's pseudo-flow (cookie as source address and port) through the frontend's Maglev table,
    as bpflb.model.maglev predicts."""
    order = ["echo-a", "echo-b", "echo-c"]
    seed = 11
    lab.program(state(cluster_ip(order, port=53, proto=Proto.UDP, algorithm=Algorithm.MAGLEV), seed=seed))
    sockets = lab.run([{"op": "udp_unconn", "addr": CLUSTER_IP, "port": 53, "count": 3} for _ in range(8)])
    for datagrams in sockets:
        cookie = datagrams[0]["cookie"]
        want = maglev.pick(order, IPv4Address(cookie & 0xFFFFFFFF), (cookie >> 32) & 0xFFFF, 53, int(Proto.UDP),
                           m=251, seed=seed)
        assert set(names(datagrams)) == {want}, (cookie, datagrams)


# -- policies, affinity, errors, hairpin -------------------------------------------------------------------


def test_session_affinity_keeps_a_pod_on_its_backend_until_it_stops_being_eligible(lab: SockLab) -> None:
    order = ["echo-a", "echo-b", "echo-c"]
    lab.program(state(cluster_ip(order, affinity=10800)))
    first = names(lab.one("tcp", CLUSTER_IP, 80, count=15))
    assert len(set(first)) == 1, first
    kept = first[0]
    # Another pod (namespace) has its own affinity, which keeps it too.
    other = lab.pod_namespace("10.244.1.20")
    theirs = names(lab.one("tcp", CLUSTER_IP, 80, count=10, ns=other))
    assert len(set(theirs)) == 1, theirs
    # The remembered backend leaves the Service: new connections go elsewhere, and stick there.
    lab.program(state(cluster_ip([n for n in order if n != kept], affinity=10800)))
    later = names(lab.one("tcp", CLUSTER_IP, 80, count=10))
    assert kept not in later and len(set(later)) == 1, later


def test_internal_traffic_policy_local_from_translate(lab: SockLab) -> None:
    """translate() -> LBMaps -> socket: internalTrafficPolicy Local gives node1's endpoint only; on a node
    without one the connect() fails at once (EHOSTUNREACH) instead of timing out."""
    def snapshot(nodes: list[tuple[str, str]]) -> Snapshot:
        svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
               "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP, "internalTrafficPolicy": "Local",
                        "selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
        slc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": "echo-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "echo"}},
               "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
               "endpoints": [{"addresses": [PODS[pod]], "nodeName": node, "conditions": {"ready": True},
                              "targetRef": {"kind": "Pod", "name": pod}} for pod, node in nodes]}
        node1 = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
                 "status": {"addresses": [{"type": "InternalIP", "address": NODE1}]}}
        return Snapshot(services=[svc], endpointslices=[slc], nodes=[node1], config=None)

    st = translate(snapshot([("echo-a", "node2"), ("echo-b", "node1"), ("echo-c", "node2")]), "node1")
    assert st.problems == []
    lab.program(st)
    assert set(names(lab.one("tcp", CLUSTER_IP, 80, count=12))) == {"echo-b"}
    lab.program(translate(snapshot([("echo-a", "node2"), ("echo-c", "node2")]), "node1"))
    before = lab.stats()["sock_reject"]
    assert [r.get("errno") for r in lab.one("tcp", CLUSTER_IP, 80, count=2)] == [EHOSTUNREACH] * 2
    assert lab.stats()["sock_reject"] - before == 2


def test_service_without_endpoints_refuses_at_once(lab: SockLab) -> None:
    """kube-proxy REJECTs (the client's TCP connect gets ECONNREFUSED); the socket LB refuses the call
    itself with the same errno, for TCP connect, UDP connect and an unconnected sendto alike."""
    lab.program(state(cluster_ip([], no_endpoints=True), cluster_ip([], port=53, proto=Proto.UDP, no_endpoints=True)))
    before = lab.stats()["sock_reject"]
    out = lab.run([{"op": "tcp", "addr": CLUSTER_IP, "port": 80},
                   {"op": "udp", "addr": CLUSTER_IP, "port": 53},
                   {"op": "udp_unconn", "addr": CLUSTER_IP, "port": 53}])
    assert [o[0].get("errno") for o in out] == [ECONNREFUSED] * 3, out
    assert lab.stats()["sock_reject"] - before == 3


def test_hairpin_a_pod_that_gets_itself_is_connected_to_itself(lab: SockLab) -> None:
    lab.program(state(cluster_ip(["self"]), cluster_ip(["self"], port=53, proto=Proto.UDP)))
    tcp = lab.one("tcp", CLUSTER_IP, 80, count=3)
    assert names(tcp) == ["self"] * 3
    assert all(r["peer"] == [CLUSTER_IP, 80] and r["reply"].split()[1].startswith(f"{CLIENT_POD}:") for r in tcp)
    udp = lab.one("udp_unconn", CLUSTER_IP, 53, count=2)
    assert names(udp) == ["self"] * 2 and all(d["source"] == [CLUSTER_IP, 53] for d in udp)


def test_a_nodeport_from_inside_gets_the_internal_view(lab: SockLab) -> None:
    """A pod connecting to this node's NodePort gets the ClusterIP's backends (the internal view), even
    where externalTrafficPolicy Local leaves the NodePort itself none on this node; the application still
    sees the NodePort address it connected to.  Without the ClusterIP frontend the NodePort's own backends
    apply."""
    cip = cluster_ip(["echo-a", "echo-c"])
    nodeport = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", True, (), False,
                        internal=cip.l4)
    lab.program(state(cip, nodeport))
    out = lab.one("tcp", NODE1, 30080, count=12)
    assert set(names(out)) == {"echo-a", "echo-c"} and all(r["peer"] == [NODE1, 30080] for r in out)
    lab.program(state(nodeport))                                     # its view is gone: its own (none)
    assert lab.one("tcp", NODE1, 30080)[0]["errno"] == EHOSTUNREACH


def test_another_nodes_nodeport_from_inside_gets_the_internal_view_too(lab: SockLab) -> None:
    """A NodePort addressed at another node of the cluster (an address the node map holds as a node's own)
    is the same Service port: the pod gets the internal view here, as for this node's NodePort, and the
    application sees the address it connected to. An address of no node, and a pod address of that node,
    with the same port are not translated; nor is another node's address on a port that is no NodePort."""
    other, pod_of_other, stranger = "198.18.0.12", "10.244.2.50", "198.18.0.99"
    ClusterMaps(lab.lb).sync({}, set(), set(), [
        NodeInfo("node1", IPv4Address(NODE1), (IPv4Network("10.244.1.0/24"),)),
        NodeInfo("node2", IPv4Address(other), (IPv4Network("10.244.2.0/24"),))])
    cip = cluster_ip(["echo-a", "echo-c"])
    nodeport = Frontend(l4(NODE1, 30080), FrontendKind.NODEPORT, "default/echo", "", True, (), False,
                        internal=cip.l4)
    lab.program(state(cip, nodeport))
    out = lab.one("tcp", other, 30080, count=12)
    assert all("errno" not in r for r in out), out
    assert set(names(out)) == {"echo-a", "echo-c"} and all(r["peer"] == [other, 30080] for r in out)
    for addr, port in ((stranger, 30080), (pod_of_other, 30080), (other, 30081)):
        assert lab.one("tcp", addr, port)[0]["errno"] == ENETUNREACH, (addr, port)   # untranslated: no route
    lab.program(state(cip))                                           # the NodePort gone: not translated
    assert lab.one("tcp", other, 30080)[0]["errno"] == ENETUNREACH


def test_an_external_ip_is_translated_only_when_it_is_the_nodes_own(lab: SockLab) -> None:
    """translate() -> LBMaps -> socket: a Service may list any address as an externalIP (CVE-2020-8554);
    in-cluster connections to one that is not this node's own go to that address, as with Cilium, while
    the node's own is the Service's (its internal view)."""
    foreign = "203.0.113.9"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP, "externalIPs": [foreign, NODE1],
                    "selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    slc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
           "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
           "endpoints": [{"addresses": [PODS["echo-a"]], "nodeName": "node2", "conditions": {"ready": True},
                          "targetRef": {"kind": "Pod", "name": "echo-a"}}]}
    node1 = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
             "status": {"addresses": [{"type": "InternalIP", "address": NODE1}]}}
    st = translate(Snapshot(services=[svc], endpointslices=[slc], nodes=[node1], config=None), "node1")
    assert st.problems == [] and not st.frontends[l4(foreign, 80)].in_cluster
    lab.program(st)
    before = lab.stats()["sock_connect"]
    assert lab.one("tcp", foreign, 80)[0]["errno"] == ENETUNREACH          # to that address: no route here
    own = lab.one("tcp", NODE1, 80)[0]
    assert names([own]) == ["echo-a"] and own["peer"] == [NODE1, 80]
    assert lab.stats()["sock_connect"] - before == 1


def _echo_snapshot(spec: dict[str, Any], endpoints: list[tuple[str, str, dict[str, bool]]]) -> Snapshot:
    """Service default/echo (spec merged over a ClusterIP on port 80 -> 8080) and its EndpointSlice:
    (pod, node, conditions) per endpoint; node1 is this node."""
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP, "selector": {"app": "echo"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}
    if spec.get("type") == "LoadBalancer":
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    slc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
           "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
           "endpoints": [{"addresses": [PODS[pod]], "nodeName": node, "conditions": conditions,
                          "targetRef": {"kind": "Pod", "name": pod}} for pod, node, conditions in endpoints]}
    node1 = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
             "status": {"addresses": [{"type": "InternalIP", "address": NODE1}]}}
    return Snapshot(services=[svc], endpointslices=[slc], nodes=[node1], config=None)


READY = {"ready": True, "serving": True, "terminating": False}
SERVING_TERMINATING = {"ready": False, "serving": True, "terminating": True}
TERMINATING = {"ready": False, "serving": False, "terminating": True}
LB_IP = "192.0.2.80"


def test_a_loadbalancer_ip_from_inside_gets_the_internal_view(lab: SockLab) -> None:
    """translate() -> LBMaps -> socket: a pod connecting to a LoadBalancer IP gets the Service's backends as
    a ClusterIP would give them (every ready endpoint), although externalTrafficPolicy Local leaves the
    LoadBalancer frontend itself only node1's; the application sees the LoadBalancer IP it connected to."""
    st = translate(_echo_snapshot({"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
                                  [("echo-a", "node2", READY), ("echo-b", "node1", READY),
                                   ("echo-c", "node2", READY)]), "node1")
    assert st.problems == []
    lb = st.frontends[l4(LB_IP, 80)]
    assert lb.local_only and {b.name for b in lb.backends} == {"echo-b"}, "the external view: node1's only"
    lab.program(st)
    before = lab.stats()
    out = lab.one("tcp", LB_IP, 80, count=30)
    assert all("errno" not in r for r in out), out
    assert set(names(out)) == {"echo-a", "echo-b", "echo-c"}            # 30 draws: all three (p ~ 1e-5)
    assert all(r["peer"] == [LB_IP, 80] for r in out)                    # getpeername4
    assert lab.stats()["sock_reverse"] - before["sock_reverse"] == 30


def test_with_no_ready_endpoint_a_serving_terminating_one_takes_new_connects(lab: SockLab) -> None:
    """kube-proxy's rule (KEP-1669), translate() -> LBMaps -> socket: while a Service has ready endpoints
    new connections go to them alone; with none ready, to the ones still serving while they terminate, never
    to one that stopped serving."""
    st = translate(_echo_snapshot({}, [("echo-a", "node2", SERVING_TERMINATING), ("echo-b", "node1", READY),
                                       ("echo-c", "node2", TERMINATING)]), "node1")
    lab.program(st)
    assert set(names(lab.one("tcp", CLUSTER_IP, 80, count=12))) == {"echo-b"}
    st = translate(_echo_snapshot({}, [("echo-a", "node2", SERVING_TERMINATING),
                                       ("echo-c", "node2", TERMINATING)]), "node1")
    assert st.problems == []
    lab.program(st)
    out = lab.one("tcp", CLUSTER_IP, 80, count=12)
    assert all("errno" not in r for r in out), out
    assert set(names(out)) == {"echo-a"} and all(r["peer"] == [CLUSTER_IP, 80] for r in out)
    # None serving at all: refused at once, as a Service without endpoints.
    lab.program(translate(_echo_snapshot({}, [("echo-c", "node2", TERMINATING)]), "node1"))
    assert lab.one("tcp", CLUSTER_IP, 80)[0]["errno"] == ECONNREFUSED


def test_tcp_connects_to_a_maglev_frontend_follow_the_models_table(lab: SockLab) -> None:
    """A TCP connect() reads the frontend's Maglev table at a random pseudo-flow (sock.h), so no single
    connect can be predicted; the backends' shares of the connects are the model's table's
    (bpflb.model.maglev.build_table).  With 200 backends in 251 entries those shares are far from equal: 51
    backends hold two entries, 149 one, so the 51 get 102/251 = 41% of the connects.  A pick that is not the
    table (Random's slots, another table) gives them 51/200 = 26%."""
    many = {f"m{i:03d}": f"10.244.1.{50 + i}" for i in range(200)}
    for addr in many.values():
        _ip(lab.backend_ns, "addr", "add", f"{addr}/32", "dev", "eth0")
    servers = Backends({name: (lab.backend_ns, addr) for name, addr in many.items()})
    try:
        seed = 7
        fe = Frontend(l4(CLUSTER_IP, 80), FrontendKind.CLUSTER_IP, "default/echo", "", False,
                      tuple(Backend(l4(addr, BACKEND_PORT), name, "node1", True) for name, addr in many.items()),
                      False, algorithm=Algorithm.MAGLEV)
        lab.program(state(fe, seed=seed))
        entries = Counter(maglev.build_table(list(many), 251, seed))
        double = {name for name, n in entries.items() if n == 2}
        assert len(double) == 51 and set(entries.values()) == {1, 2}
        out = lab.one("tcp", CLUSTER_IP, 80, count=2000)
        assert all("errno" not in r for r in out), [r for r in out if "errno" in r][:3]
        got = names(out)
        assert set(got) <= set(many)
        share = sum(name in double for name in got) / len(got)
        # Binomial(2000, 0.406): sd 1.1%; the bounds are 5 sd from the table's share, 13 from Random's.
        assert 0.35 <= share <= 0.46, f"{share:.1%} of the connects went to the 51 backends with two entries"
    finally:
        servers.close()


# -- attachment -----------------------------------------------------------------------------------------


def test_attach_replace_detach_and_sockets_outside_the_cgroup(lab: SockLab) -> None:
    lab.program(state(cluster_ip(["echo-a"])))
    # A process in another cgroup (the hierarchy's root) is not translated.
    root = cgroup2_mountpoint(lab.cgroup)
    assert root is not None
    assert lab.one("tcp", CLUSTER_IP, 80, cgroup=root)[0]["errno"] == ENETUNREACH
    pins = Path("/sys/fs/bpf") / f"bpflb-test-sock-{uuid.uuid4().hex[:8]}"
    ensure_bpffs(pins)
    again = None
    try:
        # Pinned links on top of the fixture's: both translate (the first rewrite wins, the second sees a
        # backend); a second attach with the same pins replaces in place, never adds.
        pinned = attach_cgroup(lab.sock, lab.cgroup, pins)
        pinned.close()                                              # pinned: stays attached
        assert len(attached_programs(lab.cgroup, "lb_connect4")) == 2
        again = attach_cgroup(lab.sock, lab.cgroup, pins)
        assert len(attached_programs(lab.cgroup, "lb_connect4")) == 2
        assert names(lab.one("tcp", CLUSTER_IP, 80)) == ["echo-a"]
        again.close()
        # The same pins asked for another cgroup: the links move (never two cgroups from one pin set).
        other = lab.cgroup.parent / f"{lab.cgroup.name}-other"
        other.mkdir()
        try:
            attach_cgroup(lab.sock, other, pins).close()
            assert (len(attached_programs(lab.cgroup, "lb_connect4")),
                    len(attached_programs(other, "lb_connect4"))) == (1, 1)
            assert detach_cgroup(pins) == 4
            assert len(attached_programs(other, "lb_connect4")) == 0
        finally:
            detach_cgroup(pins)
            other.rmdir()
        assert len(attached_programs(lab.cgroup, "lb_connect4")) == 1
        assert sorted(p.name for p in pins.iterdir()) == []
        with pytest.raises(BpfError, match="not on a cgroup v2"):
            attach_cgroup(lab.sock, pins)
    finally:
        detach_cgroup(pins)
        if pins.exists():
            pins.rmdir()
    assert names(lab.one("tcp", CLUSTER_IP, 80)) == ["echo-a"]
