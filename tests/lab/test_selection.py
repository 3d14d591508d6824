"""Backend selection on the wire, in a lab brought up with `--algorithm Maglev`: the same client address and
source port reach the same pod through node1 and node2 (the pod bpflb.model.maglev predicts), session affinity
pins a client until its timeout (and can be switched off and on live), and a terminating pod gets no new
connections while an open one to it keeps working."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from bpflb.model import maglev
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import affinity_idle, wait_programmed, wait_until

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
PODS = ["echo-a", "echo-b"]
NODES = ("node1", "node2", "node3")


def programmed(lab: Lab, name: str, check: Callable[[dict[str, Any] | None], bool], what: str) -> None:
    """Every node's agent programmed its NodePort `name` ("30380/TCP") so that check holds."""
    for k, node in enumerate(NODES, start=1):
        wait_programmed(lab, (node,), f"{lab.node_ip(k)}:{name}", check, what)


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(algorithm="Maglev") as shared:
        yield shared


def predicted(sport: int, port: int = 30080, pods: list[str] = PODS) -> str:
    """The pod every node's Maglev table gives the client's flow from sport (the lab's default M and seed)."""
    return maglev.pick(pods, IPv4Address(CLIENT), sport, port, 6)


def _read_reply(s: socket.socket, buf: bytes) -> tuple[str, bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a reply")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    while len(rest) < length:
        rest += s.recv(4096)
    return rest[:length].decode(), rest[length:]


def _connect(addr: str, port: int, sport: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((CLIENT, sport))
    s.settimeout(2)
    s.connect((addr, port))
    return s


def _hostnames(targets: list[tuple[str, int, int]]) -> list[str]:
    """In the client: one new connection per (address, port, source port; 0 = any), GET /hostname on each."""
    pods = []
    for addr, port, sport in targets:
        with _connect(addr, port, sport) as s:
            s.sendall(f"GET /hostname HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
            pods.append(_read_reply(s, b"")[0])
    return pods


def _hold(addr: str, port: int, sport: int, ready: str, stop: str, limit: float) -> list[str]:
    """In the client: one connection from sport, a GET /hostname every 0.2 s until `stop` exists; `ready` holds
    the number of answers so far."""
    pods = []
    deadline = time.monotonic() + limit
    with _connect(addr, port, sport) as s:
        buf = b""
        while time.monotonic() < deadline:
            s.sendall(f"GET /hostname HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
            pod, buf = _read_reply(s, buf)
            pods.append(pod)
            Path(ready + ".tmp").write_text(str(len(pods)))
            Path(ready + ".tmp").replace(ready)
            if Path(stop).exists():
                break
            time.sleep(0.2)
    return pods


def test_the_same_client_port_reaches_the_same_pod_through_node1_and_node2(lab: Lab) -> None:
    ports = list(range(42000, 42040))
    targets = [(node, 30080, sport) for sport in ports for node in (NODE1, NODE2)]
    pods = lab.run_in("client", _hostnames, targets, timeout=60)
    via1, via2 = pods[0::2], pods[1::2]
    assert via1 == via2                                   # node2's own echo-a notwithstanding
    assert via1 == [predicted(sport) for sport in ports]
    assert set(via1) == set(PODS)


AFFINITY_SERVICE = """\
kind: Service
metadata: {name: echo-aff}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30380}]
"""
AFFINITY = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3}}\n"


def test_session_affinity_pins_a_client_until_its_timeout_and_switches_live(lab: Lab) -> None:
    lab.apply(AFFINITY_SERVICE + AFFINITY)
    programmed(lab, "30380/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 3, "with affinity 3 s")
    try:
        pods = lab.run_in("client", _hostnames, [(NODE1, 30380, 0)] * 50, timeout=60)
        pinned = pods[0]
        assert pods == [pinned] * 50
        # A source port Maglev alone would send to the other pod still reaches the pinned one...
        other = next(p for p in range(43000, 44000) if predicted(p, 30380) != pinned)
        assert lab.run_in("client", _hostnames, [(NODE1, 30380, other)]) == [pinned]
        # ...until the client has opened nothing for longer than the timeout: then a new choice is made.
        wait_until("node1's affinity entry for the client idle for longer than its 3 s timeout",
                   lambda: affinity_idle(lab, "node1", CLIENT, 3.0), timeout=30)
        assert lab.run_in("client", _hostnames, [(NODE1, 30380, other + 1000)]) == [predicted(other + 1000, 30380)]

        # Switched off on the live Service: each connection is balanced on its own.
        lab.apply(AFFINITY_SERVICE)
        programmed(lab, "30380/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 0, "without affinity")
        ports = list(range(45000, 45030))
        spread = lab.run_in("client", _hostnames, [(NODE1, 30380, p) for p in ports], timeout=60)
        assert spread == [predicted(p, 30380) for p in ports] and set(spread) == set(PODS)
        # And on again: one pod for every connection.
        lab.apply(AFFINITY_SERVICE + AFFINITY)
        programmed(lab, "30380/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 3, "with affinity again")
        again = lab.run_in("client", _hostnames, [(NODE1, 30380, p) for p in range(46000, 46030)], timeout=60)
        assert len(set(again)) == 1, again
    finally:
        lab.delete("service", "echo-aff")


ECHO_A = """\
kind: Pod
metadata: {name: echo-a, labels: {app: echo}%s}
spec:
  nodeName: node2
  containers:
  - name: echo
    ports: [{name: http, containerPort: 8080}, {name: udp, containerPort: 8081, protocol: UDP}]
"""


def test_a_terminating_pod_gets_no_new_connections_while_an_open_one_keeps_working(lab: Lab,
                                                                                   tmp_path: Path) -> None:
    to_a = [p for p in range(47000, 48000) if predicted(p) == "echo-a"]
    held, fresh = to_a[0], to_a[1:41]
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    out: list[list[str]] = []
    worker = threading.Thread(target=lambda: out.append(
        lab.run_in("client", _hold, NODE1, 30080, held, str(ready), str(stop), 30.0, timeout=40)))
    worker.start()
    try:
        wait_until("the long-lived connection's first answer", ready.exists, timeout=10)
        lab.apply(ECHO_A % ", deletionTimestamp: '2026-01-01T00:00:00Z'")
        slices = lab.endpoint_slices()
        conditions = [e["conditions"] for s in slices if s["metadata"]["name"].startswith("echo-")
                      and s["metadata"]["labels"]["kubernetes.io/service-name"] == "echo"
                      for e in s["endpoints"] if e["targetRef"]["name"] == "echo-a"]
        assert conditions and all(c["terminating"] and not c["ready"] for c in conditions), conditions
        echo_a = f"{lab.pod_ip('echo-a')}:8080"
        programmed(lab, "30080/TCP", lambda fe: fe is not None and echo_a not in fe["backends"], "without echo-a")
        # Flows Maglev used to send to echo-a now all go to echo-b, through both nodes.
        new = lab.run_in("client", _hostnames, [(NODE1, 30080, p) for p in fresh[:20]] +
                         [(NODE2, 30080, p) for p in fresh[20:]], timeout=60)
        assert new == ["echo-b"] * len(fresh), new
        # The open connection goes on answering after the change (its own 10 requests at least, in all).
        wait_until("the held connection's answers", lambda: int(ready.read_text() or 0) >= 10, timeout=30)
    finally:
        stop.touch()
        worker.join()
        lab.apply(ECHO_A % "")
    held_pods = out[0]
    # The open connection kept answering from echo-a before, during and after the change.
    assert len(held_pods) >= 10 and set(held_pods) == {"echo-a"}, held_pods
    echo_a = f"{lab.pod_ip('echo-a')}:8080"
    programmed(lab, "30080/TCP", lambda fe: fe is not None and echo_a in fe["backends"], "with echo-a again")
    assert lab.run_in("client", _hostnames, [(NODE1, 30080, p) for p in fresh[:10]]) == ["echo-a"] * 10
