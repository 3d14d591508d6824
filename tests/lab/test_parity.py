"""kube-proxy parity at the edge, on the wire, in every mode: SNAT, DSR over VXLAN, Hybrid with Maglev, and
SNAT with the XDP fast path (one lab per mode, shared by its scenarios; each scenario brings its own Services
and takes them away).

The edge (issue 16): loadBalancerSourceRanges decide which client reaches a LoadBalancer IP once
svcSourceRangeCheck says so, and follow live changes of the ranges, the deny policy and the setting; every
node answers an eTP Local LoadBalancer's healthCheckNodePort (200 with a ready local endpoint, else 503, and
back when echo-a goes unready) and kube-proxy's health server on 10256; a headless-labelled Service gets no
frontend. Kubernetes' own e2e Service tests (test/e2e/network/service.go, loadbalancer.go) as lab scenarios:
session affinity with its switch and timeout, multiport endpoints, the no-endpoints REJECT, endpoint
conditions, type and port transitions, service-proxy-name, eTP Local and its flips, and a UDP flow that
follows a replaced pod."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from bpflb.model import maglev
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import (
    affinity_idle,
    capture,
    counted,
    frontend,
    http_from,
    http_many,
    udp_flow,
    wait_until,
)

pytestmark = pytest.mark.privileged

CLIENT, OUTSIDER = "198.18.0.100", "198.18.0.101"      # the lab's client, and a second address of its own
NODES = ("node1", "node2", "node3")
NODE_IPS = {"node1": "198.18.0.11", "node2": "198.18.0.12", "node3": "198.18.0.13"}
NODE1, NODE2 = NODE_IPS["node1"], NODE_IPS["node2"]
CONFIGS: dict[str, dict[str, str]] = {
    "snat": {"mode": "SNAT"},
    "dsr-vxlan": {"mode": "DSR", "tunnel": "VXLAN"},
    "hybrid-maglev": {"mode": "Hybrid", "algorithm": "Maglev"},
    "xdp": {"mode": "SNAT", "acceleration": "Native"},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def lab(request: pytest.FixtureRequest, privileged: None) -> Iterator[Lab]:
    with lab_running(**CONFIGS[request.param]) as shared:
        shared.exec("client", ["ip", "addr", "add", f"{OUTSIDER}/24", "dev", "eth0"], check=True)
        yield shared


# -- helpers ---------------------------------------------------------------------------------------------------


def svc(name: str, body: str, *, labels: str = "", annotations: str = "") -> str:
    """A Service manifest: body is its spec (YAML, two-space indented under spec)."""
    meta = f"metadata:\n  name: {name}\n" + (f"  labels: {labels}\n" if labels else "") + \
        (f"  annotations: {annotations}\n" if annotations else "")
    return f"apiVersion: v1\nkind: Service\n{meta}spec:\n{body}"


ECHO_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, labels: {app: %(app)s}%(meta)s}
spec:
  nodeName: %(node)s
  containers:
  - name: echo
    ports: [%(ports)s]
%(status)s"""
ECHO_PORTS = "{name: http, containerPort: 8080}, {name: udp, containerPort: 8081, protocol: UDP}"


def pod(name: str, node: str, *, app: str = "echo", ports: str = ECHO_PORTS, meta: str = "", status: str = "") -> str:
    return ECHO_POD % {"name": name, "app": app, "node": node, "ports": ports, "meta": meta, "status": status}


UNREADY = "status: {conditions: [{type: Ready, status: 'False'}]}\n"
TERMINATING = ", deletionTimestamp: '2026-01-01T00:00:00Z'"


def restore_echo_pods(lab: Lab) -> None:
    lab.apply(pod("echo-a", "node2") + "---\n" + pod("echo-b", "node3"))


def lb_ip(lab: Lab, name: str) -> str:
    service = next(s for s in lab.services() if s["metadata"]["name"] == name)
    return str(service["status"]["loadBalancer"]["ingress"][0]["ip"])


def spec_of(lab: Lab, name: str) -> dict[str, Any]:
    return dict(next(s for s in lab.services() if s["metadata"]["name"] == name)["spec"])


