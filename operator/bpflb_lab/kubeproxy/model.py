"""What kube-proxy knows about the Services of one node, read from the same Snapshot the agent reads:
one ServicePort per Service port, with its addresses and its endpoints sorted into the Cluster and
Local sets the way kube-proxy's CategorizeEndpoints does (pkg/proxy/topology.go, without topology
hints). Parsing follows bpflb.model.translate's conventions (default namespace, TCP by default,
EndpointSlice conditions' defaults, IPv4 only); malformed objects are skipped, not reported: this
feeds the benchmark's baselines, and the agent's translation is what reports bad input.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from bpflb.sources.base import KubeObject, Snapshot

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/12")   # where Services without a clusterIP get one
DEFAULT_AFFINITY_TIMEOUT = 10800
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True, order=True)
class Endpoint:
    """One endpoint address:port of a Service port, as kube-proxy's endpoint info holds it."""

    ip: str
    port: int
    node: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False       # on the node the rules are generated for

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class ServicePort:
    """One port of one Service and what this node does with it (kube-proxy's servicePortInfo)."""

    namespace: str
    name: str
    port_name: str
    protocol: str                 # "tcp", "udp", "sctp": lower case, as kube-proxy hashes and matches it
    cluster_ip: str
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    external_local: bool = False  # externalTrafficPolicy: Local (only when externally accessible)
    internal_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0
    affinity_timeout: int = 0     # sessionAffinity ClientIP: seconds; 0 = none
    endpoints: list[Endpoint] = field(default_factory=list)   # every endpoint listed, sorted by "ip:port"

    @property
    def key(self) -> str:
        """kube-proxy's ServicePortName.String(): "namespace/name" plus ":port-name" when named."""
        return f"{self.namespace}/{self.name}" + (f":{self.port_name}" if self.port_name else "")

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.lb_ips or self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        return not self.internal_local or (self.externally_accessible and not self.external_local)

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_local or (self.externally_accessible and self.external_local)

    def categorize(self) -> Categorized:
        """kube-proxy's CategorizeEndpoints: the endpoints Cluster and Local policy use, every endpoint this
        node may send to, and whether the Service has a usable endpoint anywhere."""
        eps = self.endpoints
        cluster: list[Endpoint] = []
        local: list[Endpoint] = []
        has_any = False
        if self.uses_cluster_endpoints:
            cluster = [e for e in eps if e.ready]
            if not cluster:
                cluster = [e for e in eps if e.serving and e.terminating]
            has_any = bool(cluster)
        if not self.uses_local_endpoints:
            return Categorized(cluster, [], cluster, has_any)
        local_ready = local_serving_terminating = False
        for e in eps:
            if e.ready:
                has_any = True
                local_ready |= e.local
            elif e.serving and e.terminating:
                has_any = True
                local_serving_terminating |= e.local
        if local_ready:
            local = [e for e in eps if e.local and e.ready]
        elif local_serving_terminating:
            local = [e for e in eps if e.local and e.serving and e.terminating]
        if not self.uses_cluster_endpoints:
            return Categorized([], local, local, has_any)
        reachable = {str(e): e for e in cluster} | {str(e): e for e in local}
        return Categorized(cluster, local, sorted(reachable.values(), key=str), has_any)


@dataclass(frozen=True)
class Categorized:
    cluster: list[Endpoint]
    local: list[Endpoint]
    reachable: list[Endpoint]
    has_endpoints: bool


@dataclass(frozen=True)
class Policy:
    """What both renderers derive from a Service port's endpoints and traffic policies (kube-proxy's
    syncProxyRules preamble): which endpoint chains exist and whether internal/external traffic has
    somewhere to go (else it is rejected, or dropped when only the local policy leaves it nowhere)."""

    cat: Categorized
    uses_cluster: bool      # the cluster-wide endpoint chain is written
    uses_local: bool        # the local-only endpoint chain is written
    has_internal: bool      # the clusterIP leads to an endpoint (through the local chain if internal_local)
    has_external: bool      # external addresses lead to an endpoint (through the local chain if external_local)
    uses_ext: bool          # the external chain is written


