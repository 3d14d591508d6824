"""The cluster-wide facts a node's datapath needs besides its own frontends: every node's addresses,
the pod CIDRs, which frontends a DSR option may name, and how pod traffic crosses nodes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

from bpflb.model.settings import AgentConfig, decode_agent_config
from bpflb.model.types import DesiredState, FrontendKind, L4Addr, Problem
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


class DsrFrontendKind(enum.IntEnum):
    """How lb_dsr_backends lists a DSR frontend's backends (the datapath's LB_DSR_FE_* values)."""

    NODEPORT = 1   # under address 0: a nodePort is the same frontend on every node's address
    ADDRESS = 2    # under the frontend's own address (LoadBalancer IP, external IP)


ANY_NODE = IPv4Address(0)


def dsr_frontends(state: DesiredState, all_node_addrs: set[IPv4Address]) -> dict[L4Addr, DsrFrontendKind]:
    """Frontends a DSR option may legitimately name: this node's view of the Services, with each
    NodePort on every node's address (the request may have entered through any node).  Only
    externalTrafficPolicy Cluster frontends forward to other nodes, so only those count; ClusterIPs never.
    Where a NodePort and an external IP share address and port, the external IP's listing wins."""
    out: dict[L4Addr, DsrFrontendKind] = {}
    for fe in state.frontends.values():
        if fe.local_only or fe.kind is FrontendKind.CLUSTER_IP:     # a ClusterIP never enters from outside
            continue
        if fe.kind is FrontendKind.NODEPORT:
            for a in all_node_addrs:
                out.setdefault(L4Addr(a, fe.l4.port, fe.l4.proto), DsrFrontendKind.NODEPORT)
        else:
            out[fe.l4] = DsrFrontendKind.ADDRESS
    return out


def dsr_backends(state: DesiredState) -> set[tuple[L4Addr, L4Addr]]:
    """(frontend, backend) pairs a DSR request may be delivered for on this node: its own backends,
    serving or draining (their open flows' retransmitted SYNs carry the option), of every frontend
    dsr_frontends lists, a NodePort's under ANY_NODE.  Nothing else is honoured."""
    out: set[tuple[L4Addr, L4Addr]] = set()
    for fe in state.frontends.values():
        if fe.local_only or fe.kind is FrontendKind.CLUSTER_IP:     # a ClusterIP never enters from outside
            continue
        key = L4Addr(ANY_NODE, fe.l4.port, fe.l4.proto) if fe.kind is FrontendKind.NODEPORT else fe.l4
        out.update((key, be.l4) for be in (*fe.backends, *fe.draining) if be.local)
    return out


def local_backends(state: DesiredState) -> set[L4Addr]:
    """This node's backend endpoints, draining (terminating) ones included: their open flows still reply.
    Those of external frontends only: the set guards DSR replies, and a ClusterIP flow is never DSR'd."""
    return {be.l4 for fe in state.frontends.values() if fe.kind is not FrontendKind.CLUSTER_IP
            for be in (*fe.backends, *fe.draining) if be.local}


@dataclass(frozen=True)
class NodeInfo:
    """What the overlay and the routes need to know of a Node."""

    name: str
    addr: IPv4Address                 # InternalIP (the underlay address)
    pod_cidrs: tuple[IPv4Network, ...]


def nodes_info(snapshot: Snapshot) -> list[NodeInfo]:
    """Every Node with an IPv4 InternalIP, sorted by name."""
    out = []
    for node in snapshot.nodes:
        name = str((node.get("metadata") or {}).get("name") or "")
        internal = [e.get("address") for e in ((node.get("status") or {}).get("addresses") or [])
                    if isinstance(e, dict) and e.get("type") == "InternalIP"]
        addr = None
        for text in internal:
            try:
                candidate = ip_address(str(text))
            except ValueError:
                continue
            if isinstance(candidate, IPv4Address):
                addr = candidate
                break
        if not name or addr is None:
            continue
        spec = node.get("spec") or {}
        cidrs = []
        for text in list(spec.get("podCIDRs") or []) + ([spec["podCIDR"]] if spec.get("podCIDR") else []):
            try:
                net = ip_network(str(text), strict=False)
            except ValueError:
                continue
            if isinstance(net, IPv4Network) and net not in cidrs:
                cidrs.append(net)
        out.append(NodeInfo(name, addr, tuple(cidrs)))
    return sorted(out, key=lambda n: n.name)


class Tunnel(enum.IntEnum):
    """tunnelMode; the values are the datapath's TUNNEL_* constants."""

    DISABLED = 0
    VXLAN = 1

    @property
    def label(self) -> str:
        return {Tunnel.DISABLED: "Disabled", Tunnel.VXLAN: "VXLAN"}[self]


@dataclass(frozen=True)
class NetworkSettings:
    """How pod traffic crosses nodes (the agent ConfigMap's tunnelMode and createNodeRoutes)."""

    tunnel: Tunnel = Tunnel.DISABLED
    create_node_routes: bool = False
    vni: int = 1


ACCELERATIONS = ("Disabled", "Native", "BestEffort")


def network_settings(config: AgentConfig) -> NetworkSettings:
    """How pod traffic crosses nodes, from the decoded agent configuration."""
    tunnel = Tunnel.VXLAN if config.settings.tunnelMode == "VXLAN" else Tunnel.DISABLED
    return NetworkSettings(tunnel, bool(config.settings.createNodeRoutes))


def parse_network_settings(config: dict[str, str] | None) -> tuple[NetworkSettings, list[Problem]]:
    """tunnelMode (Disabled|VXLAN) and createNodeRoutes (true|false) through the one schema; invalid values
    keep the default and come back as Problems naming the field, the allowed values and what was given."""
    decoded, problems = decode_agent_config(config)
    keys = ("data.tunnelMode", "data.createNodeRoutes")
    return network_settings(decoded), [p for p in problems if p.field in keys]


def parse_acceleration(config: dict[str, str] | None) -> tuple[str, list[Problem]]:
    """xdpAcceleration (Disabled|Native|BestEffort, default Disabled) through the one schema; an invalid
    value keeps Disabled and comes back as a Problem."""
    decoded, problems = decode_agent_config(config)
    return decoded.settings.xdpAcceleration, [p for p in problems if p.field == "data.xdpAcceleration"]
