"""Failure stays with its object, on the wire (`lab up --kube`: the emulated API, the operator, three real
agents): a Service that does not fit the datapath's maps — 300 externalIPs x 250 ports (75,000 frontends,
more than lb_dsr_frontends holds), or 70,000 endpoints (more than a Service port and lb_backends hold) — is
refused alone: a Service added afterwards is served, the oversized one is reported (a Warning Event on it from
every node, every node's report, the ModuleConfig's message), and deleting it leaves every node healthy, with
no agent restarted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb_lab.lab import Lab, kube
from tests.lab.conftest import lab_running
from tests.lab.helpers import wait_until

pytestmark = pytest.mark.privileged

NODES = ("node1", "node2", "node3")
NODE1 = "198.18.0.11"
SLOW = 120.0          # three agents translating 75,000 frontends on two shared cores


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(kube=True, mode="SNAT") as shared:
        yield shared


def report(lab: Lab, node: str) -> dict[str, str]:
    cm = kube.call(lab, "get", f"/api/v1/namespaces/kube-system/configmaps/bpflb-node-{node}")
    return dict((cm or {}).get("data") or {})


def refused_everywhere(lab: Lab, service: str) -> bool:
    return all(service in report(lab, n).get("refused", "").split(",") and report(lab, n).get("state") == "Ready"
               for n in NODES)


def healthy(lab: Lab) -> bool:
    return all(report(lab, n).get("state") == "Ready" and not report(lab, n).get("refused") for n in NODES)


def refusal_events(lab: Lab, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.call(lab, "list", "/api/v1/namespaces/default/events")
            if (e.get("involvedObject") or {}).get("name") == name and e.get("reason") == "ServiceRefused"]


def mc_message(lab: Lab) -> str:
    return str((kube.call(lab, "get", kube.MC_PATH).get("status") or {}).get("message", ""))


def served(lab: Lab, port: int) -> str | None:
    """The pod that answered a new connection to node1:port, None when nothing did."""
    body, _error = lab.http_get("client", f"http://{NODE1}:{port}/hostname", timeout=2.0)
    return body if body and body.startswith("echo-") else None


def agents_alive(lab: Lab) -> dict[str, int]:
    pids = dict(lab.state().agent_pids)
    for node, pid in pids.items():
        assert os.path.exists(f"/proc/{pid}"), f"the agent of {node} (pid {pid}) is gone"
    return pids


def node_port_service(name: str, port: int) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, selector: "
            f"{{app: echo}}, ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {port}}}]}}\n")


def the_refusal_is_told_and_undone(lab: Lab, name: str, says: str, later_port: int) -> None:
    """The common part: refused on every node with a reason that says `says`, a Service added afterwards
    served, deleting the culprit leaves every node healthy, and no agent was restarted meanwhile."""
    pids = agents_alive(lab)
    wait_until(f"every node refusing default/{name}", lambda: refused_everywhere(lab, f"default/{name}"), SLOW, 0.5)
    events = wait_until(f"a Warning Event on default/{name} from each node",
                        lambda: len({e["source"]["host"] for e in refusal_events(lab, name)}) == 3
                        and refusal_events(lab, name), 30, 0.5)
    assert all(e["type"] == "Warning" for e in events), events
    assert {e["source"]["host"] for e in events if says in e["message"]} == set(NODES), [e["message"] for e in events]
    wait_until("the ModuleConfig naming it", lambda: f"default/{name} on node1, node2, node3" in mc_message(lab),
               30, 0.5)

    lab.apply(node_port_service(f"after-{name}", later_port))
    assert wait_until(f"the Service added afterwards served on node1:{later_port}",
                      lambda: served(lab, later_port), SLOW, 0.5)
    assert served(lab, 30080)                     # and what was there before still is

    lab.delete("service", name)
    wait_until("every node healthy again", lambda: healthy(lab), SLOW, 0.5)
    wait_until("the ModuleConfig no longer naming it", lambda: f"default/{name}" not in mc_message(lab), 30, 0.5)
    assert mc_message(lab).startswith("Ready: 3/3 nodes")
    assert served(lab, later_port) and served(lab, 30080)
    assert agents_alive(lab) == pids, "an agent was restarted"
    lab.delete("service", f"after-{name}")


def test_a_service_with_75000_frontends_is_refused_alone(lab: Lab) -> None:
    ports = ", ".join(f"{{name: p{i}, port: {1000 + i}, targetPort: 8080}}" for i in range(250))
    ips = ", ".join(f"198.19.{i // 250}.{i % 250 + 1}" for i in range(300))
    lab.apply(f"apiVersion: v1\nkind: Service\nmetadata: {{name: wide}}\nspec: {{type: ClusterIP, selector: "
              f"{{app: echo}}, externalIPs: [{ips}], ports: [{ports}]}}\n")
    the_refusal_is_told_and_undone(lab, "wide", "lb_dsr_frontends", 30700)


def test_a_service_with_70000_endpoints_is_refused_alone(lab: Lab) -> None:
    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": f"many-{k}", "labels": {"kubernetes.io/service-name": "many"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [f"10.250.{(k * 1000 + i) // 256 % 256}.{(k * 1000 + i) % 256}"],
                              "conditions": {"ready": True}, "nodeName": "node2"} for i in range(1000)]}
              for k in range(70)]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "many"},
           "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                                   "nodePort": 30701}]}}
    lab.apply([svc, *slices])
    the_refusal_is_told_and_undone(lab, "many", "at most 65,535", 30702)
