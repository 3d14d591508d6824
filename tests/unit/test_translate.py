"""Unit tests of bpflb.model.translate: raw Kubernetes objects in, one node's DesiredState out."""

from __future__ import annotations

import copy
import random
from ipaddress import IPv4Address
from typing import Any

import pytest

from bpflb.model.translate import translate
from bpflb.model.types import (
    Algorithm,
    Backend,
    DesiredState,
    FrontendKind,
    Mode,
    Proto,
)
from bpflb.sources.base import Snapshot
from tests.unit.helpers import (
    NODE,
    NODE_EXTERNAL,
    NODE_INTERNAL,
    Obj,
    endpoint,
    endpoint_slice,
    fe,
    l4,
    lb_service,
    node,
    run,
    service,
    the_problem,
    two_pods,
)

# -- node addresses and settings ----------------------------------------------------------------------------


def test_node_addresses_internal_then_external_deduplicated_ipv4_only() -> None:
    extra = [{"type": "InternalIP", "address": NODE_INTERNAL}, {"type": "InternalIP", "address": "fd00::10"},
             {"type": "InternalDNS", "address": "node-a.local"},
             {"type": "ExternalIP", "address": "192.168.0.11"}]
    state = run([], nodes=[node("node-b", "192.168.0.99"), node(extra=extra)])
    assert state.node_addrs == tuple(map(IPv4Address, (NODE_INTERNAL, NODE_EXTERNAL, "192.168.0.11")))
    assert state.problems == []


def test_missing_node_gives_no_frontends_and_a_problem() -> None:
    state = run([service()], [endpoint_slice(endpoints=two_pods())], nodes=[node("node-b")])
    assert state.frontends == {}
    assert state.node_addrs == ()
    assert "Node node-a" in str(the_problem(state, "not found"))


def test_bad_node_address_is_a_problem_and_the_others_are_kept() -> None:
    state = run([], nodes=[node(extra=[{"type": "InternalIP", "address": "192.168.0.300"}])])
    assert state.node_addrs == (IPv4Address(NODE_INTERNAL), IPv4Address(NODE_EXTERNAL))
    the_problem(state, "Node node-a", "status.addresses[3].address", "not a valid IP address",
                "192.168.0.300")


def test_settings_default_and_parse() -> None:
    assert run([]).settings.mode == Mode.HYBRID          # Deckhouse's default, the one schema's
    assert run([]).settings.algorithm == Algorithm.RANDOM
    state = run([], config={"bpfLBMode": "Hybrid", "lbAlgorithm": "Maglev", "tunnelMode": "VXLAN"})
    assert (state.settings.mode, state.settings.algorithm) == (Mode.HYBRID, Algorithm.MAGLEV)
    assert state.problems == []


def test_invalid_settings_keep_defaults_with_problems() -> None:
    state = run([service()], [endpoint_slice(endpoints=two_pods())],
                config={"bpfLBMode": "dsr", "lbAlgorithm": "Ring"})
    assert state.settings.mode == Mode.HYBRID
    assert state.settings.algorithm == Algorithm.RANDOM
    mode = the_problem(state, "data.bpfLBMode")
    assert str(mode) == ('ConfigMap kube-system/bpflb-agent: data.bpfLBMode: '
                         'must be one of SNAT, DSR, Hybrid; got "dsr"')
    the_problem(state, "ConfigMap kube-system/bpflb-agent", "data.lbAlgorithm", "Random, Maglev", '"Ring"')
    assert len(state.frontends) == 2          # the services are still translated


def test_a_bad_setting_names_the_configmap_where_it_is() -> None:
    # bpflb installed in a namespace of its own reads its ConfigMap there, and a problem with it says so.
    snap = Snapshot(nodes=[node()], config={"bpfLBMode": "dsr"}, config_namespace="bpflb-system")
    the_problem(translate(snap, NODE), "ConfigMap bpflb-system/bpflb-agent", "data.bpfLBMode", "SNAT, DSR, Hybrid")
    default = translate(Snapshot(nodes=[node()], config={"bpfLBMode": "dsr"}), NODE)     # the file source's
    the_problem(default, "ConfigMap kube-system/bpflb-agent", "data.bpfLBMode")


# -- frontends ----------------------------------------------------------------------------------------------


