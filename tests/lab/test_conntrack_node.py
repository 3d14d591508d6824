"""Flow state on the wire with a small SNAT range (node1's agent runs with --nat-port-range 40000-40063, so
every port is contended): the node's own connections and SNAT'd flows to the same pod never take each other's
ports, in either direction, natively routed and through the VXLAN overlay; and a UDP flow only its client keeps busy keeps its port, its backend and its
replies for 3 minutes while other flows churn through the range."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab
from bpflb_lab.lab.core import DEFAULT_AGENT_CMD
from tests.lab.conftest import lab_running
from tests.lab.conn_holder import HolderProcess

pytestmark = pytest.mark.privileged

NODE1 = "198.18.0.11"
RANGE = range(40000, 40064)

HOLD = """\
apiVersion: v1
kind: Pod
metadata: {name: hold-a, labels: {app: hold}}
spec:
  nodeName: node2
  containers:
    - name: echo
      ports:
        - {name: http, containerPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: hold, namespace: default}
spec:
  type: NodePort
  selector: {app: hold}
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30500}
"""


@pytest.fixture(scope="module", params=["Disabled", "VXLAN"])
def lab(privileged: None, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """tunnelMode Disabled or VXLAN: with VXLAN the node's connections to node2's pods leave through the
    overlay device, the SNAT'd flows through the external one (encapsulated by bpflb)."""
    with lab_running(agent_cmd=f"{DEFAULT_AGENT_CMD} --nat-port-range {RANGE[0]}-{RANGE[-1]}",
                     tunnel=request.param) as shared:
        shared.apply(HOLD)
        deadline = time.monotonic() + 30
        while shared.http_get("client", f"http://{NODE1}:30500/hostname")[0] != "hold-a":
            assert time.monotonic() < deadline, "node1 does not serve the hold Service"
            time.sleep(0.2)
        yield shared


def counters(lab: Lab) -> dict[str, int]:
    c: dict[str, int] = collect(lab.pin_root / "node1")["counters"]
    return c


def reserved_ports(lab: Lab, pod: str) -> set[int]:
    """node1's SNAT ports with a reverse entry towards pod:8080 (live, closing, or dead but not yet reused)."""
    from ipaddress import IPv4Address

    from bpflb.datapath.conntrack import CT_TUPLE, read_all
    from bpflb.inspect import open_pinned

    rev = open_pinned(lab.pin_root / "node1", "ct_rev")
    try:
        keys = [CT_TUPLE.unpack(k) for k in read_all(rev)]
    finally:
        rev.close()
    return {int.from_bytes(dport.to_bytes(2, "little"), "big") for saddr, _, _, dport, _ in keys
            if saddr == IPv4Address(pod).packed}


def seen_ports(answer: dict[str, Any]) -> list[int]:
    """node1's source ports the pod saw, one per answered connection."""
    assert all(seen.startswith(f"{NODE1}:") for _, _, seen, _ in answer["replies"]), answer["replies"][:3]
    return [int(seen.rsplit(":", 1)[1]) for _, _, seen, _ in answer["replies"]]


def test_node_connections_and_snat_flows_never_take_each_others_ports(lab: Lab) -> None:
    pod = lab.pod_ip("hold-a")
    if lab.state().tunnel == "VXLAN":     # the node's connections to the pod do cross the overlay device
        route = lab.exec("node1", ["ip", "route", "get", pod], check=True).stdout
        assert "dev bpflb_vxlan" in route, route
    before = counters(lab)
    with HolderProcess(lab, "client") as client, HolderProcess(lab, "node1") as moved, \
            HolderProcess(lab, "node1") as kept:
        assert client.call(cmd="open", addr=NODE1, port=30500, count=10)["opened"] == 10
        first = seen_ports(client.call(cmd="ask", path="/clientip"))
        assert len(set(first)) == 10 and set(first) <= set(RANGE)

        # The node opens a connection to the pod from a port a live SNAT'd flow holds towards it: its
        # connection is moved to a free port of the range; the flow keeps its port and its replies.
        held = first[0]
        assert moved.call(cmd="open", addr=pod, port=8080, count=1, bind=[NODE1, held])["opened"] == 1
        [moved_to] = seen_ports(moved.call(cmd="ask", path="/clientip"))
        assert moved_to != held and moved_to in RANGE and moved_to not in first
        assert counters(lab)["host_nat"] == before["host_nat"] + 1

        # The node opens one from a free port of the range: it keeps it, and the pool never hands it out.
        own = next(p for p in RANGE if p not in reserved_ports(lab, pod))
        assert kept.call(cmd="open", addr=pod, port=8080, count=1, bind=[NODE1, own])["opened"] == 1
        assert seen_ports(kept.call(cmd="ask", path="/clientip")) == [own]

        # Clients take every port left; the rest are refused with a RST (no port left), and none is given a
        # port a node connection uses.
        free = len(set(RANGE) - reserved_ports(lab, pod) - {own})   # (the readiness probes' flows still close)
        more = client.call(cmd="open", addr=NODE1, port=30500, count=60)
        assert more["opened"] >= free and more["failed"] > 0, more
        assert more["errors"] == {"connection refused": more["failed"]}, more
        answers = client.call(cmd="ask", path="/clientip")
        assert answers["answered"] == 10 + more["opened"]
        ports = seen_ports(answers)
        assert len(set(ports)) == len(ports) and not {own, moved_to} & set(ports)
        assert held in ports, "the SNAT'd flow whose port the node wanted still has it"
        assert seen_ports(moved.call(cmd="ask", path="/clientip")) == [moved_to]
        assert seen_ports(kept.call(cmd="ask", path="/clientip")) == [own]
    after = counters(lab)
    assert after["nat_port_socket"] > before["nat_port_socket"]
    assert after["reset_nat_exhausted"] - before["reset_nat_exhausted"] == more["failed"]


