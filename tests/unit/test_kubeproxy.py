"""kube-proxy rule generation (bpflb_lab.kubeproxy), without privileges: chain names as kube-proxy hashes them,
the layout of the iptables and nftables rule sets, the counts that grow with the number of Services, and the
statistic probabilities that make every endpoint equally likely. That the rule sets really balance traffic is
tests/lab/test_kubeproxy.py's job."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from bpflb.sources.base import Snapshot
from bpflb_lab.kubeproxy import iptables, nftables
from bpflb_lab.kubeproxy.model import Endpoint, ServicePort, node_view

KubeObject = dict[str, Any]


def node(name: str, ip: str, cidr: str) -> KubeObject:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def service(name: str, *, kind: str = "NodePort", node_port: int | None = 30080, policy: str = "Cluster",
            cluster_ip: str | None = None, protocol: str = "TCP", port_name: str = "http",
            lb_ip: str | None = None, external_ips: list[str] | None = None, **spec: Any) -> KubeObject:
    port: KubeObject = {"name": port_name, "protocol": protocol, "port": 80, "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    body: KubeObject = {"type": kind, "ports": [port], "selector": {"app": name}, **spec}
    if kind != "ClusterIP":
        body["externalTrafficPolicy"] = policy
    if cluster_ip:
        body["clusterIP"] = cluster_ip
    if external_ips:
        body["externalIPs"] = external_ips
    svc: KubeObject = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                       "spec": body}
    if lb_ip:
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return svc


def endpoints(service_name: str, eps: list[tuple[str, str]], *, protocol: str = "TCP", port_name: str = "http",
              **conditions: bool) -> KubeObject:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service_name}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "ports": [{"name": port_name, "protocol": protocol, "port": 8080}],
            "endpoints": [{"addresses": [ip], "nodeName": where, "conditions": {"ready": True, **conditions}}
                          for ip, where in eps]}


NODES = [node("node1", "198.18.0.11", "10.244.1.0/24"), node("node2", "198.18.0.12", "10.244.2.0/24")]
TWO_PODS = [("10.244.2.10", "node2"), ("10.244.3.10", "node3")]


def snapshot(*objs: KubeObject) -> Snapshot:
    snap = Snapshot(nodes=list(NODES))
    for obj in objs:
        (snap.services if obj["kind"] == "Service" else snap.endpointslices).append(obj)
    return snap


def chains(text: str) -> dict[str, list[str]]:
    """iptables-restore text -> {chain: its rules} per table-qualified chain ("nat:KUBE-SERVICES")."""
    out: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.setdefault(f"{table}:{line[1:].split()[0]}", [])
        elif line.startswith("-A "):
            out.setdefault(f"{table}:{line.split()[1]}", []).append(line)
    return out


# ------------------------------------------------------------------------------------------ names

def test_chain_names_are_kube_proxys() -> None:
    """The names kube-proxy's own proxier tests expect for ns1/svc1:p80/TCP and endpoint 10.180.0.1:80."""
    sp = ServicePort("ns1", "svc1", "p80", "tcp", "172.30.0.41", 80)
    ep = Endpoint("10.180.0.1", 80)
    assert iptables.svc_chain(sp) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert iptables.ext_chain(sp) == "KUBE-EXT-XPGD46QRK7WJZT7O"
    assert iptables.svl_chain(sp) == "KUBE-SVL-XPGD46QRK7WJZT7O"
    assert iptables.sep_chain(sp, ep) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert nftables.service_chain(sp) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert nftables.external_chain(sp) == "external-ULMVA6XW-ns1/svc1/tcp/p80"
    assert nftables.endpoint_chain(sp, ep) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


# ------------------------------------------------------------------------------------------ iptables