def test_nodeport_on_every_node_address() -> None:
    state = run([service()], [endpoint_slice(endpoints=two_pods())])
    assert list(state.frontends) == [l4(NODE_INTERNAL, 30080), l4(NODE_EXTERNAL, 30080)]
    front = fe(state, NODE_INTERNAL, 30080)
    assert front.kind == FrontendKind.NODEPORT
    assert front.service == "default/echo"
    assert front.port_name == "http"
    assert not front.local_only and not front.no_endpoints
    assert front.algorithm == Algorithm.RANDOM
    assert front.affinity_timeout == 0
    assert front.backends == (
        Backend(l4("10.0.1.1", 8080), "echo-1", NODE, local=True),
        Backend(l4("10.0.2.1", 8080), "echo-2", "node-b", local=False),
    )
    assert fe(state, NODE_EXTERNAL, 30080).backends == front.backends
    assert state.problems == []


def test_loadbalancer_ingress_ip_and_nodeports() -> None:
    svc = lb_service(ingress=["198.51.100.1", "198.51.100.2"])
    svc["status"]["loadBalancer"]["ingress"].append({"hostname": "lb.example.com"})
    svc["status"]["loadBalancer"]["ingress"].append({"ip": "198.51.100.3", "ipMode": "Proxy"})
    state = run([svc], [endpoint_slice(endpoints=two_pods())])
    assert fe(state, "198.51.100.1", 80).kind == FrontendKind.LOADBALANCER
    assert fe(state, "198.51.100.2", 80).kind == FrontendKind.LOADBALANCER
    assert fe(state, NODE_INTERNAL, 30080).kind == FrontendKind.NODEPORT
    assert len(state.frontends) == 4
    assert state.problems == []


def test_loadbalancer_without_nodeports_or_ingress() -> None:
    svc = lb_service(ports=[{"port": 443}])
    del svc["status"]
    state = run([svc], [endpoint_slice(endpoints=two_pods(), ports=[{"port": 8443}])])
    assert state.frontends == {}
    assert state.problems == []


def test_external_ips_on_any_type_ipv6_ignored() -> None:
    svc = service(type_="ClusterIP", ports=[{"port": 53, "protocol": "UDP", "name": "dns"}],
                  externalIPs=["198.51.100.7", "2001:db8::7"])
    slice_ = endpoint_slice(endpoints=two_pods(), ports=[{"port": 5353, "protocol": "UDP", "name": "dns"}])
    state = run([svc], [slice_])
    assert list(state.frontends) == [l4("198.51.100.7", 53, Proto.UDP)]
    front = fe(state, "198.51.100.7", 53, Proto.UDP)
    assert front.kind == FrontendKind.EXTERNAL_IP
    assert [str(b.l4) for b in front.backends] == ["10.0.1.1:5353/UDP", "10.0.2.1:5353/UDP"]
    assert state.problems == []


