"""The whole matrix on the wire: {SNAT, DSR, Hybrid} x {tunnelMode Disabled, VXLAN} x {TCP, UDP} x
{externalTrafficPolicy Cluster, Local}.  Each case asserts which address the pod saw and which way the
reply went (through node1, or straight from the backend's node: the MAC of the frames the client
received); with VXLAN, that the underlay carried UDP 8472 between node addresses and never a pod address."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from bpflb_lab.lab import Lab
from bpflb_lab.lab.probe import HttpProbe, Probe, UdpProbe
from tests.lab.conftest import lab_running
from tests.lab.helpers import capture, mac_of, own_ports, seen_ip

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
UDP_LOCAL = """\
kind: Service
metadata: {name: echo-local-udp}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{name: udp, protocol: UDP, port: 8081, targetPort: 8081, nodePort: 30181}]
"""
# (policy, proto) -> (receiving node, its address, node port)
FRONTENDS = {("Cluster", "TCP"): ("node1", NODE1, 30080), ("Cluster", "UDP"): ("node1", NODE1, 30081),
             ("Local", "TCP"): ("node2", NODE2, 30180), ("Local", "UDP"): ("node2", NODE2, 30181)}


def wait_programmed(lab: Lab, node_port: int, proto: str, timeout: float = 10.0) -> None:
    """Until every node's datapath holds the NodePort frontend (agents pick up applied objects
    asynchronously, as they would from the API)."""
    from bpflb.inspect import collect

    nodes = [f"node{k}" for k in range(1, lab.state().nodes + 1)]
    deadline = time.monotonic() + timeout
    while True:
        missing = [n for n in nodes if f"{lab.node_ip(int(n[4:]))}:{node_port}/{proto}"
                   not in {f["frontend"] for f in collect(lab.pin_root / n)["frontends"]}]
        if not missing:
            return
        assert time.monotonic() < deadline, f"{missing} never programmed NodePort {node_port}/{proto}"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["Disabled", "VXLAN"])
def lab(request: pytest.FixtureRequest, privileged: None) -> Iterator[Lab]:
    with lab_running(tunnel=request.param) as shared:
        shared.apply(UDP_LOCAL)
        wait_programmed(shared, 30181, "UDP")
        yield shared


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
@pytest.mark.parametrize("proto", ["TCP", "UDP"])
@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_matrix(lab: Lab, mode: str, proto: str, policy: str) -> None:
    tunnel = lab.state().tunnel
    lab.set_mode(mode)
    via, addr, port = FRONTENDS[(policy, proto)]
    dsr = policy == "Cluster" and (mode == "DSR" or (mode == "Hybrid" and proto == "TCP"))
    macs = {n: mac_of(lab, n) for n in ("node1", "node2", "node3")}
    probes: list[Probe] = ([HttpProbe(addr, port, ("/clientip",), 1.0) for _ in range(4)] if proto == "TCP"
                           else [UdpProbe(addr, port, ("hostname", "clientip"), 1.0) for _ in range(4)])
    # tcpdump's filter reads the outer headers: "net 10.244.0.0/16" matches only pod addresses that
    # travel bare on the underlay, never ones inside VXLAN.
    with capture(lab, "client", "tcp or udp") as at_client, \
            capture(lab, "fabric", "net 10.244.0.0/16", device="any") as bare_pods, \
            capture(lab, "fabric", "udp port 8472", device="any") as vxlan:
        results = lab.probe("client", probes, parallel=1)
    case = f"{mode}/{tunnel}/{proto}/{policy} via {via}"
    assert all(r.ok for r in results), f"{case}: {[r.error for r in results]}"
    pods = {r.pod for r in results}
    seen = {seen_ip(r.replies[-1]) for r in results}
    replies = at_client.matching(src=addr, sport=port, dst=CLIENT, ports=own_ports(results))
    senders = {f.smac for f in replies}
    assert replies, f"{case}: the client captured no reply from {addr}:{port}"
    if policy == "Local":
        # Only node2's own pod; the client's address intact; the reply leaves node2 itself.
        assert pods == {"echo-a"} and seen == {CLIENT}, case
        assert senders == {macs["node2"]}, case
    elif dsr:
        # The pod sees the client; replies come straight from the backends' nodes, never via node1.
        assert seen == {CLIENT}, case
        assert senders <= {macs["node2"], macs["node3"]} and macs["node1"] not in senders, case
    else:
        # SNAT: the pod sees node1; replies return through node1.
        assert seen == {NODE1}, case
        assert senders == {macs["node1"]}, case
    pod_on_underlay = [ln for ln in bare_pods.lines or [] if "10.244." in ln]
    tunnelled = [ln for ln in vxlan.lines or [] if ".8472:" in ln]
    if tunnel == "VXLAN":
        assert not pod_on_underlay, f"{case}: pod addresses on the underlay:\n" + "\n".join(pod_on_underlay[:5])
        if policy == "Cluster":
            assert tunnelled, f"{case}: no VXLAN on the underlay"
    else:
        assert not tunnelled, f"{case}: VXLAN without tunnelMode VXLAN"
        if policy == "Cluster":
            assert pod_on_underlay, f"{case}: native routing should carry pod addresses"


@pytest.mark.parametrize("lab", ["VXLAN"], indirect=True)
def test_pod_to_pod_over_vxlan_never_shows_pod_addresses_on_the_underlay(lab: Lab) -> None:
    assert lab.state().tunnel == "VXLAN"
    with capture(lab, "fabric", "net 10.244.0.0/16", device="any") as bare_pods, \
            capture(lab, "fabric", "udp port 8472", device="any") as vxlan:
        body, err = lab.http_get("echo-a", "http://10.244.3.10:8080/clientip")
        udp, uerr = lab.udp_request("echo-b", "10.244.2.10", 8081, "clientip")
    assert err is None and seen_ip(body) == "10.244.2.10", err     # pod to pod, addresses intact
    assert uerr is None and seen_ip(udp) == "10.244.3.10", uerr
    outer = [ln for ln in vxlan.lines or [] if ".8472:" in ln]
    assert any(f"{NODE2}." in ln and "198.18.0.13." in ln for ln in outer), vxlan.lines
    assert not [ln for ln in bare_pods.lines or [] if "10.244." in ln], bare_pods.lines


POD_CLIENT = "10.244.1.100"     # client-pod, on node1
NODE3 = "198.18.0.13"


def pod_veths(lab: Lab, node: str) -> list[str]:
    """The host side of the node's pod veths."""
    out = lab.exec(node, ["ip", "-o", "link", "show", "type", "veth"], check=True).stdout
    return [ln.split(": ")[1].split("@")[0] for ln in out.splitlines() if "link-netns" in ln and "-pod-" in ln]