def programmed(lab: Lab, name: str, check: Callable[[dict[str, Any] | None], bool], what: str,
               nodes: tuple[str, ...] = NODES) -> None:
    """Until every node's datapath holds frontend `name` ("{node}" is the node's address) so that check holds."""
    for n in nodes:
        full = name.replace("{node}", NODE_IPS[n])
        wait_until(f"{n}: {full} {what}", lambda n=n, full=full: check(frontend(lab, n, full)))  # type: ignore[misc]


def present(fe: dict[str, Any] | None) -> bool:
    return fe is not None


def absent(fe: dict[str, Any] | None) -> bool:
    return fe is None


def get(lab: Lab, addr: str, port: int, path: str = "/hostname", src: str | None = None,
        timeout: float = 1.0) -> tuple[int | None, str]:
    result: tuple[int | None, str] = lab.run_in("client", http_from, addr, port, path, src, timeout, timeout=30)
    return result


def pods_from(lab: Lab, addr: str, port: int, count: int, src: str | None = None) -> list[str]:
    """Pod names answering `count` new connections (an error text where none answered)."""
    results = lab.run_in("client", http_many, [(addr, port, "/hostname", src)] * count, timeout=30 + count)
    return [body if status == 200 else f"<{body}>" for status, body in results]


def reaches(lab: Lab, addr: str, port: int, src: str) -> bool:
    status, _ = get(lab, addr, port, src=src)
    return status == 200


# -- the edge: source ranges, health checks, headless ------------------------------------------------------------


RANGED = """\
  type: LoadBalancer
  externalTrafficPolicy: Cluster
  selector: {app: echo}
  loadBalancerSourceRanges: [%s]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
"""


def test_source_ranges_decide_which_client_reaches_the_loadbalancer_ip(lab: Lab) -> None:
    lab.apply(svc("ranged", RANGED % f"{CLIENT}/32"))
    ip = lb_ip(lab, "ranged")
    name = f"{ip}:80/TCP"
    try:
        programmed(lab, name, present, "programmed")
        # svcSourceRangeCheck false (the default): not enforced, and said once per Service in every agent's log.
        assert reaches(lab, ip, 80, CLIENT) and reaches(lab, ip, 80, OUTSIDER)
        for n in NODES:
            said = [line for line in lab.paths.agent_log(n).read_text().splitlines()
                    if "Service default/ranged: spec.loadBalancerSourceRanges: set but not enforced" in line]
            assert len(said) == 1, (n, said)

        lab.set_settings(svcSourceRangeCheck=True)
        programmed(lab, name, lambda fe: fe is not None and fe["source_ranges"] == [f"{CLIENT}/32"], "allowing the client")
        with counted(lab, "node1") as grew:
            assert reaches(lab, ip, 80, CLIENT)
            assert get(lab, ip, 80, src=OUTSIDER) == (None, "timeout")          # dropped, not refused
        assert grew["node1"]["drop_src_range"] >= 1
        if lab.state().acceleration != "Disabled":      # at XDP, every one of them: none left to tc
            assert grew["node1"]["xdp_drop_src_range"] == grew["node1"]["drop_src_range"], grew["node1"]

        # The ranges change live: now only the other address...
        lab.apply(svc("ranged", RANGED % f"{OUTSIDER}/32"))
        programmed(lab, name, lambda fe: fe is not None and fe["source_ranges"] == [f"{OUTSIDER}/32"], "allowing .101")
        assert reaches(lab, ip, 80, OUTSIDER) and not reaches(lab, ip, 80, CLIENT)
        # ...and Cilium's deny policy turns them into a deny list.
        lab.apply(svc("ranged", RANGED % f"{OUTSIDER}/32", annotations="{service.cilium.io/src-ranges-policy: deny}"))
        programmed(lab, name, lambda fe: fe is not None and fe["source_ranges_policy"] == "deny", "with a deny list")
        assert reaches(lab, ip, 80, CLIENT) and not reaches(lab, ip, 80, OUTSIDER)

        lab.set_settings(svcSourceRangeCheck=False)
        programmed(lab, name, lambda fe: fe is not None and fe["source_ranges"] is None, "without a check")
        assert reaches(lab, ip, 80, CLIENT) and reaches(lab, ip, 80, OUTSIDER)
    finally:
        lab.set_settings(svcSourceRangeCheck=False)
        lab.delete("service", "ranged")