def test_clusterip_only_headless_externalname_and_other_proxy_are_ignored() -> None:
    other_proxy = service("other")
    other_proxy["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "foo-proxy"}
    headless = service("headless", type_="ClusterIP", clusterIP="None", externalIPs=["198.51.100.9"])
    plain = service("plain", type_="ClusterIP", ports=[{"port": 80, "protocol": "SCTP"}])
    alias = service("alias", type_="ExternalName", externalName="example.com", externalIPs=["198.51.100.8"])
    state = run([other_proxy, headless, plain, alias], [endpoint_slice(s, two_pods()) for s in
                                                         ("other", "headless", "plain", "alias")])
    assert state.frontends == {}
    # A ClusterIP Service is bpflb's now (issue 13): its SCTP port is reported, not silently ignored.
    assert [(p.obj, p.field) for p in state.problems] == [("Service default/plain", "spec.ports[0].protocol")]


def test_nodeport_ignored_on_clusterip_with_external_ips() -> None:
    svc = service(type_="ClusterIP", externalIPs=["198.51.100.7"])
    state = run([svc], [endpoint_slice(endpoints=two_pods())])
    assert list(state.frontends) == [l4("198.51.100.7", 80)]


# -- backends -----------------------------------------------------------------------------------------------


def test_etp_local_with_local_backends() -> None:
    state = run([service(externalTrafficPolicy="Local")], [endpoint_slice(endpoints=two_pods())])
    front = fe(state, NODE_INTERNAL, 30080)
    assert front.local_only
    assert not front.no_endpoints
    assert [b.name for b in front.backends] == ["echo-1"]
    assert front.backends[0].local


def test_etp_local_without_local_backends_drops() -> None:
    remote = [endpoint("10.0.2.1", "node-b", "echo-2")]
    state = run([service(externalTrafficPolicy="Local")], [endpoint_slice(endpoints=remote)])
    front = fe(state, NODE_INTERNAL, 30080)
    assert front.backends == ()
    assert front.no_endpoints is False      # endpoints exist elsewhere: drop, do not reject


def test_etp_local_without_any_backend_rejects() -> None:
    state = run([service(externalTrafficPolicy="Local")], [endpoint_slice(endpoints=[])])
    assert fe(state, NODE_INTERNAL, 30080).no_endpoints is True


def test_etp_local_uses_local_terminating_when_remote_ones_are_ready() -> None:
    eps = [endpoint("10.0.1.1", NODE, "old", ready=False, serving=True, terminating=True),
           endpoint("10.0.2.1", "node-b", "new")]
    state = run([service(externalTrafficPolicy="Local")], [endpoint_slice(endpoints=eps)])
    front = fe(state, NODE_INTERNAL, 30080)
    assert [(b.name, b.terminating) for b in front.backends] == [("old", True)]


def test_no_endpoints_rejects() -> None:
    state = run([service()])                # a selector, no slice at all: not a problem
    assert fe(state, NODE_INTERNAL, 30080).no_endpoints is True
    assert fe(state, NODE_INTERNAL, 30080).backends == ()
    assert state.problems == []
    not_ready = [endpoint("10.0.1.1", ready=False), endpoint("10.0.1.2", ready=False, serving=True)]
    state = run([service()], [endpoint_slice(endpoints=not_ready)])
    assert fe(state, NODE_INTERNAL, 30080).no_endpoints is True


def test_terminating_fallback_only_when_nothing_is_ready() -> None:
    eps = [endpoint("10.0.1.1", NODE, "old", ready=False, serving=True, terminating=True),
           endpoint("10.0.1.2", NODE, "gone", ready=False, serving=False, terminating=True),
           endpoint("10.0.2.1", "node-b", "new")]
    front = fe(run([service()], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL, 30080)
    assert [b.name for b in front.backends] == ["new"]

    front = fe(run([service()], [endpoint_slice(endpoints=eps[:2])]), NODE_INTERNAL, 30080)
    assert [(b.name, b.terminating) for b in front.backends] == [("old", True)]
    assert not front.no_endpoints


def test_condition_defaults() -> None:
    # absent ready -> true; absent serving -> ready; absent terminating -> false
    eps = [{"addresses": ["10.0.1.1"]}, endpoint("10.0.1.2", ready=False, terminating=True)]
    front = fe(run([service()], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL, 30080)
    assert front.backends == (Backend(l4("10.0.1.1", 8080), "10.0.1.1", None, local=False),)


def test_named_and_unnamed_port_matching() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "nodePort": 30080},
                         {"name": "metrics", "port": 9090, "nodePort": 30090},
                         {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}])
    slice_ = endpoint_slice(endpoints=two_pods(), ports=[
        {"name": "metrics", "port": 9100, "protocol": "TCP"},
        {"name": "http", "port": 8080},                          # protocol defaults to TCP
        {"name": "dns", "port": 5353, "protocol": "TCP"},        # wrong protocol: no match
    ])
    state = run([svc], [slice_])
    assert {b.l4.port for b in fe(state, NODE_INTERNAL, 30080).backends} == {8080}
    assert {b.l4.port for b in fe(state, NODE_INTERNAL, 30090).backends} == {9100}
    assert fe(state, NODE_INTERNAL, 30053, Proto.UDP).no_endpoints

    unnamed = service(ports=[{"port": 80, "nodePort": 30080}])
    for slice_ports in ([{"port": 8080}], [{"name": "", "port": 8080, "protocol": "TCP"}]):
        state = run([unnamed], [endpoint_slice(endpoints=two_pods(), ports=slice_ports)])
        assert fe(state, NODE_INTERNAL, 30080).port_name == ""
        assert len(fe(state, NODE_INTERNAL, 30080).backends) == 2
    state = run([unnamed], [endpoint_slice(endpoints=two_pods(), ports=[{"name": "http", "port": 8080}])])
    assert fe(state, NODE_INTERNAL, 30080).no_endpoints