def policy(sp: ServicePort) -> Policy:
    cat = sp.categorize()
    return Policy(cat=cat,
                  uses_cluster=bool(cat.cluster) and sp.uses_cluster_endpoints,
                  uses_local=bool(cat.local) and sp.uses_local_endpoints,
                  has_internal=bool(cat.local) if sp.internal_local else cat.has_endpoints,
                  has_external=bool(cat.local) if sp.external_local else cat.has_endpoints,
                  uses_ext=cat.has_endpoints and sp.externally_accessible)


@dataclass
class NodeView:
    """Everything a kube-proxy renderer needs for one node."""

    node_name: str
    local_cidr: str | None          # detect-local: this node's pod CIDR (or the cluster CIDR given)
    service_ports: list[ServicePort]


# ------------------------------------------------------------------------------------------ parsing

def _ipv4(value: Any) -> str | None:
    """The canonical dotted quad, or None for anything else (IPv6, garbage)."""
    if not isinstance(value, str):
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except OSError:
        return None
    text = socket.inet_ntop(socket.AF_INET, packed)
    return text if text == value else None


def _meta(obj: Any) -> tuple[str, str, dict[str, Any]] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    meta = obj["metadata"]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) and meta.get("namespace") \
        else "default"
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    return namespace, name, labels


def _node_pod_cidr(snapshot: Snapshot, node_name: str) -> str | None:
    for node in snapshot.nodes:
        if isinstance(node, dict) and (node.get("metadata") or {}).get("name") == node_name:
            spec = node.get("spec") or {}
            for cidr in [*(spec.get("podCIDRs") or []), spec.get("podCIDR")]:
                try:
                    return str(IPv4Network(str(cidr)))
                except ValueError:
                    continue
    return None


def _slices_by_service(slices: Iterable[Any]) -> dict[tuple[str, str], list[KubeObject]]:
    out: dict[tuple[str, str], list[KubeObject]] = {}
    for raw in slices:
        meta = _meta(raw)
        if meta is None or raw.get("addressType") != "IPv4":
            continue
        service = meta[2].get(SERVICE_NAME_LABEL)
        if isinstance(service, str) and service:
            out.setdefault((meta[0], service), []).append(raw)
    return out


def _endpoints(slices: list[KubeObject], port_name: str, protocol: str, node_name: str) -> list[Endpoint]:
    found: dict[str, Endpoint] = {}
    for raw in slices:
        port = None
        for entry in raw.get("ports") or []:
            if isinstance(entry, dict) and (entry.get("name") or "") == port_name \
                    and (entry.get("protocol") or "TCP") == protocol.upper():
                port = entry.get("port")
                break
        if not isinstance(port, int) or not 0 < port < 65536:
            continue
        for ep in raw.get("endpoints") or []:
            if not isinstance(ep, dict):
                continue
            raw_cond = ep.get("conditions")
            cond: dict[str, Any] = raw_cond if isinstance(raw_cond, dict) else {}
            ready = cond.get("ready") is not False
            raw_serving = cond.get("serving")
            serving = raw_serving if isinstance(raw_serving, bool) else ready
            terminating = cond.get("terminating") is True
            node = ep.get("nodeName") if isinstance(ep.get("nodeName"), str) else None
            for text in ep.get("addresses") or []:
                ip = _ipv4(text)
                if ip is None:
                    continue
                new = Endpoint(ip, port, node, ready, serving, terminating, node == node_name)
                seen = found.get(str(new))
                if seen is None or (new.ready and not seen.ready):
                    found[str(new)] = new
    return sorted(found.values(), key=str)


def _derived_cluster_ip(key: str, taken: set[str], cidr: IPv4Network) -> str:
    """A clusterIP for a Service that has none (the lab's Services): hashed into cidr, never one taken."""
    size = cidr.num_addresses - 2
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % size
    for i in range(size):
        addr = str(cidr.network_address + 1 + (start + i) % size)
        if addr not in taken:
            taken.add(addr)
            return addr
    raise ValueError(f"no free address left in {cidr}")