HEALTH = """\
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
"""


def health(lab: Lab, node: str, port: int, path: str = "/") -> tuple[int | None, Any]:
    status, body = get(lab, NODE_IPS[node], port, path)
    return status, (json.loads(body) if status in (200, 503) else body)


def all_answer(lab: Lab, port: int) -> dict[str, tuple[int | None, Any]] | None:
    """Every node's answer on port, once every node answers (each agent opens it at its own next sync)."""
    answers = {n: health(lab, n, port) for n in NODES}
    return answers if all(status is not None for status, _ in answers.values()) else None


def test_health_check_node_ports_answer_for_local_endpoints_and_follow_readiness(lab: Lab) -> None:
    lab.apply(svc("hc", HEALTH))
    port = int(spec_of(lab, "hc")["healthCheckNodePort"])
    try:
        answers = wait_until("every node's health check port answering", lambda: all_answer(lab, port))
        assert {n: a[0] for n, a in answers.items()} == {"node1": 503, "node2": 200, "node3": 200}
        for n, (_, body) in answers.items():
            assert body == {"service": {"namespace": "default", "name": "hc"},
                            "localEndpoints": 0 if n == "node1" else 1, "serviceProxyHealthy": True}

        # Readiness flips reach the health check within a second (kube-proxy's promise; measured here at
        # 0.15-0.2 s, the first probe after the change included): 2 s leaves room for a busy machine.
        lab.apply(pod("echo-a", "node2", status=UNREADY))          # echo-a (node2's only pod) goes unready
        wait_until("node2's health check at 503", lambda: health(lab, "node2", port) ==
                   (503, {"service": {"namespace": "default", "name": "hc"}, "localEndpoints": 0,
                          "serviceProxyHealthy": True}), timeout=2)
        assert health(lab, "node3", port)[0] == 200 and health(lab, "node1", port)[0] == 503
        restore_echo_pods(lab)
        wait_until("node2's health check back at 200", lambda: health(lab, "node2", port)[0] == 200, timeout=2)
    finally:
        restore_echo_pods(lab)
        lab.delete("service", "hc")
    # (Raw answers: while the server closes, an answer may come cut short, which is no JSON.)
    wait_until("the health check port closed with its Service",
               lambda: get(lab, NODE_IPS["node2"], port, "/")[1] == "refused")


def test_kube_proxys_health_server_answers_on_every_node(lab: Lab) -> None:
    for n in NODES:
        for path in ("/healthz", "/livez"):
            status, body = health(lab, n, 10256, path)
            assert status == 200 and body["lastUpdated"] == body["currentTime"], (n, path, body)
            assert ("nodeEligible" in body) == (path == "/healthz")
        assert health(lab, n, 10256, "/metrics")[0] == 404


def test_a_headless_labelled_service_gets_no_frontend(lab: Lab) -> None:
    body = "  type: NodePort\n  selector: {app: echo}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: %d}]\n"
    lab.apply(svc("headless", body % 31010, labels="{service.kubernetes.io/headless: ''}") + "---\n" +
              svc("sibling", body % 31011))
    try:
        programmed(lab, "{node}:31011/TCP", present, "programmed (the sibling applied with it)")
        for n in NODES:
            assert frontend(lab, n, f"{NODE_IPS[n]}:31010/TCP") is None
            assert "Service default/headless: metadata.labels[\"service.kubernetes.io/headless\"]" in \
                lab.paths.agent_log(n).read_text()
        assert get(lab, NODE1, 31010) == (None, "refused")        # the node's own stack: nothing listens
        assert get(lab, NODE1, 31011)[0] == 200
    finally:
        lab.delete("service", "headless")
        lab.delete("service", "sibling")


# -- Kubernetes' e2e Service tests ------------------------------------------------------------------------------