def test_backends_merged_and_deduplicated_across_slices() -> None:
    slices = [endpoint_slice(name="echo-1", endpoints=[endpoint("10.0.1.1", pod="echo-1", ready=False)]),
              endpoint_slice(name="echo-2", endpoints=[endpoint("10.0.1.1", pod="echo-1"),
                                                       endpoint("10.0.2.1", "node-b", "echo-2")]),
              endpoint_slice(name="other", service_name="other", endpoints=[endpoint("10.0.9.9")]),
              endpoint_slice(name="echo-elsewhere", namespace="prod", endpoints=[endpoint("10.0.8.8")])]
    front = fe(run([service()], slices), NODE_INTERNAL, 30080)
    assert [(str(b.l4), b.name) for b in front.backends] == [("10.0.1.1:8080/TCP", "echo-1"),
                                                             ("10.0.2.1:8080/TCP", "echo-2")]


def test_multiple_addresses_per_endpoint_and_name_fallback() -> None:
    ep = endpoint("10.0.1.2", NODE)
    ep["addresses"].append("10.0.1.1")
    front = fe(run([service()], [endpoint_slice(endpoints=[ep])]), NODE_INTERNAL, 30080)
    assert [b.name for b in front.backends] == ["10.0.1.1", "10.0.1.2"]


def test_ordering_is_stable_regardless_of_input_order() -> None:
    services = [service(f"svc-{i}", ports=[{"port": 80, "nodePort": 30000 + i}]) for i in range(20)]
    slices = []
    for i in range(20):
        eps = [endpoint(f"10.1.{i}.{j}", f"node-{j % 3}", f"svc-{i}-pod-{j}") for j in range(1, 9)]
        half = len(eps) // 2
        slices.append(endpoint_slice(f"svc-{i}", eps[:half], name=f"svc-{i}-x", ports=[{"port": 8080}]))
        slices.append(endpoint_slice(f"svc-{i}", eps[half:], name=f"svc-{i}-y", ports=[{"port": 8080}]))
    reference = run(services, slices)
    rng = random.Random(7)
    for _ in range(5):
        s2, e2 = copy.deepcopy(services), copy.deepcopy(slices)
        rng.shuffle(s2)
        rng.shuffle(e2)
        for sl in e2:
            rng.shuffle(sl["endpoints"])
        other = run(s2, e2)
        assert list(other.frontends) == list(reference.frontends)
        assert other.frontends == reference.frontends
    names = [b.name for b in fe(reference, NODE_INTERNAL, 30003).backends]
    assert names == sorted(names) and len(names) == 8
    assert list(reference.frontends) == sorted(reference.frontends)


# -- per-Service options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("maglev", Algorithm.MAGLEV), ("Maglev", Algorithm.MAGLEV),
                                                 ("RANDOM", Algorithm.RANDOM)])
def test_algorithm_annotation(value: str, expected: Algorithm) -> None:
    svc = service()
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": value}
    state = run([svc], config={"lbAlgorithm": "Maglev" if expected == Algorithm.RANDOM else "Random",
                               "extraLoadBalancerAlgorithmsEnabled": "true"})
    assert fe(state, NODE_INTERNAL, 30080).algorithm == expected
    assert state.problems == []


def test_algorithm_annotation_needs_extra_load_balancer_algorithms_enabled() -> None:
    svc = service()
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
    state = run([svc], config={"lbAlgorithm": "Random"})
    assert fe(state, NODE_INTERNAL, 30080).algorithm == Algorithm.RANDOM
    the_problem(state, "Service default/echo", 'metadata.annotations["service.cilium.io/lb-algorithm"]',
                "ignored: the module setting extraLoadBalancerAlgorithmsEnabled is false")


def test_algorithm_cluster_default_and_bad_annotation() -> None:
    state = run([service()], config={"lbAlgorithm": "Maglev"})
    assert fe(state, NODE_INTERNAL, 30080).algorithm == Algorithm.MAGLEV
    svc = service()
    svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "round-robin"}
    state = run([svc], config={"lbAlgorithm": "Maglev", "extraLoadBalancerAlgorithmsEnabled": "true"})
    assert fe(state, NODE_INTERNAL, 30080).algorithm == Algorithm.MAGLEV
    the_problem(state, "Service default/echo", 'metadata.annotations["service.cilium.io/lb-algorithm"]',
                "random or maglev", '"round-robin"')