def node_view(snapshot: Snapshot, node_name: str, *, local_cidr: str | None = None,
              service_cidr: IPv4Network = DEFAULT_SERVICE_CIDR) -> NodeView:
    """The Service ports kube-proxy on node_name would program, sorted by Service and port name.

    local_cidr is what kube-proxy's detect-local uses: default this node's spec.podCIDR (detect-local-
    mode NodeCIDR); pass the cluster CIDR for mode ClusterCIDR. Services without spec.clusterIP (the
    lab's) get a stable address in service_cidr; headless and ExternalName Services and those of
    another proxy (service.kubernetes.io/service-proxy-name) are skipped, as kube-proxy does.
    """
    slices = _slices_by_service(snapshot.endpointslices)
    services: list[tuple[str, str, KubeObject]] = []
    seen: set[tuple[str, str]] = set()
    for raw in snapshot.services:
        meta = _meta(raw)
        if meta is None or (meta[0], meta[1]) in seen or SERVICE_PROXY_NAME_LABEL in meta[2]:
            continue
        seen.add((meta[0], meta[1]))
        services.append((meta[0], meta[1], raw))
    services.sort(key=lambda s: (s[0], s[1]))
    taken = {ip for _, _, raw in services if (ip := _ipv4((raw.get("spec") or {}).get("clusterIP")))}

    ports: list[ServicePort] = []
    for namespace, name, raw in services:
        raw_spec = raw.get("spec")
        spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
        kind = spec.get("type") or "ClusterIP"
        if kind == "ExternalName" or spec.get("clusterIP") == "None":
            continue
        cluster_ip = _ipv4(spec.get("clusterIP")) or _derived_cluster_ip(f"{namespace}/{name}", taken, service_cidr)
        node_port_kind = kind in ("NodePort", "LoadBalancer")
        external_ips = tuple(ip for ip in (_ipv4(v) for v in spec.get("externalIPs") or []) if ip)
        lb_ips: tuple[str, ...] = ()
        if kind == "LoadBalancer":
            ingress = ((raw.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            lb_ips = tuple(ip for ip in (_ipv4(i.get("ip")) for i in ingress
                                         if isinstance(i, dict) and i.get("ipMode") != "Proxy") if ip)
        affinity = 0
        if spec.get("sessionAffinity") == "ClientIP":
            timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
            affinity = timeout if isinstance(timeout, int) and timeout > 0 else DEFAULT_AFFINITY_TIMEOUT
        hc = spec.get("healthCheckNodePort")
        for entry in spec.get("ports") or []:
            if not isinstance(entry, dict):
                continue
            protocol = entry.get("protocol") or "TCP"
            port = entry.get("port")
            if protocol not in PROTOCOLS or not isinstance(port, int) or not 0 < port < 65536:
                continue
            raw_name, raw_node_port = entry.get("name"), entry.get("nodePort")
            port_name = raw_name if isinstance(raw_name, str) else ""
            node_port = raw_node_port if node_port_kind and isinstance(raw_node_port, int) else 0
            sp = ServicePort(
                namespace=namespace, name=name, port_name=port_name, protocol=protocol.lower(),
                cluster_ip=cluster_ip, port=port, node_port=node_port, external_ips=external_ips, lb_ips=lb_ips,
                internal_local=spec.get("internalTrafficPolicy") == "Local", affinity_timeout=affinity,
                endpoints=_endpoints(slices.get((namespace, name), []), port_name, protocol, node_name))
            sp.external_local = sp.externally_accessible and spec.get("externalTrafficPolicy") == "Local"
            if sp.external_local and isinstance(hc, int):
                sp.health_check_node_port = hc
            ports.append(sp)
    return NodeView(node_name, local_cidr or _node_pod_cidr(snapshot, node_name), ports)


def service_order(ports: list[ServicePort]) -> list[ServicePort]:
    """The order rules are written in. kube-proxy iterates a Go map (a random order that changes every
    sync); a fixed pseudo-random order, by the chain-name hash, keeps the output stable and puts a
    given Service nowhere special in the linear chains."""
    return sorted(ports, key=lambda sp: (hashlib.sha256((sp.key + sp.protocol).encode()).digest(), sp.key))