def test_nodeport_service_layout() -> None:
    snap = snapshot(service("echo", cluster_ip="10.96.0.10"), endpoints("echo", TWO_PODS))
    view = node_view(snap, "node1")
    [sp] = view.service_ports
    text = iptables.render(view).text
    c = chains(text)
    svc, ext = iptables.svc_chain(sp), iptables.ext_chain(sp)
    assert c["nat:PREROUTING"] == ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    assert c["nat:KUBE-SERVICES"] == [
        (f'-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/echo:http cluster IP" '
        f"-m tcp --dport 80 -j {svc}"),
        ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')]
    assert c["nat:KUBE-NODEPORTS"] == [
        f'-A KUBE-NODEPORTS -p tcp -m comment --comment "default/echo:http" -m tcp --dport 30080 -j {ext}']
    assert c[f"nat:{ext}"] == [
        (f'-A {ext} -m comment --comment "masquerade traffic for default/echo:http external destinations" '
        "-j KUBE-MARK-MASQ"), f"-A {ext} -j {svc}"]
    assert c[f"nat:{svc}"][0] == (f'-A {svc} ! -s 10.244.1.0/24 -d 10.96.0.10/32 -p tcp -m comment --comment '
                                   f'"default/echo:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ')
    seps = [iptables.sep_chain(sp, Endpoint(ip, 8080)) for ip, _ in TWO_PODS]
    assert c[f"nat:{svc}"][1:] == [
        (f'-A {svc} -m comment --comment "default/echo:http -> 10.244.2.10:8080" -m statistic --mode random '
        f"--probability 0.50000000000 -j {seps[0]}"),
        f'-A {svc} -m comment --comment "default/echo:http -> 10.244.3.10:8080" -j {seps[1]}']
    assert c[f"nat:{seps[0]}"] == [
        f'-A {seps[0]} -s 10.244.2.10/32 -m comment --comment "default/echo:http" -j KUBE-MARK-MASQ',
        (f'-A {seps[0]} -p tcp -m comment --comment "default/echo:http" -m tcp -j DNAT --to-destination '
        "10.244.2.10:8080")]
    assert c["nat:KUBE-POSTROUTING"][-1].endswith("-j MASQUERADE --random-fully")
    assert c["nat:KUBE-MARK-MASQ"] == ["-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    assert not c["filter:KUBE-SERVICES"] and not c["filter:KUBE-EXTERNAL-SERVICES"]


def test_every_jump_target_is_declared_and_every_table_commits() -> None:
    snap = snapshot(service("a", lb_ip="198.18.1.10", kind="LoadBalancer", node_port=30001),
                    endpoints("a", TWO_PODS), service("b", policy="Local", node_port=30002),
                    endpoints("b", TWO_PODS), service("c", node_port=30003))
    text = iptables.render(node_view(snap, "node2")).text
    declared = {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}
    targets = set(re.findall(r"-j (KUBE-[A-Z0-9-]+)", text))
    assert targets <= declared
    assert text.count("COMMIT") == 2 and text.startswith("*filter") and "\n*nat\n" in text


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_statistic_probabilities_make_every_endpoint_equally_likely(n: int) -> None:
    pods = [(f"10.244.2.{10 + i}", "node2") for i in range(n)]
    view = node_view(snapshot(service("echo"), endpoints("echo", pods)), "node1")
    [sp] = view.service_ports
    rules = [r for r in chains(iptables.render(view).text)[f"nat:{iptables.svc_chain(sp)}"] if "KUBE-SEP" in r]
    assert len(rules) == n and "statistic" not in rules[-1]
    left, chances = 1.0, []
    for rule in rules:
        m = re.search(r"--probability ([0-9.]+)", rule)
        p = float(m.group(1)) if m else 1.0
        chances.append(left * p)
        left *= 1 - p
    assert all(math.isclose(c, 1 / n, rel_tol=1e-9) for c in chances), chances


def test_counts_grow_with_the_number_of_services() -> None:
    objs: list[KubeObject] = []
    for i in range(100):
        objs += [service(f"s{i}", node_port=30000 + i), endpoints(f"s{i}", TWO_PODS)]
    ipt = iptables.render(node_view(snapshot(*objs), "node1"))
    c = chains(ipt.text)
    assert len(c["nat:KUBE-SERVICES"]) == 101              # one clusterIP rule each, then the NodePort jump
    assert len(c["nat:KUBE-NODEPORTS"]) == 100
    assert len([k for k in c if k.startswith("nat:KUBE-SVC-")]) == 100
    assert len([k for k in c if k.startswith("nat:KUBE-EXT-")]) == 100
    assert len([k for k in c if k.startswith("nat:KUBE-SEP-")]) == 200
    assert ipt.nat_chains == 4 + 400
    nft = nftables.render(node_view(snapshot(*objs), "node1"))
    assert (nft.service_ips, nft.service_nodeports, nft.no_endpoint) == (100, 100, 0)
    assert nft.text.count("numgen random mod 2 vmap") == 100


def test_no_endpoints_reject_in_the_filter_table() -> None:
    view = node_view(snapshot(service("empty", cluster_ip="10.96.0.20", node_port=30400,
                                      external_ips=["198.18.1.50"])), "node1")
    c = chains(iptables.render(view).text)
    assert c["filter:KUBE-SERVICES"] == [
        ('-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/empty:http has no endpoints" '
        "-m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable")]
    assert c["filter:KUBE-EXTERNAL-SERVICES"] == [
        ('-A KUBE-EXTERNAL-SERVICES -d 198.18.1.50/32 -p tcp -m comment --comment "default/empty:http has no '
        'endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable'),
        ('-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/empty:http has no endpoints" '
        "-m addrtype --dst-type LOCAL -m tcp --dport 30400 -j REJECT --reject-with icmp-port-unreachable")]
    assert not [k for k in c if "KUBE-SVC-" in k or "KUBE-EXT-" in k or "KUBE-SEP-" in k]
    assert len(c["nat:KUBE-SERVICES"]) == 1 and not c["nat:KUBE-NODEPORTS"]
    nft = nftables.render(view).text
    assert 'add element ip kube-proxy no-endpoint-services { 10.96.0.20 . tcp . 80 comment ' \
           '"default/empty:http" : goto reject-chain, 198.18.1.50 . tcp . 80 comment "default/empty:http" : ' \
           'goto reject-chain }' in nft
    assert 'no-endpoint-nodeports { tcp . 30400 comment "default/empty:http" : goto reject-chain }' in nft


def test_external_traffic_policy_local() -> None:
    snap = snapshot(service("loc", policy="Local", node_port=30180, healthCheckNodePort=32000),
                    endpoints("loc", TWO_PODS))
    # node1 has no local endpoint: the EXT chain only short-circuits pod and host traffic, the filter table drops.
    v1 = node_view(snap, "node1")
    [sp] = v1.service_ports
    c1 = chains(iptables.render(v1).text)
    ext, svl = iptables.ext_chain(sp), iptables.svl_chain(sp)
    assert [r.split(" -j ")[-1] for r in c1[f"nat:{ext}"]] == [iptables.svc_chain(sp), "KUBE-MARK-MASQ",
                                                               iptables.svc_chain(sp)]
    assert f"nat:{svl}" not in c1
    assert c1["filter:KUBE-EXTERNAL-SERVICES"] == [
        ('-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/loc:http has no local endpoints" '
        "-m addrtype --dst-type LOCAL -m tcp --dport 30180 -j DROP")]
    assert c1["filter:KUBE-NODEPORTS"] == [
        ('-A KUBE-NODEPORTS -p tcp -m comment --comment "default/loc:http health check node port" -m tcp '
        "--dport 32000 -j ACCEPT")]
    # node2 has echo at 10.244.2.10: the SVL chain holds only it, and external traffic ends there.
    v2 = node_view(snap, "node2")
    c2 = chains(iptables.render(v2).text)
    assert c2[f"nat:{ext}"][-1] == f"-A {ext} -j {svl}"
    assert [r.split(" -j ")[-1] for r in c2[f"nat:{svl}"]] == [iptables.sep_chain(sp, Endpoint("10.244.2.10", 8080))]
    assert not c2["filter:KUBE-EXTERNAL-SERVICES"]
    nft1, nft2 = nftables.render(v1).text, nftables.render(v2).text
    assert 'tcp . 30180 comment "default/loc:http" : drop' in nft1
    assert f"add rule ip kube-proxy {nftables.external_chain(sp)} goto {nftables.local_chain(sp)}" in nft2
    assert f"add rule ip kube-proxy {nftables.local_chain(sp)} numgen random mod 1 vmap" in nft2


def test_loadbalancer_and_external_ips_go_to_the_ext_chain() -> None:
    snap = snapshot(service("lb", kind="LoadBalancer", lb_ip="198.18.1.10", external_ips=["198.18.1.60"],
                            node_port=30280), endpoints("lb", TWO_PODS))
    view = node_view(snap, "node1")
    [sp] = view.service_ports
    rules = chains(iptables.render(view).text)["nat:KUBE-SERVICES"]
    ext = iptables.ext_chain(sp)
    assert f'-A KUBE-SERVICES -d 198.18.1.60/32 -p tcp -m comment --comment "default/lb:http external IP" ' \
           f"-m tcp --dport 80 -j {ext}" in rules
    assert f'-A KUBE-SERVICES -d 198.18.1.10/32 -p tcp -m comment --comment "default/lb:http loadbalancer IP" ' \
           f"-m tcp --dport 80 -j {ext}" in rules
    nft = nftables.render(view).text
    assert f"198.18.1.10 . tcp . 80 : goto {nftables.external_chain(sp)}" in nft
    assert f"tcp . 30280 : goto {nftables.external_chain(sp)}" in nft


def test_endpoint_selection_follows_kube_proxy() -> None:
    # No ready endpoint: the serving terminating ones are used; not-serving ones never.
    snap = snapshot(service("t"), endpoints("t", TWO_PODS, ready=False, serving=True, terminating=True),
                    service("u", node_port=30001), endpoints("u", TWO_PODS, ready=False, serving=False))
    by = {sp.name: sp.categorize() for sp in node_view(snap, "node1").service_ports}
    assert [str(e) for e in by["t"].cluster] == ["10.244.2.10:8080", "10.244.3.10:8080"] and by["t"].has_endpoints
    assert not by["u"].cluster and not by["u"].has_endpoints


def test_skipped_services_and_derived_cluster_ips() -> None:
    headless = service("headless", kind="ClusterIP", node_port=None, cluster_ip="None")
    external_name = {"kind": "Service", "metadata": {"name": "ext"}, "spec": {"type": "ExternalName",
                                                                              "externalName": "example.com"}}
    other_proxy = service("other", node_port=30002)
    other_proxy["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "foo"}
    ipv6 = endpoints("v6", [("fd00::1", "node2")])
    ipv6["addressType"] = "IPv6"
    objs = [headless, external_name, other_proxy, service("v6", node_port=30003), ipv6]
    objs += [service(f"s{i}", node_port=None, kind="ClusterIP") for i in range(300)]
    view = node_view(snapshot(*objs), "node1")
    names = {sp.name for sp in view.service_ports}
    assert not names & {"headless", "ext", "other"}
    v6 = next(sp for sp in view.service_ports if sp.name == "v6")
    assert not v6.endpoints and not v6.categorize().has_endpoints
    ips = [sp.cluster_ip for sp in view.service_ports]
    assert len(set(ips)) == len(ips) and all(ip.startswith("10.") for ip in ips)
    assert ips == [sp.cluster_ip for sp in node_view(snapshot(*reversed(objs)), "node1").service_ports]


def test_output_does_not_depend_on_input_order() -> None:
    objs: list[KubeObject] = []
    for i in range(20):
        objs += [service(f"s{i}", node_port=30000 + i, cluster_ip=f"10.96.1.{i + 1}"), endpoints(f"s{i}", TWO_PODS)]
    a, b = node_view(snapshot(*objs), "node1"), node_view(snapshot(*reversed(objs)), "node1")
    assert iptables.render(a).text == iptables.render(b).text
    assert nftables.render(a).text == nftables.render(b).text


# ------------------------------------------------------------------------------------------ nftables

def test_nftables_layout() -> None:
    snap = snapshot(service("echo", cluster_ip="10.96.0.10"), endpoints("echo", TWO_PODS),
                    service("udp", cluster_ip="10.96.0.11", protocol="UDP", port_name="", node_port=30081),
                    endpoints("udp", TWO_PODS, protocol="UDP", port_name=""))
    view = node_view(snap, "node1")
    sp = next(s for s in view.service_ports if s.name == "echo")
    udp = next(s for s in view.service_ports if s.name == "udp")
    text = nftables.render(view).text
    lines = text.splitlines()
    assert lines[:3] == ['add table ip kube-proxy { comment "rules for kube-proxy" ; }', "delete table ip kube-proxy",
                         'add table ip kube-proxy { comment "rules for kube-proxy" ; }']
    svc, ext = nftables.service_chain(sp), nftables.external_chain(sp)
    eps = [nftables.endpoint_chain(sp, Endpoint(ip, 8080)) for ip, _ in TWO_PODS]
    assert "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }" in lines
    assert "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips" in lines
    assert ("add rule ip kube-proxy services ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport "
            "vmap @service-nodeports") in lines
    assert (f"add rule ip kube-proxy {svc} ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.1.0/24 "
            "jump mark-for-masquerade") in lines
    assert f"add rule ip kube-proxy {svc} numgen random mod 2 vmap {{ 0 : goto {eps[0]}, 1 : goto {eps[1]} }}" in lines
    assert f"add rule ip kube-proxy {eps[0]} ip saddr 10.244.2.10 jump mark-for-masquerade" in lines
    assert f"add rule ip kube-proxy {eps[0]} meta l4proto tcp dnat to 10.244.2.10:8080" in lines
    assert f'add rule ip kube-proxy {ext} jump mark-for-masquerade comment "masquerade"' in lines
    assert f"add rule ip kube-proxy {ext} goto {svc}" in lines
    assert "add rule ip kube-proxy masquerading masquerade fully-random" in lines
    assert nftables.service_chain(udp).endswith("-default/udp/udp/")            # an unnamed port, as kube-proxy
    assert f"udp . 30081 : goto {nftables.external_chain(udp)}" in text
    declared = {m for m in re.findall(r"^add chain ip kube-proxy (\S+)", text, re.MULTILINE)}
    assert set(re.findall(r"(?:goto|jump) ([a-z][^\s,}]*)", text)) <= declared


def test_nftables_session_affinity_sets() -> None:
    view = node_view(snapshot(service("aff", sessionAffinity="ClientIP",
                                      sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
                              endpoints("aff", TWO_PODS)), "node1")
    [sp] = view.service_ports
    text = nftables.render(view).text
    ep = Endpoint("10.244.2.10", 8080)
    assert f"add set ip kube-proxy {nftables.affinity_set(sp, ep)} {{ type ipv4_addr ; flags dynamic,timeout ; " \
           "timeout 600s ; }" in text
    assert f"ip saddr @{nftables.affinity_set(sp, ep)} goto {nftables.endpoint_chain(sp, ep)}" in text
    assert f"update @{nftables.affinity_set(sp, ep)} {{ ip saddr }}" in text
    ipt = iptables.render(view).text
    assert "-m recent --rcheck --seconds 600 --reap --name " + iptables.sep_chain(sp, ep) in ipt