def test_session_affinity() -> None:
    assert fe(run([service(sessionAffinity="ClientIP")]), NODE_INTERNAL, 30080).affinity_timeout == 10800
    svc = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert fe(run([svc]), NODE_INTERNAL, 30080).affinity_timeout == 60
    svc = service(sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert fe(run([svc]), NODE_INTERNAL, 30080).affinity_timeout == 0


def test_duplicate_frontend_first_namespace_name_wins() -> None:
    zeta = service("zeta", externalIPs=["198.51.100.5"])
    alpha = service("alpha", type_="ClusterIP", externalIPs=["198.51.100.5"])
    slices = [endpoint_slice("zeta", two_pods()), endpoint_slice("alpha", [endpoint("10.0.3.3")])]
    for order in ([zeta, alpha], [alpha, zeta]):
        state = run(order, slices)
        assert fe(state, "198.51.100.5", 80).service == "default/alpha"
        assert fe(state, NODE_INTERNAL, 30080).service == "default/zeta"
        problem = the_problem(state, "already used")
        assert str(problem) == ("Service default/zeta: spec.externalIPs[0]: frontend 198.51.100.5:80/TCP is "
                                "already used by Service default/alpha; skipped")


def test_same_address_in_external_ips_and_ingress_is_not_a_problem() -> None:
    svc = lb_service(ingress=["198.51.100.1"], externalIPs=["198.51.100.1", "198.51.100.1"])
    state = run([svc], [endpoint_slice(endpoints=two_pods())])
    assert fe(state, "198.51.100.1", 80).kind == FrontendKind.LOADBALANCER
    assert state.problems == []


# -- bad input ----------------------------------------------------------------------------------------------


def good() -> Obj:
    return service("good", ports=[{"port": 80, "nodePort": 31000}])


def good_slice() -> Obj:
    return endpoint_slice("good", two_pods(), ports=[{"port": 8080}])


def assert_good_still_works(state: DesiredState) -> None:
    front = fe(state, NODE_INTERNAL, 31000)
    assert front.service == "default/good" and len(front.backends) == 2


@pytest.mark.parametrize(("port", "field", "reason"), [
    ({"name": "b", "port": 81, "protocol": "SCTP", "nodePort": 30081}, "spec.ports[1].protocol",
     "SCTP is not supported; expected TCP or UDP"),
    ({"name": "b", "port": 81, "protocol": "tcp", "nodePort": 30081}, "spec.ports[1].protocol",
     'expected TCP or UDP; got "tcp"'),
    ({"name": "b", "port": 70000, "nodePort": 30081}, "spec.ports[1].port",
     "must be an integer in 1..65535; got 70000"),
    ({"name": "b", "port": 0, "nodePort": 30081}, "spec.ports[1].port", "1..65535; got 0"),
    ({"name": "b", "port": "81", "nodePort": 30081}, "spec.ports[1].port", 'got "81" (a string)'),
    ({"name": "b", "port": True, "nodePort": 30081}, "spec.ports[1].port", "got true (a boolean)"),
    ({"name": "b", "nodePort": 30081}, "spec.ports[1].port", "got null"),
    ({"name": "b", "port": 81, "nodePort": 8080}, "spec.ports[1].nodePort",
     "must be an integer in 30000..32767; got 8080"),
    ({"name": "b", "port": 81, "nodePort": 32768}, "spec.ports[1].nodePort", "30000..32767; got 32768"),
    ({"name": 7, "port": 81, "nodePort": 30081}, "spec.ports[1].name", "must be a string; got 7"),
    ("81", "spec.ports[1]", 'must be a mapping; got "81"'),
    ({"name": "a", "port": 81, "nodePort": 30081}, "spec.ports[1].name", "duplicates spec.ports[0]"),
])
def test_bad_service_port_skips_only_that_port(port: Any, field: str, reason: str) -> None:
    svc = service("echo", ports=[{"name": "a", "port": 80, "nodePort": 30080}, port])
    state = run([svc, good()], [endpoint_slice(endpoints=two_pods(), ports=[{"name": "a", "port": 8080}]),
                                good_slice()])
    problem = the_problem(state, "Service default/echo")
    assert problem.obj == "Service default/echo"
    assert problem.field == field
    assert reason in problem.reason
    assert str(problem).startswith(f"Service default/echo: {field}: ")
    assert fe(state, NODE_INTERNAL, 30080).service == "default/echo"   # the good port of the same Service
    assert l4(NODE_INTERNAL, 30081) not in state.frontends
    assert_good_still_works(state)


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"type": "Weird"}, "spec.type",
     'expected one of ClusterIP, NodePort, LoadBalancer, ExternalName; got "Weird"'),
    ({"externalTrafficPolicy": "local"}, "spec.externalTrafficPolicy",
     'expected Cluster or Local; got "local"'),
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity", 'expected None or ClientIP; got "Cookie"'),
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "must be an integer in 1..86400; got 0"),
    ({"ports": []}, "spec.ports", "empty; expected at least one port"),
    ({"ports": {"port": 80}}, "spec.ports", "must be a list"),
    ({"externalIPs": "198.51.100.1"}, "spec.externalIPs", 'must be a list; got "198.51.100.1" (a string)'),
    ({"selector": ["app"]}, "spec.selector", "must be a mapping"),
])
def test_bad_service_field_skips_that_service(spec: Obj, field: str, reason: str) -> None:
    svc = service("echo")
    svc["spec"].update(spec)
    state = run([svc, good()], [endpoint_slice(endpoints=two_pods()), good_slice()])
    problem = the_problem(state, "Service default/echo")
    assert (problem.field, reason in problem.reason) == (field, True), str(problem)
    assert not any(f.service == "default/echo" for f in state.frontends.values())
    assert_good_still_works(state)