def udp_keeper(addr: str, port: int, seconds: float, every: float) -> dict[str, Any]:
    """One UDP flow kept busy by its client alone: asks who answers, then only sends (the echo server does
    not answer "ping") for `seconds`, then asks again. Runs in the client's namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect((addr, port))
    out: dict[str, Any] = {"local": sock.getsockname()}

    def ask(what: str) -> str:
        sock.send(what.encode())
        return sock.recv(2048).decode()

    out["first"] = (ask("hostname"), ask("clientip"))
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        sock.send(b"ping")
        sent += 1
        time.sleep(every)
    out["sent"] = sent
    try:
        out["last"] = (ask("hostname"), ask("clientip"))
    except OSError as exc:
        out["last"] = (None, f"{type(exc).__name__}: {exc}")
    sock.close()
    return out


def udp_churn(addr: str, port: int, seconds: float, every: float) -> dict[str, Any]:
    """New UDP flows, one every `every` seconds, each asking once who answers and then going silent (each
    holds a port for the 60 s UDP lifetime): the SNAT range keeps being given out anew."""
    got: Counter[str] = Counter()
    end = time.monotonic() + seconds
    socks = []
    while time.monotonic() < end:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(1.0)
        sock.connect((addr, port))
        try:
            sock.send(b"hostname")
            got[sock.recv(2048).decode()] += 1
        except OSError as exc:
            got[type(exc).__name__] += 1
        socks.append(sock)
        time.sleep(every)
    for sock in socks:
        sock.close()
    return {"answers": dict(got), "flows": len(socks)}


@pytest.mark.parametrize("lab", ["Disabled"], indirect=True)   # 3 minutes: the overlay changes nothing of it
def test_a_udp_flow_only_its_client_keeps_busy_keeps_its_port_backend_and_replies_for_3_minutes(lab: Lab) -> None:
    """3 minutes of one-way traffic (3 UDP lifetimes), while new flows take every port that comes free."""
    result: dict[str, Any] = {}

    def keep() -> None:
        result.update(lab.run_in("client", udp_keeper, NODE1, 30081, 180.0, 5.0, timeout=260))

    keeper = threading.Thread(target=keep)
    keeper.start()
    churn = lab.run_in("client", udp_churn, NODE1, 30081, 185.0, 0.7, timeout=260)
    keeper.join()
    assert result["first"][0] in ("echo-a", "echo-b") and result["first"][1].startswith(f"{NODE1}:")
    assert result["last"] == result["first"], \
        f"after 3 minutes the flow's answer came from {result['last']}, at first from {result['first']}"
    answered = sum(n for who, n in churn["answers"].items() if who in ("echo-a", "echo-b"))
    assert answered == churn["flows"] >= 200, churn
    ct = collect(lab.pin_root / "node1")["conntrack"]
    pool = {p["backend"]: p["ports_used"] for p in ct["nat_pool"]}
    assert max(pool.get(f"{ip}:8081/UDP", 0) for ip in ("10.244.2.10", "10.244.3.10")) >= 32, \
        f"the churn kept the pools busy: {pool}"
