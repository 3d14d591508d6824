"""Unit tests of bpflb.model.translate for in-cluster traffic (issue 13): ClusterIP frontends with the
internalTrafficPolicy's endpoints, the internal view the other frontends of a port name, and bad input."""

from __future__ import annotations

from typing import Any

from bpflb.model.types import Algorithm, DesiredState, Frontend, FrontendKind, Proto
from tests.unit import helpers
from tests.unit.helpers import NODE, Obj, endpoint, endpoint_slice, fe, l4, node, two_pods

NODE_IP = helpers.NODE_INTERNAL
CIP = "10.96.0.10"


def service(name: str = "echo", type_: str = "ClusterIP", cluster_ip: str | None = CIP,
            ports: list[Obj] | None = None, **spec: Any) -> Obj:
    """helpers.service with a clusterIP (and no nodePort unless the ports name one)."""
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return helpers.service(name, type_=type_, ports=ports or [{"name": "http", "port": 80, "targetPort": 8080,
                                                                "protocol": "TCP"}], **spec)


def run(services: list[Obj], slices: list[Obj], config: dict[str, str] | None = None) -> DesiredState:
    """One translation for a node with an InternalIP only (its NodePorts: one frontend per port)."""
    return helpers.run(services, slices, nodes=[node(external=None)], config=config)


pods = two_pods


def names(front: Frontend) -> list[str]:
    return [b.name for b in front.backends]


def problems(state: DesiredState) -> list[tuple[str, str]]:
    return [(p.obj, p.field) for p in state.problems]


# -- ClusterIP frontends -----------------------------------------------------------------------------------


def test_clusterip_service_gives_one_clusterip_frontend_per_port() -> None:
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    slice_ports = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
    state = run([service(ports=ports)], [endpoint_slice("echo", pods(), ports=slice_ports)])
    assert list(state.frontends) == [l4(CIP, 53, Proto.UDP), l4(CIP, 80)]
    http, dns = fe(state, CIP, 80), fe(state, CIP, 53, Proto.UDP)
    for front in (http, dns):
        assert front.kind is FrontendKind.CLUSTER_IP
        assert front.service == "default/echo" and not front.local_only and front.internal is None
        assert names(front) == ["echo-1", "echo-2"] and not front.no_endpoints
    assert [str(b.l4) for b in dns.backends] == ["10.0.1.1:5353/UDP", "10.0.2.1:5353/UDP"]
    assert state.problems == []


def test_clusterips_ipv4_entry_wins_ipv6_ignored_unset_gives_nothing() -> None:
    dual = service("dual", cluster_ip="fd00::10", clusterIPs=["fd00::10", "10.96.0.20"])
    unset = service("unset", cluster_ip="")
    v6 = service("v6", cluster_ip="fd00::11")
    state = run([dual, unset, v6], [endpoint_slice(s, pods()) for s in ("dual", "unset", "v6")])
    assert list(state.frontends) == [l4("10.96.0.20", 80)]
    assert state.problems == []


def test_headless_and_externalname_give_nothing() -> None:
    headless = service("headless", cluster_ip="None")
    alias = service("alias", type_="ExternalName", cluster_ip=None, externalName="example.com")
    state = run([headless, alias], [endpoint_slice(s, pods()) for s in ("headless", "alias")])
    assert state.frontends == {} and state.problems == []


# -- internalTrafficPolicy ---------------------------------------------------------------------------------


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints() -> None:
    state = run([service(internalTrafficPolicy="Local")], [endpoint_slice("echo", pods())])
    front = fe(state, CIP, 80)
    assert front.local_only and names(front) == ["echo-1"] and not front.no_endpoints
    assert [b.name for b in front.draining] == []


def test_internal_traffic_policy_local_without_local_endpoint_drops_without_one_anywhere_rejects() -> None:
    remote_only = [endpoint("10.0.2.1", "node-b", "echo-2")]
    state = run([service(internalTrafficPolicy="Local")], [endpoint_slice("echo", remote_only)])
    front = fe(state, CIP, 80)
    assert front.backends == () and not front.no_endpoints          # drop (EHOSTUNREACH at the socket)
    state = run([service(internalTrafficPolicy="Local")], [endpoint_slice("echo", [])])
    assert fe(state, CIP, 80).no_endpoints                           # reject (ECONNREFUSED)


def test_internal_and_external_policies_apply_to_their_own_frontends() -> None:
    """eTP Local, iTP Cluster: the NodePort keeps this node's endpoint, the ClusterIP every endpoint, and
    the NodePort names the ClusterIP as the internal view in-cluster clients get."""
    ports = [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]
    state = run([service(type_="NodePort", ports=ports, externalTrafficPolicy="Local")],
                [endpoint_slice("echo", pods())])
    nodeport, cip = fe(state, NODE_IP, 30080), fe(state, CIP, 80)
    assert nodeport.kind is FrontendKind.NODEPORT and nodeport.local_only and names(nodeport) == ["echo-1"]
    assert cip.kind is FrontendKind.CLUSTER_IP and not cip.local_only and names(cip) == ["echo-1", "echo-2"]
    assert nodeport.internal == cip.l4 and cip.internal is None
    # and the other way round
    state = run([service(type_="NodePort", ports=ports, internalTrafficPolicy="Local")],
                [endpoint_slice("echo", pods())])
    assert names(fe(state, NODE_IP, 30080)) == ["echo-1", "echo-2"] and names(fe(state, CIP, 80)) == ["echo-1"]