def test_malformed_frontend_ips_skip_only_that_ip() -> None:
    svc = lb_service(ingress=["198.51.100.1", "not-an-ip"], externalIPs=["198.51.100.2", "198.51.100.256",
                                                                         "127.0.0.1", 42])
    state = run([svc, good()], [endpoint_slice(endpoints=two_pods()), good_slice()])
    the_problem(state, "Service default/echo", "status.loadBalancer.ingress[1].ip", "not a valid IP address",
                '"not-an-ip"')
    the_problem(state, "Service default/echo", "spec.externalIPs[1]", "not a valid IP address",
                "198.51.100.256")
    the_problem(state, "Service default/echo", "spec.externalIPs[2]",
                "127.0.0.1 cannot be used as a frontend")
    the_problem(state, "Service default/echo", "spec.externalIPs[3]", "must be an IP address string; got 42")
    assert fe(state, "198.51.100.1", 80).kind == FrontendKind.LOADBALANCER
    assert fe(state, "198.51.100.2", 80).kind == FrontendKind.EXTERNAL_IP
    assert fe(state, NODE_INTERNAL, 30080).service == "default/echo"
    assert len(state.problems) == 4
    assert_good_still_works(state)


def test_missing_name_skips_the_object() -> None:
    nameless = service()
    del nameless["metadata"]["name"]
    state = run([nameless, "not an object", good()], [good_slice()])   # type: ignore[list-item]
    problem = the_problem(state, "metadata.name")
    assert problem.obj.startswith("Service default/") and "missing" in problem.reason
    the_problem(state, "Service #1", "must be a mapping")
    assert_good_still_works(state)
    assert len(state.frontends) == 2


def test_selectorless_service() -> None:
    manual = service("manual", selector={}, ports=[{"port": 80, "nodePort": 30080}])
    state = run([manual, good()], [good_slice()])
    assert str(the_problem(state, "Service default/manual")) == (
        "Service default/manual: spec.selector: "
        "selector-less Service without EndpointSlices; the Service is skipped")
    assert l4(NODE_INTERNAL, 30080) not in state.frontends
    assert_good_still_works(state)

    # with a hand-made EndpointSlice it works
    state = run([manual], [endpoint_slice("manual", two_pods(), ports=[{"port": 8080}])])
    assert len(fe(state, NODE_INTERNAL, 30080).backends) == 2
    assert state.problems == []


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda s: s["metadata"]["labels"].clear(), 'metadata.labels["kubernetes.io/service-name"]', "missing"),
    (lambda s: s.update(addressType="FQDN"), "addressType", 'expected IPv4; got "FQDN"'),
    (lambda s: s["endpoints"][0].update(addresses=["10.0.1.999"]), "endpoints[0].addresses[0]",
     'not a valid IP address; got "10.0.1.999"'),
    (lambda s: s["endpoints"][0].update(addresses=["fd00::1"]), "endpoints[0].addresses[0]",
     "an IPv6 address in an IPv4 EndpointSlice"),
    (lambda s: s["endpoints"][0].update(addresses=[]), "endpoints[0].addresses", "empty"),
    (lambda s: s["endpoints"][0]["conditions"].update(ready="yes"), "endpoints[0].conditions.ready",
     'must be true or false; got "yes"'),
    (lambda s: s["endpoints"][0].update(nodeName=5), "endpoints[0].nodeName", "must be a string; got 5"),
    (lambda s: s["ports"].append({"name": "x", "port": 0}), "ports[1].port",
     "must be an integer in 1..65535; got 0"),
    (lambda s: s["ports"].append({"name": "x", "port": 70000}), "ports[1].port", "1..65535; got 70000"),
    (lambda s: s["ports"].append({"name": "x", "port": 80, "protocol": "ICMP"}), "ports[1].protocol",
     'expected TCP or UDP; got "ICMP"'),
    (lambda s: s.update(endpoints={"a": 1}), "endpoints", "must be a list"),
])
def test_bad_endpointslice_is_a_problem(mutate: Any, field: str, reason: str) -> None:
    slice_ = endpoint_slice(endpoints=[endpoint("10.0.1.1", pod="bad"), endpoint("10.0.1.2", pod="fine")])
    mutate(slice_)
    state = run([service(), good()], [slice_, good_slice()])
    problem = the_problem(state, "EndpointSlice default/echo-abc")
    assert problem.field == field, str(problem)
    assert reason in problem.reason, str(problem)
    assert_good_still_works(state)
    assert l4(NODE_INTERNAL, 30080) in state.frontends


