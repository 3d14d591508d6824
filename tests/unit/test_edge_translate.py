"""Translation of kube-proxy's edge semantics: loadBalancerSourceRanges (enforced with svcSourceRangeCheck,
said once when not), Cilium's src-ranges-policy and type annotations, the headless and service-proxy-name
labels on Services and EndpointSlices, healthCheckNodePort with this node's ready endpoints, and every
Service field bpflb does not act on said once (state.notes) with its reason."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from bpflb.model.types import DesiredState, FrontendKind, HealthCheck, Problem
from tests.unit.helpers import (
    NODE,
    NODE_EXTERNAL,
    NODE_INTERNAL,
    endpoint,
    endpoint_slice,
    fe,
    lb_service,
    run,
    service,
    the_problem,
    two_pods,
)

LB = "198.51.100.1"
CHECK_ON = {"svcSourceRangeCheck": "true"}


def the_note(state: DesiredState, *parts: str) -> Problem:
    found = [n for n in state.notes if all(part in str(n) for part in parts)]
    assert len(found) == 1, f"expected one note with {parts}, got: {[str(n) for n in state.notes]}"
    return found[0]


def ranged_service(ranges: list[Any] | None = None, annotations: dict[str, str] | None = None,
                   **spec: Any) -> dict[str, Any]:
    svc = lb_service(loadBalancerSourceRanges=["203.0.113.0/24"] if ranges is None else ranges, **spec)
    if annotations:
        svc["metadata"]["annotations"] = annotations
    return svc


def slices() -> list[dict[str, Any]]:
    return [endpoint_slice(endpoints=two_pods())]


# -- source ranges -------------------------------------------------------------------------------------------


def test_source_ranges_are_enforced_on_loadbalancer_ips_only_when_the_setting_says_so() -> None:
    state = run([ranged_service(["203.0.113.0/24", "192.0.2.7/32"])], slices(), config=CHECK_ON)
    lb = fe(state, LB, 80)
    assert lb.source_ranges == (IPv4Network("203.0.113.0/24"), IPv4Network("192.0.2.7/32"))
    assert not lb.source_ranges_deny
    assert fe(state, NODE_INTERNAL, 30080).source_ranges is None            # the NodePort is not limited
    assert state.problems == [] and state.notes == []


def test_with_the_setting_off_the_ranges_are_said_once_to_be_not_enforced() -> None:
    state = run([ranged_service()], slices())
    assert fe(state, LB, 80).source_ranges is None
    note = the_note(state, "Service default/echo", "spec.loadBalancerSourceRanges", "not enforced",
                    "svcSourceRangeCheck is false")
    assert note.obj == "Service default/echo"


def test_the_beta_annotation_is_read_when_the_field_is_unset() -> None:
    svc = ranged_service([], {"service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24, 10.1.2.3/8"})
    state = run([svc], slices(), config=CHECK_ON)
    assert fe(state, LB, 80).source_ranges == (IPv4Network("203.0.113.0/24"), IPv4Network("10.0.0.0/8"))


def test_the_cilium_policy_annotation_makes_a_deny_list() -> None:
    svc = ranged_service(annotations={"service.cilium.io/src-ranges-policy": "deny"})
    assert fe(run([svc], slices(), config=CHECK_ON), LB, 80).source_ranges_deny
    svc["metadata"]["annotations"]["service.cilium.io/src-ranges-policy"] = "maybe"
    state = run([svc], slices(), config=CHECK_ON)
    assert not fe(state, LB, 80).source_ranges_deny
    the_problem(state, "src-ranges-policy", "expected allow or deny", "allow is used")


def test_externalips_are_limited_too_as_cilium_does() -> None:
    svc = service(externalIPs=["198.51.100.50"], loadBalancerSourceRanges=["203.0.113.0/24"])
    state = run([svc], slices(), config=CHECK_ON)
    assert fe(state, "198.51.100.50", 80).source_ranges == (IPv4Network("203.0.113.0/24"),)


def test_bad_and_ipv6_ranges_never_open_an_allow_list() -> None:
    state = run([ranged_service(["2001:db8::/32", "not-a-cidr"])], slices(), config=CHECK_ON)
    assert fe(state, LB, 80).source_ranges == ()                     # admits nobody, rather than everybody
    the_problem(state, "loadBalancerSourceRanges[1]", "expected a CIDR", "not-a-cidr")
    the_note(state, "loadBalancerSourceRanges[0]", "IPv6 is not supported")
    deny = run([ranged_service(["2001:db8::/32"], {"service.cilium.io/src-ranges-policy": "deny"})], slices(),
               config=CHECK_ON)
    assert fe(deny, LB, 80).source_ranges is None                    # an empty deny list refuses nobody


def test_the_cilium_type_annotation_hides_the_nodeport_of_a_ranged_service() -> None:
    svc = ranged_service(annotations={"service.cilium.io/type": "LoadBalancer"})
    state = run([svc], slices(), config=CHECK_ON)
    assert {f.kind for f in state.frontends.values()} == {FrontendKind.LOADBALANCER}
    svc["metadata"]["annotations"]["service.cilium.io/type"] = "NodePort"
    assert {f.kind for f in run([svc], slices()).frontends.values()} == {FrontendKind.NODEPORT}
    svc["metadata"]["annotations"]["service.cilium.io/type"] = "Bogus"
    bogus = run([svc], slices())
    assert len(bogus.frontends) == 3
    the_problem(bogus, "service.cilium.io/type", "expected one of ClusterIP, NodePort, LoadBalancer")


# -- headless and another proxy's objects ---------------------------------------------------------------------


def test_a_headless_labelled_service_gets_no_frontend_and_is_said_once() -> None:
    svc = lb_service()
    svc["metadata"]["labels"] = {"service.kubernetes.io/headless": ""}
    state = run([svc, service("other", ports=[{"name": "http", "port": 80, "nodePort": 30090}])],
                [*slices(), endpoint_slice("other", endpoints=two_pods())])
    assert {f.service for f in state.frontends.values()} == {"default/other"}
    the_note(state, "Service default/echo", "service.kubernetes.io/headless", "leaves this Service alone")


def test_headless_and_other_proxies_endpointslices_are_ignored() -> None:
    one = endpoint_slice(endpoints=[endpoint("10.0.1.1", NODE, "echo-1")], name="echo-a")
    other = endpoint_slice(endpoints=[endpoint("10.0.9.9", NODE, "echo-9")], name="echo-b")
    other["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    third = endpoint_slice(endpoints=[endpoint("10.0.8.8", NODE, "echo-8")], name="echo-c")
    third["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "foo"
    state = run([service()], [one, other, third])
    assert [b.name for b in fe(state, NODE_INTERNAL, 30080).backends] == ["echo-1"]
    assert state.problems == []


def test_a_selectorless_service_whose_only_slices_are_another_proxys_is_skipped() -> None:
    theirs = endpoint_slice(endpoints=two_pods())
    theirs["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = "foo"
    state = run([service(selector={})], [theirs])
    assert state.frontends == {}
    the_problem(state, "selector-less Service without EndpointSlices")


# -- healthCheckNodePort --------------------------------------------------------------------------------------


def test_health_check_node_port_counts_this_nodes_ready_endpoints() -> None:
    eps = [endpoint("10.0.1.1", NODE, "echo-1"), endpoint("10.0.1.2", NODE, "echo-2", ready=False),
           endpoint("10.0.1.3", NODE, "echo-3", ready=False, serving=True, terminating=True),
           endpoint("10.0.2.1", "node-b", "echo-4")]
    two_ports = endpoint_slice(endpoints=eps, ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                                     {"name": "udp", "port": 8081, "protocol": "UDP"}])
    svc = lb_service(externalTrafficPolicy="Local", healthCheckNodePort=32000)
    state = run([svc], [two_ports])
    assert state.health_checks == {32000: HealthCheck(32000, "default", "echo", 1)}
    assert run([svc], [two_ports], node_name="node-b",
               nodes=[{"metadata": {"name": "node-b"}, "status": {"addresses": [
                   {"type": "InternalIP", "address": "192.168.0.11"}]}}]).health_checks[32000].local_endpoints == 1
    assert run([svc], [endpoint_slice(endpoints=[endpoint("10.0.2.1", "node-b")])]
               ).health_checks[32000].local_endpoints == 0


def test_only_etp_local_loadbalancers_have_a_health_check_and_bad_ports_are_said() -> None:
    assert run([lb_service(healthCheckNodePort=32000)], slices()).health_checks == {}
    assert run([service(externalTrafficPolicy="Local", healthCheckNodePort=32000)], slices()).health_checks == {}
    bad = run([lb_service(externalTrafficPolicy="Local", healthCheckNodePort=80)], slices())
    assert bad.health_checks == {}
    the_problem(bad, "spec.healthCheckNodePort", "30000..32767", "not served")
    twice = run([lb_service("a", externalTrafficPolicy="Local", healthCheckNodePort=32000, ingress=["198.51.100.1"]),
                 lb_service("b", externalTrafficPolicy="Local", healthCheckNodePort=32000, ingress=["198.51.100.2"],
                            ports=[{"name": "http", "port": 80, "nodePort": 30081}])],
                [endpoint_slice("a", endpoints=two_pods()), endpoint_slice("b", endpoints=two_pods())])
    assert twice.health_checks[32000].name == "a"
    the_problem(twice, "Service default/b", "32000 is already served for Service default/a")


# -- fields bpflb does not act on ------------------------------------------------------------------------------


def test_every_field_bpflb_does_not_act_on_is_said_with_its_reason() -> None:
    svc = lb_service(loadBalancerClass="example.com/lb", trafficDistribution="PreferClose",
                     loadBalancerIP="198.51.100.9", internalTrafficPolicy="Local",
                     externalIPs=["2001:db8::1"])
    svc["status"]["loadBalancer"]["ingress"].append({"ip": "198.51.100.2", "ipMode": "Proxy"})
    svc["metadata"]["annotations"] = {"service.cilium.io/forwarding-mode": "dsr"}
    state = run([svc], slices())
    the_note(state, "spec.loadBalancerClass", "example.com/lb", "not acted on")
    the_note(state, "spec.trafficDistribution", "PreferClose", "not acted on")
    the_note(state, "spec.loadBalancerIP", "status.loadBalancer.ingress")
    assert not [n for n in state.notes if "internalTrafficPolicy" in str(n)]    # acted on (in-cluster paths)
    the_note(state, "spec.externalIPs[0]", "IPv6 is not supported")
    the_note(state, "status.loadBalancer.ingress[1].ipMode", "Proxy")
    the_note(state, "service.cilium.io/forwarding-mode", "bpflb honours only")
    assert fe(state, LB, 80) and state.problems == []          # the rest is served as usual


def test_an_ipv6_only_service_gets_no_frontend_and_is_said_once() -> None:
    state = run([lb_service(ipFamilies=["IPv6"], ingress=["2001:db8::5"])], slices())
    assert state.frontends == {}
    the_note(state, "spec.ipFamilies", "IPv6 only")
    dual = run([lb_service(ipFamilies=["IPv6", "IPv4"])], slices())
    assert fe(dual, LB, 80) and fe(dual, NODE_EXTERNAL, 30080)