@pytest.mark.parametrize("lab", ["VXLAN"], indirect=True)
@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_a_pod_bpflb_does_not_see_reaches_another_nodes_nodeport_served_by_that_nodes_own_pod(
        lab: Lab, mode: str) -> None:
    """A cluster moving to bpflb node by node: client-pod's own node does not translate its traffic (here:
    node1's pod path detached, the probe outside the socket LB's cgroup; a node still on kube-proxy, whose
    rules match only its own addresses, is the same). Its requests to node2's eTP Local NodePorts (node2's
    own echo-a) and to node3's NodePorts (echo-b on node3, or echo-a on node2: DSR over the overlay in DSR
    mode) reach those nodes natively; the answer of a pod of the node that load-balanced it, or of a DSR
    backend's node, goes to a pod address, so through the overlay device: it is shown from the frontend
    there (lb_overlay_egress), or client-pod's socket would reset it. Every probe answered, each pod having
    seen client-pod itself, unless SNAT'd to node2's pod (then node3). node1's agent is restarted after,
    which attaches its pod path again."""
    from bpflb.inspect import collect

    lab.set_mode(mode)
    before = collect(lab.pin_root / "node2")["counters"].get("reply_dnat", 0)
    veths = pod_veths(lab, "node1")
    assert veths, "client-pod's veth on node1"
    try:
        for dev in veths:
            lab.exec("node1", ["tc", "filter", "del", "dev", dev, "ingress"], check=True)
        for proto, addr, port in (("TCP", NODE2, 30180), ("UDP", NODE2, 30181), ("TCP", NODE3, 30080),
                                  ("UDP", NODE3, 30081)):
            probes: list[Probe] = ([HttpProbe(addr, port, ("/clientip",), 2.0) for _ in range(6)] if proto == "TCP"
                                   else [UdpProbe(addr, port, ("hostname", "clientip"), 2.0) for _ in range(6)])
            results = lab.probe("client-pod", probes, parallel=1, in_cgroup=False)
            case = f"{mode}/{proto} client-pod -> {addr}:{port}"
            assert all(r.ok for r in results), f"{case}: {[r.error for r in results]}"
            snat = mode == "SNAT" or (mode == "Hybrid" and proto == "UDP")
            for r in results:
                want = NODE3 if (addr == NODE3 and r.pod == "echo-a" and snat) else POD_CLIENT
                assert seen_ip(r.replies[-1]) == want, f"{case}: {r.pod} saw {r.replies[-1]}"
                if addr == NODE2:
                    assert r.pod == "echo-a", case
    finally:
        lab.restart_agent("node1")
    # node2 showed its own pod's answers from the frontend: at least the 12 to its eTP Local NodePorts.
    assert collect(lab.pin_root / "node2")["counters"].get("reply_dnat", 0) - before >= 12