def test_ipv6_endpointslice_is_ignored_silently() -> None:
    slices = [endpoint_slice(endpoints=two_pods()),
              endpoint_slice(name="echo-v6", address_type="IPv6", endpoints=[endpoint("fd00::1")])]
    state = run([service()], slices)
    assert len(fe(state, NODE_INTERNAL, 30080).backends) == 2
    assert state.problems == []


def test_type_errors_never_raise() -> None:
    weird: list[Any] = [
        {"metadata": "x"}, {"metadata": {"name": "a", "labels": "x"}}, {"metadata": {"name": "b"}, "spec": 5},
        {"metadata": {"name": "c"}, "spec": {"type": 5}},
        {"metadata": {"name": "d"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 1}]}, "status": []},
        {"metadata": {"name": "e"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 1}]},
         "status": {"loadBalancer": {"ingress": ["1.2.3.4"]}}},
        None, [], {"metadata": {"name": "f", "annotations": {"service.cilium.io/lb-algorithm": 3}},
                   "spec": {"type": "NodePort", "ports": [None, {"port": 1, "nodePort": "x"}]}},
    ]
    weird_slices: list[Any] = [None, {
        "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "f"}}, "addressType": "IPv4",
        "ports": [5], "endpoints": [None, {"addresses": [None]}, {"conditions": []}, {"targetRef": "p"}]}]
    weird_nodes: list[Any] = [
        None, {"metadata": {"name": NODE}, "status": {"addresses": [None, {"type": "InternalIP"}]}}]
    state = translate(Snapshot(services=weird, endpointslices=weird_slices, nodes=weird_nodes,
                               config={"bpfLBMode": 5}), NODE)  # type: ignore[dict-item]
    assert state.frontends == {}
    assert len(state.problems) >= 15
    for problem in state.problems:
        assert problem.obj and problem.field and problem.reason


def test_duplicate_service_objects() -> None:
    first = service()
    second = service(ports=[{"port": 80, "nodePort": 30099}])
    state = run([first, second], [endpoint_slice(endpoints=two_pods())])
    the_problem(state, "Service default/echo", "duplicate")
    assert l4(NODE_INTERNAL, 30080) in state.frontends


def test_large_cluster_sanity() -> None:
    services, slices = [], []
    for i in range(2000):
        name = f"svc-{i}"
        services.append(service(name, ports=[{"name": "http", "port": 80, "nodePort": 30000 + i}],
                                externalIPs=[f"198.18.{i // 250}.{i % 250 + 1}"]))
        eps = [endpoint(f"10.{i // 250}.{i % 250}.{j + 1}", f"node-{j % 4}", f"{name}-{j}")
               for j in range(10)]
        slices.append(endpoint_slice(name, eps, name=f"{name}-x"))
    state = run(services, slices, nodes=[node("node-1", "192.168.0.11", None)], node_name="node-1")
    assert state.problems == []
    assert len(state.frontends) == 4000
    front = fe(state, "192.168.0.11", 31999)
    assert len(front.backends) == 10
    assert sum(b.local for b in front.backends) == 3
