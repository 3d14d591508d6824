"""The SNAT datapath on the wire: a lab whose nodes run the real `bpflb agent` (real BPF programs in the
kernel, maps programmed from the lab's Kubernetes YAML), real packets from the client namespace, and the
echo pods telling which pod answered and which source address they saw."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import (
    answers,
    capture,
    long_lived,
    seen_ip,
    wait_programmed,
    wait_until,
)

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
LB_IP = "198.18.1.10"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running() as shared:          # real agents: bpflb agent in every node namespace
        yield shared


def test_the_lab_check_passes_and_every_verdict_is_what_kube_proxy_would_give(lab: Lab) -> None:
    lab.apply("kind: Service\nmetadata: {name: empty}\nspec: {type: NodePort, selector: {app: none}, "
              "ports: [{port: 80, nodePort: 30400}]}\n")
    for k, node in enumerate(("node1", "node2", "node3"), start=1):
        wait_programmed(lab, (node,), f"{lab.node_ip(k)}:30400/TCP", lambda fe: fe is not None and fe["reject"],
                        "programmed to reject (no endpoints)")
    report = lab.check()
    assert report.ok, report.render()
    by = {(r.service, r.frontend, r.request): r for r in report.rows}
    assert by[("default/echo-local", f"{NODE1}:30180", "GET /hostname")].error == "timeout"
    assert by[("default/empty", f"{NODE2}:30400", "GET /hostname")].error == "connection refused"
    # The refusal is the datapath's REJECT: an ICMP port unreachable from node2 about this very connection
    # (a node's own RST would look the same to the client's socket).
    with capture(lab, "client", "icmp or (tcp and port 30400)") as wire:
        assert lab.http_get("client", f"http://{NODE2}:30400/hostname") == (None, "connection refused")
    assert wire.port_unreachable(src=NODE2, dst=CLIENT, port=30400), wire.lines
    assert not [f for f in wire.matching(src=NODE2, sport=30400)], "a TCP reply (RST) instead of the REJECT"
    lb = by[("default/echo-lb", f"{LB_IP}:80", "GET /clientip")]
    assert lb.answered in ("echo-a", "echo-b") and (lb.client_seen or "").startswith(f"{NODE1}:")
    lab.delete("service", "empty")


def test_node1_nodeport_is_snat_to_remote_pods(lab: Lab) -> None:
    results = lab.connections("client", NODE1, 30080, 20, request="/clientip")
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.pod for r in results} <= {"echo-a", "echo-b"}
    assert {seen_ip(r.replies[0]) for r in results} == {NODE1}


def test_node2_nodeport_keeps_the_client_address_for_its_local_pod(lab: Lab) -> None:
    results = lab.connections("client", NODE2, 30080, 30, request="/clientip")
    assert all(r.ok for r in results)
    seen = {(r.pod, seen_ip(r.replies[0])) for r in results}
    assert ("echo-a", CLIENT) in seen, seen          # local pod: client address intact
    assert seen <= {("echo-a", CLIENT), ("echo-b", NODE2)}


def test_external_traffic_policy_local(lab: Lab) -> None:
    body, err = lab.http_get("client", f"http://{NODE1}:30180/clientip")
    assert body is None and err == "timeout"          # no local pod on node1: dropped
    results = lab.connections("client", NODE2, 30180, 10, request="/clientip")
    assert {(r.pod, seen_ip(r.replies[0])) for r in results} == {("echo-a", CLIENT)}


def test_udp_nodeport(lab: Lab) -> None:
    results = lab.connections("client", NODE1, 30081, 10, proto="UDP", request="clientip")
    assert all(r.ok for r in results), [r.error for r in results]
    assert {seen_ip(r.replies[0]) for r in results} == {NODE1}


def test_loadbalancer_ip(lab: Lab) -> None:
    results = lab.connections("client", LB_IP, 80, 10, request="/clientip")
    assert all(r.ok for r in results)
    assert {seen_ip(r.replies[0]) for r in results} == {NODE1}   # routed via node1, SNAT to remote pods


def test_200_new_connections_spread_over_both_pods(lab: Lab) -> None:
    results = lab.connections("client", NODE1, 30080, 200, parallel=20)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:5]
    counts = Counter(r.pod for r in results)
    assert set(counts) == {"echo-a", "echo-b"}
    assert min(counts.values()) >= 50, counts


def test_a_long_lived_connection_keeps_its_backend_across_changes(lab: Lab, tmp_path: Path) -> None:
    out: list[list[str]] = []
    progress = tmp_path / "answers"
    worker = threading.Thread(target=lambda: out.append(
        lab.run_in("client", long_lived, 4.0, str(progress), timeout=15)))
    worker.start()
    wait_until("the long-lived connection's first answers", lambda: answers(progress) >= 3)
    # Meanwhile the Service gains a third pod: slots are rewritten, the flow must not move.
    lab.apply("kind: Pod\nmetadata: {name: echo-c, labels: {app: echo}}\nspec: {nodeName: node1, containers: "
              "[{name: echo, ports: [{name: http, containerPort: 8080}, {name: udp, containerPort: 8081, "
              "protocol: UDP}]}]}\n")
    worker.join()
    try:
        pods = out[0]
        assert len(pods) >= 10 and len(set(pods)) == 1, pods
        # ...while new connections can now reach echo-c too (node1's local pod: client address kept).
        results = lab.connections("client", NODE1, 30080, 60, request="/clientip")
        seen = {(r.pod, seen_ip(r.replies[0])) for r in results}
        assert ("echo-c", CLIENT) in seen, seen
    finally:
        lab.delete("pod", "echo-c")


def test_node_namespaces_hold_no_nat_rules(lab: Lab) -> None:
    for node in ("node1", "node2", "node3"):
        ipt = lab.exec(node, ["iptables-save", "-t", "nat"])
        assert "-A " not in ipt.stdout, ipt.stdout
        nft = lab.exec(node, ["nft", "list", "ruleset"])
        assert nft.returncode == 0 and "nat" not in nft.stdout, nft.stdout
        tc = lab.exec(node, ["tc", "filter", "show", "dev", "eth0", "ingress"])
        assert "lb_ingress" in tc.stdout, tc.stdout       # the BPF program is what does the work


def test_a_broken_datapath_fails_the_check(lab: Lab) -> None:
    """The check is not a rubber stamp: without node1's program, node1's frontends fail."""
    lab.exec("node1", ["tc", "filter", "del", "dev", "eth0", "ingress"], check=True)
    try:
        # 3 s per probe: a SYN lost on this busy 2-CPU machine is retransmitted after 1 s, which the default 1 s
        # probe would count against node2 or node3 (seen as a timeout of theirs, before and after issue 14).
        report = lab.check(timeout=3.0)
        failed = {r.via for r in report.rows if r.verdict == "FAIL"}
        assert not report.ok and failed == {"node1"}, report.render()
    finally:
        # restart node1's agent: it re-attaches its programs on the pinned maps
        lab.restart_agent("node1")
    after = lab.check()
    assert after.ok, after.render()


BAD_OBJECTS = """\
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  type: NodePort
  selector: {app: echo}
  ports:
  - {name: sctp, protocol: SCTP, port: 9, nodePort: 30009}
  - {name: far, protocol: TCP, port: 80, targetPort: 8080, nodePort: 40000}
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-1, namespace: default, labels: {kubernetes.io/service-name: bad}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}, {name: far, protocol: TCP, port: 8080}]
endpoints: [{addresses: [10.244.2.10], nodeName: node2, targetRef: {kind: Pod, name: echo-a}}]
---
apiVersion: v1
kind: Service
metadata: {name: nosel, namespace: default}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 30555}]
---
this: is: not yaml
"""


def test_bad_objects_are_skipped_with_their_reason_and_the_rest_keeps_working(lab: Lab) -> None:
    """Written straight into the agents' source (the lab's own apply would refuse some of them)."""
    bad = lab.paths.cluster / "zz-bad-objects.yaml"
    bad.write_text(BAD_OBJECTS)
    try:
        log = lab.paths.agent_log("node1")
        deadline = time.monotonic() + 10
        wanted = ["Service default/bad: spec.ports[0].protocol: SCTP is not supported",
                  "Service default/bad: spec.ports[1].nodePort: must be an integer in 30000..32767; got 40000",
                  "Service default/nosel: spec.selector: selector-less Service without EndpointSlices",
                  "zz-bad-objects.yaml"]
        while time.monotonic() < deadline and not all(w in log.read_text() for w in wanted):
            time.sleep(0.2)
        text = log.read_text()
        for w in wanted:
            assert w in text, f"agent log lacks {w!r}"
        # The good port of the bad Service is programmed and answers, and everything else still works.
        body, err = lab.http_get("client", f"http://{NODE1}:30090/hostname")
        assert (body, err) == ("echo-a", None)
        assert lab.check().ok
    finally:
        bad.unlink()