@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_pods_and_nodes_reach_every_nodes_nodeport_whichever_pod_answers(lab: Lab, mode: str) -> None:
    """In-cluster clients to any node's NodePort get the port's internal view where they are, through the
    socket LB (in the node's cgroup) or the pod path (a pod's process outside it), as Cilium's socket LB
    gives it: nothing makes the trip to that node, so DSR never answers a pod from an address it did not
    address -- echo-a through node1 to echo-a itself (a hairpin), node2 through node3 to node2's own
    echo-a. Every request answered, by both pods over the runs, the pods seeing the client's own address
    (or the hairpin's)."""
    lab.set_mode(mode)
    for client, in_cgroup in (("echo-a", True), ("echo-a", False), ("echo-b", False), ("node2", True)):
        answered: set[str] = set()
        for addr in (NODE1, NODE2, NODE3):
            probes: list[Probe] = [HttpProbe(addr, 30080, ("/hostname",), 2.0) for _ in range(6)]
            results = lab.probe(client, probes, parallel=1, in_cgroup=in_cgroup)
            case = f"{mode} {client} ({'socket LB' if in_cgroup else 'pod path'}) -> {addr}:30080"
            assert all(r.ok for r in results), f"{case}: {[r.error for r in results]}"
            answered |= {r.pod for r in results if r.pod}
        assert answered == {"echo-a", "echo-b"}, (mode, client, answered)     # 18 draws: both (p ~ 8e-6)


@pytest.mark.parametrize("mode", ["SNAT", "DSR"])
def test_full_size_packets_cross_in_both_directions(lab: Lab, mode: str) -> None:
    """A 6 kB request and its 6 kB answer through node1: full-size segments (and GSO bursts) in both
    directions, under the overlay's 50 bytes and the DSR option; nothing may be silently dropped."""
    lab.set_mode(mode)
    msg = "x" * 6000
    for _ in range(3):
        body, err = lab.http_get("client", f"http://{NODE1}:30080/echo?msg={msg}", timeout=3.0)
        assert err is None and body == msg, (lab.state().tunnel, mode, err, len(body or ""))


@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_the_lab_check_passes_on_either_tunnel(lab: Lab, mode: str) -> None:
    lab.set_mode(mode)
    report = lab.check()
    assert report.ok, f"tunnel {lab.state().tunnel}:\n{report.render()}"


def _ask(proto: str, local_port: int, addr: str, port: int) -> str:
    """From the client's local_port, a new connected socket (as lab.check's probes): "GET /hostname" over
    TCP or "hostname" over UDP, one attempt, 1 s; the pod that answered, or the error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", local_port))
        sock.settimeout(1.0)
        sock.connect((addr, port))
        if proto == "UDP":
            sock.send(b"hostname")
            return sock.recv(100).decode()
        sock.sendall(b"GET /hostname HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data.split(b"\r\n\r\n", 1)[-1].decode()
    except OSError as exc:
        return f"error: {exc!r}"
    finally:
        sock.close()


def _reused_ports(proto: str, first: tuple[str, int], then: tuple[str, int], base: int, clashes: int) -> list[str]:
    """From ports base, base+2, ...: ask `first`, then at once `then` from the same port, until `clashes`
    ports reached echo-a (node2's pod) both times; what each of those second requests got."""
    out = []
    for local_port in range(base, base + 200, 2):
        if _ask(proto, local_port, *first) != "echo-a":
            continue
        second = _ask(proto, local_port, *then)
        if second != "echo-a" and not second.startswith("error"):
            continue            # balanced to the other pod: no shared tuple
        out.append(f"port {local_port}: {second}")
        if len(out) == clashes:
            break
    return out


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_a_client_port_reused_towards_another_frontend_of_the_same_pod(lab: Lab, proto: str) -> None:
    """lab.check's lost second: the client's port, used a moment ago through node1 (DSR to node2's pod),
    used again for node2's eTP Local NodePort (and the other way round).  The pod would see the same tuple
    for both flows: the new flow's answers left as the earlier frontend's (or its SYN met the earlier
    connection's TIME_WAIT).  Every such second request is answered, each from its own frontend."""
    lab.set_mode("DSR")
    dsr = (NODE1, 30080 if proto == "TCP" else 30081)
    local = (NODE2, 30180 if proto == "TCP" else 30181)
    base = random.randrange(20000, 30000, 2)       # below the ephemeral range: no probe of the kernel's own
    for first, then in ((dsr, local), (local, dsr)):
        got = lab.run_in("client", _reused_ports, proto, first, then, base, 3, timeout=300)
        assert len(got) == 3, f"{proto} {first} then {then}: only {got} reached echo-a twice"
        failed = [g for g in got if not g.endswith(": echo-a")]
        assert not failed, f"{proto} {first} then {then} from the same client port: {failed}"
        base += 200
