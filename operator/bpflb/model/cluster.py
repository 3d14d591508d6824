"""The cluster-wide facts a node's datapath needs besides its own frontends: every node's addresses,
the pod CIDRs, and which frontends a DSR option may name."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from bpflb.model.types import DesiredState, FrontendKind, L4Addr
from bpflb.sources.base import Snapshot


def node_addresses(snapshot: Snapshot) -> set[IPv4Address]:
    """InternalIP and ExternalIP of every Node (malformed entries are the translator's to report)."""
    out: set[IPv4Address] = set()
    for node in snapshot.nodes:
        for entry in ((node.get("status") or {}).get("addresses") or []):
            if not isinstance(entry, dict) or entry.get("type") not in ("InternalIP", "ExternalIP"):
                continue
            try:
                addr = ip_address(str(entry.get("address")))
            except ValueError:
                continue
            if isinstance(addr, IPv4Address):
                out.add(addr)
    return out


def pod_cidrs(snapshot: Snapshot) -> set[IPv4Network]:
    """Every Node's spec.podCIDR(s), IPv4 only."""
    out: set[IPv4Network] = set()
    for node in snapshot.nodes:
        spec = node.get("spec") or {}
        cidrs = list(spec.get("podCIDRs") or []) + ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        for cidr in cidrs:
            try:
                net = ip_network(str(cidr), strict=False)
            except ValueError:
                continue
            if isinstance(net, IPv4Network):
                out.add(net)
    return out


def cluster_prefixes(snapshot: Snapshot) -> set[IPv4Network]:
    """The cluster's own address space: node addresses (/32) and pod CIDRs."""
    return {IPv4Network(a) for a in node_addresses(snapshot)} | pod_cidrs(snapshot)


def dsr_frontends(state: DesiredState, all_node_addrs: set[IPv4Address]) -> set[L4Addr]:
    """Frontends a DSR option may legitimately name: this node's view of the Services, with each
    NodePort on every node's address (the request may have entered through any node).  Only
    externalTrafficPolicy Cluster frontends forward to other nodes, so only those count."""
    out: set[L4Addr] = set()
    for fe in state.frontends.values():
        if fe.local_only:
            continue
        if fe.kind is FrontendKind.NODEPORT:
            out.update(L4Addr(a, fe.l4.port, fe.l4.proto) for a in all_node_addrs)
        else:
            out.add(fe.l4)
    return out


def local_backends(state: DesiredState) -> set[L4Addr]:
    """This node's backend endpoints."""
    return {be.l4 for fe in state.frontends.values() for be in fe.backends if be.local}