def test_loadbalancer_and_external_ips_name_the_clusterip_as_their_internal_view() -> None:
    svc = service(type_="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                  externalIPs=["198.51.100.7"])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    state = run([svc], [endpoint_slice("echo", pods())])
    kinds = {str(f.l4): (f.kind, f.internal) for f in state.frontends.values()}
    cip = l4(CIP, 80)
    assert kinds == {f"{CIP}:80/TCP": (FrontendKind.CLUSTER_IP, None),
                     f"{NODE_IP}:30080/TCP": (FrontendKind.NODEPORT, cip),
                     "198.51.100.1:80/TCP": (FrontendKind.LOADBALANCER, cip),
                     "198.51.100.7:80/TCP": (FrontendKind.EXTERNAL_IP, cip)}


# -- terminating endpoints, affinity, algorithm ------------------------------------------------------------


def test_terminating_endpoints_as_for_external_traffic() -> None:
    eps = [endpoint("10.0.1.1", NODE, "echo-1"), endpoint("10.0.2.1", "node-b", "echo-2", ready=False,
                                                          terminating=True, serving=True)]
    front = fe(run([service()], [endpoint_slice("echo", eps)]), CIP, 80)
    assert names(front) == ["echo-1"] and [b.name for b in front.draining] == ["echo-2"]
    # none ready: the serving terminating ones take new flows
    eps[0] = endpoint("10.0.1.1", NODE, "echo-1", ready=False, terminating=True, serving=True)
    front = fe(run([service()], [endpoint_slice("echo", eps)]), CIP, 80)
    assert names(front) == ["echo-1", "echo-2"] and not front.no_endpoints


def test_session_affinity_and_algorithm_annotation_apply_to_the_clusterip() -> None:
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    config = {"extraLoadBalancerAlgorithmsEnabled": "true"}
    front = fe(run([svc], [endpoint_slice("echo", pods())], config), CIP, 80)
    assert front.affinity_timeout == 60 and front.algorithm is Algorithm.MAGLEV


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_clusterip_is_a_problem_and_the_other_frontends_stay() -> None:
    ports = [{"name": "http", "port": 80, "nodePort": 30080}]
    state = run([service(type_="NodePort", cluster_ip="10.96.0.300", ports=ports),
                 service("loop", cluster_ip="127.0.0.1")],
                [endpoint_slice("echo", pods()), endpoint_slice("loop", pods())])
    assert list(state.frontends) == [l4(NODE_IP, 30080)]
    assert fe(state, NODE_IP, 30080).internal is None                 # no ClusterIP frontend to point to
    assert problems(state) == [("Service default/echo", "spec.clusterIP"), ("Service default/loop", "spec.clusterIP")]
    assert "not a valid IP address" in str(state.problems[0])
    assert "cannot be used as a clusterIP" in str(state.problems[1])


def test_bad_policy_or_clusterips_skips_the_service_with_a_problem() -> None:
    bad_policy = service("bad-policy", internalTrafficPolicy="Nearby")
    bad_list = service("bad-list", clusterIPs="10.96.0.30")
    good = service("good", cluster_ip="10.96.0.31")
    state = run([bad_policy, bad_list, good], [endpoint_slice(s, pods()) for s in ("bad-policy", "bad-list", "good")])
    assert list(state.frontends) == [l4("10.96.0.31", 80)]
    assert problems(state) == [("Service default/bad-list", "spec.clusterIPs"),
                               ("Service default/bad-policy", "spec.internalTrafficPolicy")]
    assert 'expected Cluster or Local; got "Nearby"; the Service is skipped' in str(state.problems[1])


def test_two_services_on_one_clusterip_port_first_keeps_it() -> None:
    state = run([service("beta"), service("alpha")], [endpoint_slice(s, pods()) for s in ("alpha", "beta")])
    assert fe(state, CIP, 80).service == "default/alpha"
    assert problems(state) == [("Service default/beta", "spec.clusterIP")]
    assert "already used by Service default/alpha" in str(state.problems[0])


def test_only_the_nodes_own_external_ips_are_served_to_in_cluster_clients() -> None:
    """CVE-2020-8554: any Service may list any address as an externalIP; in-cluster clients keep reaching
    the real address unless it is this node's own (Cilium's rule). LoadBalancer IPs are always served."""
    svc = service(type_="LoadBalancer", ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                  externalIPs=["198.51.100.7", NODE_IP])
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    state = run([svc], [endpoint_slice("echo", pods())])
    served = {str(f.l4): f.in_cluster for f in state.frontends.values()}
    assert served == {f"{CIP}:80/TCP": True, f"{NODE_IP}:30080/TCP": True, "198.51.100.1:80/TCP": True,
                      "198.51.100.7:80/TCP": False, f"{NODE_IP}:80/TCP": True}
