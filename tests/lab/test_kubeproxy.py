"""The benchmark's kube-proxy baselines really load-balance: the rule sets generated for the iptables and the
nftables mode, loaded into the lab's node namespaces (no bpflb agents), carry real connections the way
kube-proxy does: both pods answer, SNAT by masquerade, eTP Local, REJECT without endpoints. A baseline that
does not work would measure nothing."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bpflb_lab.kubeproxy import MODES
from bpflb_lab.kubeproxy import lab as kplab
from bpflb_lab.lab import Lab
from tests.lab.conftest import lab_running
from tests.lab.helpers import root_rules

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1, NODE2 = "198.18.0.11", "198.18.0.12"
LB_IP = "198.18.1.10"
EMPTY = ("kind: Service\nmetadata: {name: empty}\n"
         "spec: {type: NodePort, selector: {app: none}, ports: [{port: 80, nodePort: 30400}]}\n")


@dataclass
class KubeProxyLab:
    lab: Lab
    mode: str
    root_before: dict[str, str]
    installed: list[kplab.Installed]


@pytest.fixture(scope="module", params=MODES)
def kp(request: pytest.FixtureRequest, privileged: None) -> Iterator[KubeProxyLab]:
    """A lab without agents whose nodes run the generated kube-proxy rules of one mode."""
    before = root_rules()
    with lab_running(agents=False) as lab:
        lab.apply(EMPTY)
        yield KubeProxyLab(lab, request.param, before, kplab.install(lab, request.param))
    assert root_rules() == before, "the root namespace's rules changed"


def seen_ip(body: str | None) -> str | None:
    return body.rsplit(":", 1)[0] if body else None


def test_rules_are_loaded_in_the_node_namespaces_only(kp: KubeProxyLab) -> None:
    assert [i.node for i in kp.installed] == ["node1", "node2", "node3"]
    if kp.mode == "iptables":
        saved = kp.lab.exec("node1", ["iptables-save"], check=True).stdout
        assert "-A KUBE-SERVICES" in saved and "-j KUBE-NODEPORTS" in saved and "--probability" in saved
    else:
        listed = kp.lab.exec("node1", ["nft", "list", "table", "ip", "kube-proxy"], check=True).stdout
        assert "map service-nodeports" in listed and "numgen random mod 2 vmap" in listed
    assert root_rules() == kp.root_before


def test_the_kernel_holds_exactly_what_was_generated(kp: KubeProxyLab) -> None:
    """iptables: the generator writes rules the way iptables-save prints them (what one sees on a kube-proxy
    node), so iptables-save gives the file back line for line. nftables: every chain and verdict-map element
    generated is in the kernel's table."""
    text = kp.installed[0].text
    if kp.mode == "iptables":
        saved = "".join(kp.lab.exec("node1", ["iptables-save", "-t", table], check=True).stdout
                        for table in ("filter", "nat"))
        lines = [re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in saved.splitlines()   # policy counters
                 if not line.startswith("#")]
        assert lines == text.splitlines()
        return
    listed = kp.lab.exec("node1", ["nft", "list", "table", "ip", "kube-proxy"], check=True).stdout
    chains = re.findall(r"^add chain ip kube-proxy (\S+)", text, re.MULTILINE)
    assert len(chains) > 20 and all(f"\tchain {name} {{" in listed for name in chains)
    for element in re.findall(r" : goto (\S+?)[,}]", " ".join(l for l in text.splitlines() if "element" in l)):
        assert f": goto {element}" in listed


def test_node1_nodeport_reaches_both_pods_masqueraded(kp: KubeProxyLab) -> None:
    results = kp.lab.connections("client", NODE1, 30080, 60, request="/clientip", parallel=8)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:5]
    counts = Counter(r.pod for r in results)
    assert set(counts) == {"echo-a", "echo-b"} and min(counts.values()) >= 10, counts
    assert {seen_ip(r.replies[0]) for r in results} == {NODE1}      # masquerade to node1's address


def test_udp_nodeport_and_loadbalancer_ip(kp: KubeProxyLab) -> None:
    udp = kp.lab.connections("client", NODE1, 30081, 30, proto="UDP", request="clientip", parallel=8)
    assert all(r.ok for r in udp), [r.error for r in udp if not r.ok][:5]
    assert {seen_ip(r.replies[0]) for r in udp} == {NODE1}
    lb = kp.lab.connections("client", LB_IP, 80, 30, request="/clientip", parallel=8)
    assert all(r.ok for r in lb) and {r.pod for r in lb} == {"echo-a", "echo-b"}
    assert {seen_ip(r.replies[0]) for r in lb} == {NODE1}


def test_external_traffic_policy_local(kp: KubeProxyLab) -> None:
    body, err = kp.lab.http_get("client", f"http://{NODE1}:30180/clientip", timeout=0.5)
    assert body is None and err == "timeout"               # no local endpoint on node1: DROP
    results = kp.lab.connections("client", NODE2, 30180, 10, request="/clientip")
    assert {(r.pod, seen_ip(r.replies[0])) for r in results} == {("echo-a", CLIENT)}


def test_a_service_without_endpoints_is_rejected(kp: KubeProxyLab) -> None:
    """kube-proxy's REJECT, as it is on the wire: ICMP port unreachable from the node about the client's SYN
    (not a RST, which would refuse the connection too)."""
    from tests.lab.helpers import capture

    with capture(kp.lab, "client", f"icmp or (tcp and src host {NODE1} and src port 30400)") as wire:
        body, err = kp.lab.http_get("client", f"http://{NODE1}:30400/hostname")
    assert body is None and err == "connection refused"
    assert wire.port_unreachable(src=NODE1, dst=CLIENT, port=30400), wire.lines
    assert not wire.matching(src=NODE1, sport=30400), "no RST: the refusal is the ICMP error"
