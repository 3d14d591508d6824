"""Translation down to the kernel: Kubernetes objects → translate() → LBMaps.sync() → the loaded object's
maps, checked entry by entry; syncs are diffs (nothing rewritten that did not change, live flows kept),
bad objects leave everything else programmed, and a restart on pinned maps recovers its ids."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.loader import load_lb
from bpflb.inspect import collect, collect_maps
from bpflb.model.translate import translate
from bpflb.model.types import Mode
from bpflb.sources.base import Snapshot
from tests.bpf.packets import CLIENT, CLIENT_MAC, ETH0_MAC, NODE1, Node

pytestmark = pytest.mark.privileged


def node_obj(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def service(name: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "selector": {"app": name}, "ports": ports, **spec}}


def slice_(svc: str, endpoints: list[tuple[str, str, str]], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "nodeName": node, "targetRef": {"kind": "Pod", "name": pod},
                           "conditions": {"ready": True}} for pod, ip, node in endpoints]}


HTTP = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}]
HTTP_EP = [{"name": "http", "protocol": "TCP", "port": 8080}]


def cluster() -> Snapshot:
    return Snapshot(
        services=[service("echo", HTTP),
                  service("bad", [{"name": "sctp", "protocol": "SCTP", "port": 9, "nodePort": 30009},
                                  {"name": "range", "protocol": "TCP", "port": 9, "nodePort": 40000}])],
        endpointslices=[slice_("echo", [("echo-a", "10.244.2.10", "node2"), ("echo-b", "10.244.1.10", "node1")],
                               HTTP_EP),
                        slice_("bad", [("bad-a", "10.244.2.20", "node2")], HTTP_EP)],
        nodes=[node_obj("node1", NODE1), node_obj("node2", "198.18.0.12")])


def test_services_and_slices_become_map_entries_and_bad_ports_are_skipped(node: Node) -> None:
    state = translate(cluster(), "node1")
    assert any("SCTP" in str(p) and "Service default/bad" in str(p) for p in state.problems)
    assert any("nodePort" in str(p) and "40000" in str(p) for p in state.problems)
    node.program(state)
    view = {f["frontend"]: f for f in _collect(node)["frontends"]}
    assert list(view) == [f"{NODE1}:30080/TCP"]
    fe = view[f"{NODE1}:30080/TCP"]
    assert fe["kind"] == "NodePort" and fe["policy"] == "Cluster"
    assert fe["backends"] == ["10.244.2.10:8080", "10.244.1.10:8080"]   # ordered by pod name: echo-a, echo-b
    backends = {b["address"]: b["local"] for b in _collect(node)["backends"].values()}
    assert backends == {"10.244.2.10:8080": False, "10.244.1.10:8080": True}


def test_sync_is_a_diff_and_live_flows_survive_unrelated_changes(node: Node) -> None:
    snap = cluster()
    node.program(translate(snap, "node1"))
    # A live flow to the frontend...
    syn = bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) / TCP(sport=41000, dport=30080,
                                                                                         flags="S"))
    first = Ether(node.ingress(syn).data)[IP].dst
    # ...the same state again writes nothing.
    again = node.maps.sync(translate(snap, "node1"))
    assert not again.changed
    # Adding an unrelated Service writes only its entries; the flow keeps its backend.
    snap2 = copy.deepcopy(snap)
    snap2.services.append(service("other", [{"name": "http", "protocol": "TCP", "port": 81, "targetPort": 8080,
                                             "nodePort": 30081}]))
    snap2.endpointslices.append(slice_("other", [("other-a", "10.244.2.30", "node2")], HTTP_EP))
    report = node.maps.sync(translate(snap2, "node1"))
    assert report.frontends_added == 1 and report.slots_written == 2 and report.backends_written == 1
    assert report.slots_removed == 0 and report.backends_removed == 0
    ack = bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) / TCP(sport=41000, dport=30080,
                                                                                         flags="A"))
    assert Ether(node.ingress(ack).data)[IP].dst == first
    # Removing it removes exactly its entries.
    report = node.maps.sync(translate(snap, "node1"))
    assert (report.frontends_removed, report.slots_removed, report.backends_removed) == (1, 2, 1)



def test_restart_on_pinned_maps_recovers_ids_and_writes_nothing(pin_root: Path) -> None:
    state = translate(cluster(), "node1")
    obj = load_lb(pin_root)
    maps = LBMaps(obj)
    maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=1))
    maps.sync(state)
    before = collect(pin_root)
    obj.close()
    assert (pin_root / "ct_fwd").exists() and (pin_root / "lb_services").exists()

    obj2 = load_lb(pin_root)          # a restarted agent: same pins, new programs
    try:
        maps2 = LBMaps(obj2)
        assert not maps2.sync(state).changed
        assert not maps2.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=1))
        assert collect(pin_root) == before
    finally:
        obj2.close()


def test_partial_syncs_on_a_previous_agents_maps_keep_what_is_not_listed_yet(node: Node) -> None:
    """A restarted agent programs the Services as their list comes in: its partial syncs leave the frontends of
    Services not listed yet serving in the kernel (a SYN to one is still translated), and the first complete
    sync removes them (and the backend only they named) without re-encoding the others."""
    snap = cluster()
    both = copy.deepcopy(snap)
    both.services.append(service("other", [{"name": "http", "protocol": "TCP", "port": 81, "targetPort": 8080,
                                            "nodePort": 30081}]))
    both.endpointslices.append(slice_("other", [("other-a", "10.244.2.30", "node2")], HTTP_EP))
    node.program(translate(both, "node1"))

    def syn_to_other() -> str:
        frame = bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1) /
                      TCP(sport=41001, dport=30081, flags="S"))
        return str(Ether(node.ingress(frame).data)[IP].dst)

    assert syn_to_other() == "10.244.2.30"
    restarted = LBMaps(node.obj)                      # a new agent's view of the same (pinned) maps
    listed = restarted.sync(translate(snap, "node1"), partial=True)      # "other" not listed yet
    assert (listed.frontends_removed, listed.slots_removed, listed.backends_removed) == (0, 0, 0)
    assert syn_to_other() == "10.244.2.30"
    done = restarted.sync(translate(snap, "node1"))  # complete, and "other" is not in it: it goes now
    assert (done.frontends_removed, done.slots_removed, done.backends_removed) == (1, 2, 1)
    assert done.slots_written == 0                    # what the partial sync programmed is not written again
    assert syn_to_other() == NODE1                    # no frontend any more: the packet is not translated


def _collect(node: Node) -> dict[str, Any]:
    """inspect's view of an unpinned object's maps."""
    return collect_maps(node.maps)


def test_bpflb_inspect_reads_a_nodes_pinned_maps(pin_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bpflb inspect --pin-root P` as the docs show it: the tables, then --json, from the pins alone."""
    import json

    from bpflb.cli import main

    obj = load_lb(pin_root)
    try:
        maps = LBMaps(obj)
        maps.set_config(NodeConfig(mode=Mode.DSR, snat_addr=IPv4Address(NODE1), ext_ifindex=1))
        maps.sync(translate(cluster(), "node1"))
    finally:
        obj.close()
    assert main(["inspect", "--pin-root", str(pin_root)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"mode DSR, SNAT source {NODE1}") and "FRONTEND" in table and "COUNTER" in table
    assert main(["inspect", "--pin-root", str(pin_root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "DSR" and data["frontends"] and all("backends" in f for f in data["frontends"])
    assert main(["inspect", "--pin-root", str(pin_root / "missing")]) == 1