def test_service_proxy_name_belongs_to_another_proxy(lab: Lab) -> None:
    body = "  type: NodePort\n  selector: {app: echo}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 31020}]\n"
    other = "{service.kubernetes.io/service-proxy-name: foo-proxy}"
    lab.apply(svc("proxied", body))
    try:
        programmed(lab, "{node}:31020/TCP", present, "programmed")
        assert get(lab, NODE1, 31020)[0] == 200
        lab.apply(svc("proxied", body, labels=other))
        programmed(lab, "{node}:31020/TCP", absent, "removed (another proxy's now)")
        assert get(lab, NODE1, 31020) == (None, "refused")
        lab.apply(svc("proxied", body))
        programmed(lab, "{node}:31020/TCP", present, "back")
        assert get(lab, NODE1, 31020)[0] == 200
    finally:
        lab.delete("service", "proxied")


AFFINITY = """\
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 31030}]
"""
CLIENT_IP_AFFINITY = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n"
MAGLEV = "{service.cilium.io/lb-algorithm: maglev}"      # a predictable choice once affinity has expired


def _connect_from(sports: list[int]) -> list[str]:
    """In the client: GET /hostname through node1:31030 from each source port."""
    import socket

    pods = []
    for sport in sports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((CLIENT, sport))
            s.settimeout(2)
            s.connect((NODE1, 31030))
            s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            pods.append(data.partition(b"\r\n\r\n")[2].decode())
    return pods


def predicted(sport: int) -> str:
    return maglev.pick(["echo-a", "echo-b"], IPv4Address(CLIENT), sport, 31030, 6)


