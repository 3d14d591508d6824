"""The lab's logic without namespaces (no privileges needed): lab names and options, the agent command,
Service validation and allocation, EndpointSlice generation, the expectation rules of `lab check`."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from bpflb.model.types import Mode
from bpflb_lab.lab import Lab, LabError, cgroups, cluster
from bpflb_lab.lab.check import DROP, REFUSED, EndpointView, expect, plan
from bpflb_lab.lab.core import ENV_AGENT_CMD, default_manifests
from bpflb_lab.lab.state import LabState
from tests.lab.helpers import unique_lab_name


def pod(name: str, node: str, ip: str, labels: dict[str, str] | None = None, ports: list[Any] | None = None,
        **status: Any) -> dict[str, Any]:
    manifest = {"kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels or {"app": "x"}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]}}
    return cluster.pod_with_status(manifest, ip, "198.18.0.11") | ({"status": status} if status else {})


def service(name: str = "s", **spec: Any) -> dict[str, Any]:
    base = {"type": "NodePort", "selector": {"app": "x"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": base | spec}


def test_unsupported_options_are_refused_before_anything_is_created() -> None:
    name = unique_lab_name()
    with pytest.raises(LabError, match="must be one of"):
        Lab(name).up(tunnel="geneve", agents=False)
    with pytest.raises(LabError, match="must be one of"):
        Lab(name).up(mode="fast", agents=False)
    assert not Lab(name).exists()


@pytest.mark.parametrize("bad", ["Bpflb", "lab-pod-x", "lab-pod", "-x", "a" * 41, "a_b"])
def test_lab_names_that_could_collide_are_refused(bad: str) -> None:
    with pytest.raises(LabError, match="lab name"):
        Lab(bad)


def test_default_agent_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_AGENT_CMD, raising=False)
    lab = Lab("bpflb-tdefault")
    state = LabState(name=lab.name, nodes=1, mode="SNAT", tunnel="Disabled", agents=True, created=0.0)
    assert lab.agent_argv(state, "node1") == [
        sys.executable, "-m", "bpflb", "agent", "--node-name", "node1",
        "--source-dir", "/run/bpflb/labs/bpflb-tdefault/cluster",
        "--pin-root", "/sys/fs/bpf/bpflb-lab/bpflb-tdefault/node1", "--device", "eth0",
        "--cgroup-root", str(cgroups.node_cgroup("bpflb-tdefault", "node1")),
        "--metrics-listen", "0.0.0.0:9962"]        # each node's namespace: the same port on each
    with pytest.raises(LabError, match="bad placeholder"):
        Lab("bpflb-tdefault", agent_cmd="agent {nope}").agent_argv(state, "node1")


def test_default_manifests_parse() -> None:
    docs = cluster.load_documents(default_manifests(), "default")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Pod", "echo-a"), ("Pod", "echo-b"), ("Service", "echo"), ("Service", "echo-local"), ("Service", "echo-lb"),
        ("Pod", "client-pod")]


def test_load_documents_rejects_other_kinds() -> None:
    with pytest.raises(LabError, match="kind 'Deployment' is not supported"):
        cluster.load_documents("kind: Deployment\nmetadata: {name: d}\n", "f.yaml")
    with pytest.raises(LabError, match="metadata.name is required"):
        cluster.load_documents("kind: Pod\nmetadata: {}\n", "f.yaml")


def test_nodeports_and_lb_addresses_are_allocated_and_kept() -> None:
    a = cluster.validate_service(service("a"), [], None)
    assert a["spec"]["ports"][0]["nodePort"] == 30000
    assert a["spec"]["externalTrafficPolicy"] == "Cluster"
    b = cluster.validate_service(service("b", type="LoadBalancer"), [a], None)
    assert b["spec"]["ports"][0]["nodePort"] == 30001
    assert b["status"]["loadBalancer"]["ingress"] == [{"ip": "198.18.1.10"}]
    b2 = cluster.validate_service(service("b", type="LoadBalancer"), [a], b)
    assert b2["spec"]["ports"][0]["nodePort"] == 30001, "a replaced Service keeps its allocations"
    assert b2["status"]["loadBalancer"]["ingress"] == [{"ip": "198.18.1.10"}]
    with pytest.raises(LabError, match="nodePort 30000/TCP is already allocated to Service default/a"):
        cluster.validate_service(service("c", ports=[{"port": 80, "nodePort": 30000}]), [a], None)
    with pytest.raises(LabError, match="not supported; expected TCP or UDP"):
        cluster.validate_service(service("c", ports=[{"port": 80, "protocol": "SCTP"}]), [], None)


def test_slices_resolve_named_target_ports_per_pod() -> None:
    svc = cluster.validate_service(service(ports=[{"name": "web", "port": 80, "targetPort": "web"}]), [], None)
    pods = [pod("p1", "node1", "10.244.1.10", ports=[{"name": "web", "containerPort": 8080}]),
            pod("p2", "node2", "10.244.2.10", ports=[{"name": "web", "containerPort": 9090}]),
            pod("p3", "node2", "10.244.2.11"),  # no port named web: listed, with no ports (as Kubernetes does)
            pod("other", "node1", "10.244.1.11", labels={"app": "y"})]
    slices = cluster.endpoint_slices(svc, pods)
    by_port = {s["ports"][0]["port"]: s for s in slices if s["ports"]}
    assert set(by_port) == {8080, 9090}
    assert by_port[8080]["endpoints"] == [{
        "addresses": ["10.244.1.10"], "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": "node1", "targetRef": {"kind": "Pod", "namespace": "default", "name": "p1"}}]
    for s in slices:
        assert s["apiVersion"] == "discovery.k8s.io/v1" and s["addressType"] == "IPv4"
        assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "s"
    assert sorted(e["targetRef"]["name"] for s in slices for e in s["endpoints"]) == ["p1", "p2", "p3"]
    [p3_slice] = [s for s in slices if s["endpoints"][0]["targetRef"]["name"] == "p3"]
    assert p3_slice["ports"] == []


def test_slice_conditions_and_placeholder() -> None:
    svc = cluster.validate_service(service(), [], None)
    not_ready = pod("a", "node1", "10.244.1.10", phase="Running", podIP="10.244.1.10",
                    conditions=[{"type": "Ready", "status": "False"}])
    leaving = pod("b", "node1", "10.244.1.11")
    leaving["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    [sl] = cluster.endpoint_slices(svc, [not_ready, leaving])
    conds = {e["targetRef"]["name"]: e["conditions"] for e in sl["endpoints"]}
    assert conds == {"a": {"ready": False, "serving": False, "terminating": False},
                     "b": {"ready": False, "serving": True, "terminating": True}}
    [empty] = cluster.endpoint_slices(svc, [])
    assert empty["endpoints"] == [] and empty["ports"] == []
    assert cluster.endpoint_slices(service(selector=None), [leaving]) == []


EP_A, EP_B = EndpointView("echo-a", "node2"), EndpointView("echo-b", "node3")
CLIENT = "198.18.0.100"


def scenario(mode: Mode, node: int, eps: list[EndpointView], local: bool = False, proto: str = "TCP") -> Any:
    return expect(mode, proto=proto, local_only=local, receiving_node=f"node{node}",
                  receiving_ip=f"198.18.0.1{node}", client_ip=CLIENT, endpoints=eps)


def test_expectations_snat() -> None:
    assert scenario(Mode.SNAT, 1, [EP_A, EP_B]).sees == {"echo-a": "198.18.0.11", "echo-b": "198.18.0.11"}
    assert scenario(Mode.SNAT, 2, [EP_A, EP_B]).sees == {"echo-a": CLIENT, "echo-b": "198.18.0.12"}
    assert scenario(Mode.SNAT, 2, [EP_A, EP_B], local=True).sees == {"echo-a": CLIENT}
    dropped = scenario(Mode.SNAT, 1, [EP_A, EP_B], local=True)
    assert dropped.outcome == DROP and dropped.text() == "no answer (eTP Local, no local pod on node1)"
    assert scenario(Mode.SNAT, 1, [], local=True).outcome == REFUSED
    assert scenario(Mode.SNAT, 1, [EndpointView("x", "node1", ready=False, serving=False)]).outcome == REFUSED
    terminating = EndpointView("t", "node1", ready=False, serving=True, terminating=True)
    assert scenario(Mode.SNAT, 1, [terminating]).sees == {"t": CLIENT}, "serving terminating endpoints as fallback"
    text = scenario(Mode.SNAT, 1, [EP_A, EP_B]).text()
    assert text == "answer from echo-a|echo-b, client address 198.18.0.11"


def test_expectations_dsr_and_hybrid() -> None:
    assert scenario(Mode.DSR, 1, [EP_A, EP_B]).sees == {"echo-a": CLIENT, "echo-b": CLIENT}
    assert scenario(Mode.HYBRID, 1, [EP_A], proto="TCP").sees == {"echo-a": CLIENT}
    assert scenario(Mode.HYBRID, 1, [EP_A], proto="UDP").sees == {"echo-a": "198.18.0.11"}


def test_plan_covers_every_frontend_of_the_default_workload() -> None:
    docs = cluster.load_documents(default_manifests(), "default")
    echo = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"].startswith("echo-")]
    pods = [cluster.pod_with_status(d, ip, "x") for d, ip in zip(echo, ["10.244.2.10", "10.244.3.10"], strict=True)]
    services = [cluster.validate_service(d, [], None) for d in docs if d["kind"] == "Service"]
    slices = [s for svc in services for s in cluster.endpoint_slices(svc, pods)]
    scenarios = plan(services, slices, nodes=3, mode=Mode.SNAT)
    fronts = {(s.service, s.frontend, s.proto, s.via) for s in scenarios}
    assert ("default/echo", "198.18.0.13:30081", "UDP", "node3") in fronts
    assert ("default/echo-lb", "198.18.1.10:80", "TCP", "node1") in fronts
    assert len(scenarios) == 3 * 2 + 3 + 3 + 1           # echo tcp+udp, echo-local, echo-lb nodeports + LB IP
    assert sum(len(s.probes) for s in scenarios) == 2 * (3 + 3 + 4) + 3
