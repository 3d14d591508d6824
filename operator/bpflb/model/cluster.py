"""The cluster-wide facts a node's datapath needs besides its own frontends: every node's addresses,
the pod CIDRs, which frontends a DSR option may name, and how pod traffic crosses nodes."""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Generic, TypeVar

from bpflb.model.settings import AgentConfig, decode_agent_config
from bpflb.model.types import DesiredState, Frontend, FrontendKind, L4Addr, Problem
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


K = TypeVar("K", bound=Hashable)


class Facts(Mapping[K, int]):
    """Keys ClusterFacts keeps (each with its one-byte map value), and what changed since the Facts it handed
    out before (generation `base`): `added` (new keys, or a new value) and `removed`. A consumer that wrote
    those earlier Facts needs to write only these. Valid until the next update of its ClusterFacts."""

    def __init__(self, values: dict[K, int], generation: int, base: int, added: set[K], removed: set[K]) -> None:
        self._values = values
        self.generation, self.base = generation, base
        self.added, self.removed = added, removed

    def __getitem__(self, key: K) -> int:
        return self._values[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class _Counted(Generic[K]):
    """Keys counted by how many frontends need them (and under which value, the highest wins), with what
    changed since the last take(). A key's count is a plain int while every frontend names it with one value
    (nearly always: a dict per key would cost more than everything else these sets hold), a dict of value ->
    count otherwise."""

    def __init__(self) -> None:
        self.counts: dict[K, int | dict[int, int]] = {}
        self.values: dict[K, int] = {}
        self.added: set[K] = set()
        self.removed: set[K] = set()

    def count(self, keys: Iterable[tuple[K, int]], sign: int) -> None:
        counts, values = self.counts, self.values
        for k, value in keys:
            per = counts.get(k)
            before = values.get(k)
            if type(per) is int:
                if value == before:
                    left = per + sign
                    if left > 0:
                        counts[k] = left
                        continue
                    if left == 0:
                        del counts[k]
                        del values[k]
                        self.added.discard(k)
                        self.removed.add(k)
                        continue
                assert before is not None
                per = {before: per}
            elif per is None:
                if sign > 0:
                    counts[k] = sign
                    values[k] = value
                    self.added.add(k)
                    self.removed.discard(k)
                    continue
                per = {}
            assert isinstance(per, dict)
            left = per.get(value, 0) + sign
            if left:
                per[value] = left
            else:
                del per[value]
            after = max(per) if per else None
            if after is None:
                del counts[k]
                del values[k]
                self.added.discard(k)
                if before is not None:
                    self.removed.add(k)
                continue
            only = per[after] if len(per) == 1 else 0
            counts[k] = only if only > 0 else per
            if after != before:
                values[k] = after
                self.added.add(k)
                self.removed.discard(k)

    def take(self, generation: int, base: int) -> Facts[K]:
        facts = Facts(self.values, generation, base, self.added, self.removed)
        self.added, self.removed = set(), set()
        return facts


class ClusterFacts:
    """dsr_frontends(), dsr_backends() and local_backends() of the states an agent programs, kept up to date by
    reference counts from what each state says changed (DesiredState.changes): a sync that changes one Service
    costs that Service's frontends, not the cluster's, and so does writing them (Facts.added, .removed)."""

    def __init__(self) -> None:
        self._reset(frozenset())

    def _reset(self, addrs: frozenset[IPv4Address]) -> None:
        self._addrs = addrs
        self._seen = -2
        self._per: dict[L4Addr, Frontend] = {}       # each counted frontend (its keys are made again to uncount)
        self._dsr: _Counted[L4Addr] = _Counted()
        self._local: _Counted[L4Addr] = _Counted()
        self._members: _Counted[tuple[L4Addr, L4Addr]] = _Counted()

    def _keys(self, fe: Frontend) -> tuple[tuple[tuple[L4Addr, int], ...], tuple[tuple[L4Addr, int], ...],
                                           tuple[tuple[tuple[L4Addr, L4Addr], int], ...]]:
        """What one frontend counts in (the DSR frontends, this node's backends, the DSR members): the same
        every time for the same frontend and node addresses (a change of those resets everything)."""
        dsr: tuple[tuple[L4Addr, int], ...] = ()
        members: tuple[tuple[tuple[L4Addr, L4Addr], int], ...] = ()
        local: tuple[tuple[L4Addr, int], ...] = ()
        if fe.kind is not FrontendKind.CLUSTER_IP:             # a ClusterIP never enters from outside
            local = tuple((be.l4, 1) for be in (*fe.backends, *fe.draining) if be.local)
        if not fe.local_only and fe.kind is not FrontendKind.CLUSTER_IP:
            if fe.kind is FrontendKind.NODEPORT:
                dsr = tuple((L4Addr(a, fe.l4.port, fe.l4.proto), int(DsrFrontendKind.NODEPORT)) for a in self._addrs)
                key = L4Addr(ANY_NODE, fe.l4.port, fe.l4.proto)
            else:
                dsr, key = ((fe.l4, int(DsrFrontendKind.ADDRESS)),), fe.l4
            members = tuple(((key, be), 1) for be, _ in local)
        return dsr, local, members

    def update(self, state: DesiredState, all_node_addrs: set[IPv4Address]
               ) -> tuple[Facts[L4Addr], Facts[tuple[L4Addr, L4Addr]], Facts[L4Addr]]:
        """(the DSR frontends with their DsrFrontendKind, the DSR (frontend, backend) members, this node's
        backend endpoints) of state: what dsr_frontends(), dsr_backends() and local_backends() give."""
        addrs = frozenset(all_node_addrs)
        look: Iterable[L4Addr]
        base = self._seen
        if state.changes is not None and state.base == self._seen and addrs == self._addrs:
            look = state.changes
        else:
            self._reset(addrs)
            base = -1                     # nothing to be relative to: the consumer compares everything
            look = state.frontends.keys()
        for l4 in look:
            before = self._per.pop(l4, None)
            if before is not None:
                dsr, local, members = self._keys(before)
                self._dsr.count(dsr, -1)
                self._local.count(local, -1)
                self._members.count(members, -1)
            fe = state.frontends.get(l4)
            if fe is None:
                continue
            self._per[l4] = fe
            dsr, local, members = self._keys(fe)
            self._dsr.count(dsr, +1)
            self._local.count(local, +1)
            self._members.count(members, +1)
        self._seen = state.generation
        return (self._dsr.take(state.generation, base), self._members.take(state.generation, base),
                self._local.take(state.generation, base))


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