def test_session_affinity_its_timeout_and_its_switch(lab: Lab) -> None:
    lab.apply(svc("aff", AFFINITY + CLIENT_IP_AFFINITY, annotations=MAGLEV))
    try:
        programmed(lab, "{node}:31030/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 2, "with affinity")
        pinned = lab.run_in("client", _connect_from, list(range(44000, 44020)), timeout=60)
        assert len(set(pinned)) == 1, pinned
        # A source port Maglev alone sends to the other pod still gets the pinned one...
        other = next(p for p in range(44100, 45000) if predicted(p) != pinned[0])
        assert lab.run_in("client", _connect_from, [other]) == [pinned[0]]
        # ...until the client has been idle for longer than the timeout: then Maglev chooses.
        wait_until("node1's affinity entry idle past its 2 s timeout", lambda: affinity_idle(lab, "node1", CLIENT, 2.0),
                   timeout=30)
        assert lab.run_in("client", _connect_from, [other + 1000]) == [predicted(other + 1000)]
        # Switched off on the live Service: each connection on its own.
        lab.apply(svc("aff", AFFINITY, annotations=MAGLEV))
        programmed(lab, "{node}:31030/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 0, "without affinity")
        ports = list(range(46000, 46030))
        assert lab.run_in("client", _connect_from, ports, timeout=60) == [predicted(p) for p in ports]
        # On again: one pod for all.
        lab.apply(svc("aff", AFFINITY + CLIENT_IP_AFFINITY, annotations=MAGLEV))
        programmed(lab, "{node}:31030/TCP", lambda fe: fe is not None and fe["affinity_timeout"] == 2, "with affinity again")
        assert len(set(lab.run_in("client", _connect_from, list(range(46100, 46130)), timeout=60))) == 1
    finally:
        lab.delete("service", "aff")


MULTIPORT = """\
  type: NodePort
  selector: {app: multi}
  ports:
  - {name: portname1, protocol: TCP, port: 80, targetPort: svc1, nodePort: 31040}
  - {name: portname2, protocol: TCP, port: 81, targetPort: svc2, nodePort: 31041}
"""


def test_multiport_endpoints_reach_the_pod_that_serves_each_port(lab: Lab) -> None:
    lab.apply(pod("multi-1", "node2", app="multi", ports="{name: svc1, containerPort: 9100}") + "---\n" +
              pod("multi-2", "node3", app="multi", ports="{name: svc2, containerPort: 9101}") + "---\n" +
              svc("multiport", MULTIPORT))
    try:
        programmed(lab, "{node}:31040/TCP", lambda fe: fe is not None and len(fe["backends"]) == 1, "with its endpoint")
        programmed(lab, "{node}:31041/TCP", lambda fe: fe is not None and len(fe["backends"]) == 1, "with its endpoint")
        assert set(pods_from(lab, NODE1, 31040, 6)) == {"multi-1"}
        assert set(pods_from(lab, NODE1, 31041, 6)) == {"multi-2"}
        assert set(pods_from(lab, NODE2, 31041, 3)) == {"multi-2"}
    finally:
        lab.delete("service", "multiport")
        lab.delete("pod", "multi-1")
        lab.delete("pod", "multi-2")


def test_a_service_without_endpoints_is_rejected_with_icmp(lab: Lab) -> None:
    body = "  type: NodePort\n  selector: {app: nobody}\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 31050}]\n"
    lab.apply(svc("empty", body))
    try:
        programmed(lab, "{node}:31050/TCP", lambda fe: fe is not None and fe["reject"], "to reject")
        with capture(lab, "client", "icmp") as wire:
            assert get(lab, NODE1, 31050) == (None, "refused")
        assert wire.port_unreachable(src=NODE1, dst=CLIENT, port=31050), wire.lines
    finally:
        lab.delete("service", "empty")


CONDITIONS = """\
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 31060}]
"""


def test_endpoint_conditions_decide_who_gets_new_connections(lab: Lab) -> None:
    lab.apply(svc("conditions", CONDITIONS))
    echo_a = f"{lab.pod_ip('echo-a')}:8080"
    try:
        programmed(lab, "{node}:31060/TCP", lambda fe: fe is not None and len(fe["backends"]) == 2, "with both pods")
        lab.apply(pod("echo-a", "node2", status=UNREADY))
        programmed(lab, "{node}:31060/TCP", lambda fe: fe is not None and fe["backends"] == [f"{lab.pod_ip('echo-b')}:8080"],
                   "without the unready echo-a")
        assert set(pods_from(lab, NODE1, 31060, 10)) == {"echo-b"}
        # No endpoint ready, both serving and terminating: those are used (kube-proxy's fallback).
        lab.apply(pod("echo-a", "node2", meta=TERMINATING) + "---\n" + pod("echo-b", "node3", meta=TERMINATING))
        programmed(lab, "{node}:31060/TCP", lambda fe: fe is not None and echo_a in fe["backends"] and
                   len(fe["backends"]) == 2, "with the serving terminating pods")
        assert set(pods_from(lab, NODE1, 31060, 20)) == {"echo-a", "echo-b"}
    finally:
        restore_echo_pods(lab)
        lab.delete("service", "conditions")


TRANSITION = """\
  type: %(type)s
  selector: {app: echo}
  ports:
  - {name: http, protocol: TCP, port: %(port)d, targetPort: 8080%(np)s}
  - {name: udp, protocol: UDP, port: %(port)d, targetPort: 8081%(npu)s}
"""


def transition(type_: str, port: int, node_port: int | None) -> str:
    np = f", nodePort: {node_port}" if node_port else ""
    npu = f", nodePort: {node_port + 1}" if node_port else ""
    return svc("mutable", TRANSITION % {"type": type_, "port": port, "np": np, "npu": npu})


def udp_answers(lab: Lab, addr: str, port: int) -> bool:
    reply, err = lab.udp_request("client", addr, port, "hostname", timeout=1.0)
    return err is None and reply in ("echo-a", "echo-b")


def test_type_and_port_transitions(lab: Lab) -> None:
    lab.apply(transition("ClusterIP", 80, None))
    try:
        lab.apply(transition("NodePort", 80, 31070))
        programmed(lab, "{node}:31070/TCP", present, "as a NodePort")
        programmed(lab, "{node}:31071/UDP", present, "as a NodePort")
        assert get(lab, NODE1, 31070)[0] == 200 and udp_answers(lab, NODE1, 31071)
        lab.apply(transition("NodePort", 80, 31072))             # the node ports change
        programmed(lab, "{node}:31072/TCP", present, "on its new port")
        programmed(lab, "{node}:31070/TCP", absent, "gone from its old port")
        assert get(lab, NODE1, 31072)[0] == 200 and udp_answers(lab, NODE1, 31073)
        assert get(lab, NODE1, 31070) == (None, "refused")
        lab.apply(transition("LoadBalancer", 8088, 31072))       # LoadBalancer, and the service port changes
        ip = lb_ip(lab, "mutable")
        programmed(lab, f"{ip}:8088/TCP", present, "as a LoadBalancer")
        assert get(lab, ip, 8088)[0] == 200 and udp_answers(lab, ip, 8088) and get(lab, NODE1, 31072)[0] == 200
        lab.apply(transition("ClusterIP", 8088, None))           # and back: no frontend at the edge
        programmed(lab, f"{ip}:8088/TCP", absent, "gone", nodes=("node1",))
        programmed(lab, "{node}:31072/TCP", absent, "gone")
        assert get(lab, NODE1, 31072) == (None, "refused")
    finally:
        lab.delete("service", "mutable")


ETP = """\
  type: NodePort
  externalTrafficPolicy: %s
  selector: {app: echo}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 31080}]
"""


def test_external_traffic_policy_local_and_its_flips(lab: Lab) -> None:
    lab.apply(svc("etp", ETP % "Cluster"))
    try:
        programmed(lab, "{node}:31080/TCP", lambda fe: fe is not None and fe["policy"] == "Cluster", "Cluster")
        assert get(lab, NODE1, 31080)[0] == 200
        lab.apply(svc("etp", ETP % "Local"))
        programmed(lab, "{node}:31080/TCP", lambda fe: fe is not None and fe["policy"] == "Local", "Local")
        assert get(lab, NODE1, 31080) == (None, "timeout")      # no local endpoint on node1: dropped
        status, seen = get(lab, NODE2, 31080, "/clientip")
        assert status == 200 and seen.rsplit(":", 1)[0] == CLIENT  # the client's own address, from node2's pod
        lab.apply(svc("etp", ETP % "Cluster"))
        programmed(lab, "{node}:31080/TCP", lambda fe: fe is not None and fe["policy"] == "Cluster", "Cluster again")
        assert get(lab, NODE1, 31080)[0] == 200
    finally:
        lab.delete("service", "etp")


UDP_SERVICE = """\
  type: NodePort
  selector: {app: udp-server}
  ports: [{name: udp, protocol: UDP, port: 8081, targetPort: 8081, nodePort: 31090}]
"""


def test_a_udp_flow_follows_a_replaced_server_pod(lab: Lab, tmp_path: Path) -> None:
    """e2e: "should be able to preserve UDP traffic when server pod cycles for a NodePort service"."""
    lab.apply(pod("udp-a", "node2", app="udp-server") + "---\n" + svc("udp-cycle", UDP_SERVICE))
    progress, stop = tmp_path / "answers", tmp_path / "stop"
    flow: list[list[str]] = []
    worker = threading.Thread(target=lambda: flow.append(
        lab.run_in("client", udp_flow, NODE1, 31090, 47123, str(progress), str(stop), 60.0, timeout=70)))
    try:
        programmed(lab, "{node}:31090/UDP", lambda fe: fe is not None and len(fe["backends"]) == 1, "with udp-a")
        worker.start()
        wait_until("udp-a answering the flow", lambda: progress.exists() and "udp-a" in progress.read_text())
        lab.delete("pod", "udp-a")
        lab.apply(pod("udp-b", "node3", app="udp-server"))
        wait_until("the same flow answered by udp-b", lambda: "udp-b" in progress.read_text(), timeout=30)
    finally:
        stop.touch()
        if worker.is_alive() or flow == []:
            worker.join(timeout=70)
        lab.delete("service", "udp-cycle")
        for name in ("udp-a", "udp-b"):
            if any(p.name == name for p in lab.pods()):
                lab.delete("pod", name)
    answers = flow[0]
    switched = answers.index("udp-b")
    assert set(answers[:switched]) == {"udp-a"} and set(answers[switched:]) == {"udp-b"}, answers
