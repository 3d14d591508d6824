"""Services for the translation: every frontend a Service asks for on this node (its clusterIP, NodePorts on
the node's addresses, LoadBalancer ingress IPs, externalIPs), with its policy, selection settings and
backends, each bad field skipped at the smallest unit that holds it; two Services wanting one frontend: the
first keeps it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from typing import Any

from bpflb.model.endpoints import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, _backends, _Slice
from bpflb.model.fields import (
    NODEPORT_MAX,
    NODEPORT_MIN,
    _int,
    _Invalid,
    _ipv4,
    _list,
    _mapping,
    _Meta,
    _proto,
    _str,
)
from bpflb.model.messages import show as _show
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    Frontend,
    FrontendKind,
    HealthCheck,
    L4Addr,
    Problem,
    Proto,
)
from bpflb.sources.base import KubeObject

LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"  # used when the field is unset
SOURCE_RANGES_POLICY_ANNOTATION = "service.cilium.io/src-ranges-policy"              # allow (default) | deny
SERVICE_TYPE_ANNOTATION = "service.cilium.io/type"      # Cilium's: expose only this kind of frontend
_CILIUM_ANNOTATIONS = (LB_ALGORITHM_ANNOTATION, SOURCE_RANGES_POLICY_ANNOTATION, SERVICE_TYPE_ANNOTATION)
# service.cilium.io/type values -> the frontend kinds kept at the edge (the ClusterIP, which in-cluster paths
# and the other frontends' internal views use, and externalIPs, which are not a Service type, always stay)
_KEPT = frozenset({FrontendKind.CLUSTER_IP, FrontendKind.EXTERNAL_IP})
_ALL_KINDS = frozenset(FrontendKind)
_EXPOSED_KINDS = {"ClusterIP": _KEPT,
                  "NodePort": _KEPT | {FrontendKind.NODEPORT},
                  "LoadBalancer": _KEPT | {FrontendKind.LOADBALANCER}}
# Frontend kinds whose clients loadBalancerSourceRanges limit (Cilium's and so Deckhouse's semantics: the
# Service's LoadBalancer IPs and its externalIPs; a NodePort stays open unless service.cilium.io/type hides it).
_RANGED_KINDS = frozenset({FrontendKind.LOADBALANCER, FrontendKind.EXTERNAL_IP})
DEFAULT_AFFINITY_TIMEOUT = 10800          # seconds, Kubernetes' default for sessionAffinity: ClientIP
MAX_AFFINITY_TIMEOUT = 86400              # the API server's upper bound
_ALGORITHMS_BY_ANNOTATION = {"random": Algorithm.RANDOM, "maglev": Algorithm.MAGLEV}
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


@dataclass(frozen=True, slots=True)
class Claim:
    """A frontend a Service asks for: which of its ports asks, through which field. When two claims want the
    same address:port/protocol, the first (Services by namespace/name, then in the order they ask) keeps it."""

    l4: L4Addr
    frontend: Frontend
    field: str
    port_index: int


@dataclass
class _Context:
    """What one Service's translation reads (the node, the settings, the Service's EndpointSlices) and what
    it says besides its claims (problems, notes, its healthCheckNodePort)."""

    node_name: str
    node_addrs: tuple[IPv4Address, ...]
    settings: AgentSettings
    problems: list[Problem]
    notes: list[Problem] = field(default_factory=list)
    slices: list[_Slice] = field(default_factory=list)
    health: HealthCheck | None = None


def conflict(service: str, claim: Claim, holder_service: str, holder_port: int) -> Problem:
    """The Problem of a claim that lost its frontend to an earlier one."""
    holder = (f"spec.ports[{holder_port}] of this Service" if holder_service == service
              else f"Service {holder_service}")
    return Problem(f"Service {service}", claim.field, f"frontend {claim.l4} is already used by {holder}; skipped")


def _frontend_ips(values: list[Any], field: str, ip_key: str | None, obj: str,
                  ctx: _Context) -> Iterator[tuple[IPv4Address, str]]:
    """Yield (IPv4 address, its field path) from spec.externalIPs or status.loadBalancer.ingress."""
    for i, value in enumerate(values):
        path = f"{field}[{i}]"
        try:
            if ip_key is not None:
                entry = _mapping(value, path, required=True)
                if entry.get("ipMode") == "Proxy":
                    # The load balancer proxies to the nodes: packets never carry this address.
                    ctx.notes.append(Problem(obj, f"{path}.ipMode", "Proxy: the load balancer proxies to the "
                                             "nodes' NodePorts; no frontend for this address"))
                    continue
                value = entry.get(ip_key)
                if value is None:
                    continue    # a hostname-only ingress
                path = f"{path}.{ip_key}"
            addr = _ipv4(value, path, "a frontend address")
        except _Invalid as bad:
            ctx.problems.append(Problem(obj, bad.field, bad.reason))
            continue
        if addr is not None:
            yield addr, path
        else:
            ctx.notes.append(Problem(obj, path, f"{value}: IPv6 is not supported (IPv4 only); no frontend"))


def _cluster_ips(spec: dict[str, Any], obj: str, problems: list[Problem]) -> list[tuple[IPv4Address, str]]:
    """The Service's IPv4 clusterIP with its field path: spec.clusterIPs (dual-stack: at most one per family)
    or else spec.clusterIP; unset (""), IPv6 and None-valued entries give nothing, bad ones a Problem."""
    values = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    paths = [f"spec.clusterIPs[{i}]" for i in range(len(values))]
    if not values:
        values, paths = [spec.get("clusterIP")], ["spec.clusterIP"]
    out: list[tuple[IPv4Address, str]] = []
    for value, path in zip(values, paths, strict=True):
        if value is None or value == "":
            continue
        try:
            addr = _ipv4(value, path, "a clusterIP")
        except _Invalid as bad:
            problems.append(Problem(obj, bad.field, bad.reason))
            continue
        if addr is not None and all(addr != a for a, _ in out):
            out.append((addr, path))
    return out


def _policy(spec: dict[str, Any], field: str) -> bool:
    """True for a traffic policy field set to Local; Cluster (the default) is False."""
    policy = _str(spec.get(field), f"spec.{field}", "Cluster")
    if policy not in ("Cluster", "Local"):
        raise _Invalid(f"spec.{field}", f"expected Cluster or Local; got {_show(policy)}")
    return policy == "Local"


def _translate_service(meta: _Meta, raw: KubeObject, slices: list[_Slice], claimed: bool,
                       ctx: _Context) -> list[Claim]:
    """The frontends one Service asks for on this node, in the order it asks (its problems and notes go to
    ctx); slices are its usable EndpointSlices, claimed whether it has any EndpointSlice at all."""
    obj = f"Service {meta.key}"
    claims: list[Claim] = []
    ctx.slices = slices
    for label in (SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL):
        if label in meta.labels:        # another proxy's Service, or headless: kube-proxy leaves it alone too
            ctx.notes.append(Problem(obj, f'metadata.labels["{label}"]', "bpflb leaves this Service alone, as "
                                     "kube-proxy does; no frontend"))
            return claims
    try:
        spec = _mapping(raw.get("spec"), "spec")
        if spec.get("clusterIP") == "None":
            return claims       # headless: nothing to balance
        kind = _str(spec.get("type"), "spec.type", "ClusterIP")
        if kind not in _SERVICE_TYPES:
            raise _Invalid("spec.type", f"expected one of {', '.join(_SERVICE_TYPES)}; got {_show(kind)}")
        if kind == "ExternalName":
            return claims       # a DNS alias, never proxied
        external_ips = _list(spec.get("externalIPs"), "spec.externalIPs")
        if _ipv6_only(spec, obj, ctx):
            return claims
        local_only = _policy(spec, "externalTrafficPolicy")
        internal_local = _policy(spec, "internalTrafficPolicy")
        cluster_ips = _cluster_ips(spec, obj, ctx.problems)
        affinity_timeout = _affinity_timeout(spec)
        ports = _list(spec.get("ports"), "spec.ports")
        if not ports:
            raise _Invalid("spec.ports", "empty; expected at least one port")
        ingress: list[Any] = []
        if kind == "LoadBalancer":
            status = _mapping(raw.get("status"), "status")
            load_balancer = _mapping(status.get("loadBalancer"), "status.loadBalancer")
            ingress = _list(load_balancer.get("ingress"), "status.loadBalancer.ingress")
        selector = _mapping(spec.get("selector"), "spec.selector")
    except _Invalid as bad:
        ctx.problems.append(Problem(obj, bad.field, bad.reason + "; the Service is skipped"))
        return claims

    if not selector and not claimed:
        ctx.problems.append(Problem(obj, "spec.selector",
                                    "selector-less Service without EndpointSlices; the Service is skipped"))
        return claims

    _note_ignored_fields(meta, spec, obj, ctx)
    algorithm = _algorithm(meta, obj, ctx)
    exposed = _exposed_kinds(meta, obj, ctx)
    ranges, deny = _source_ranges(meta, spec, kind, obj, ctx)
    node_port_field = kind in ("NodePort", "LoadBalancer")
    lb_ips = list(_frontend_ips(ingress, "status.loadBalancer.ingress", "ip", obj, ctx))
    ext_ips = list(_frontend_ips(external_ips, "spec.externalIPs", None, obj, ctx))
    used_ports: dict[tuple[str, Proto], int] = {}
    service = meta.key
    node_ips = {int(a) for a in ctx.node_addrs} if ext_ips else set()
    if kind == "LoadBalancer" and local_only:
        _health_check(meta, spec, obj, ctx)

    for i, raw_port in enumerate(ports):
        field = f"spec.ports[{i}]"
        try:
            entry = _mapping(raw_port, field, required=True)
            proto = _proto(entry.get("protocol"), f"{field}.protocol")
            name = _str(entry.get("name"), f"{field}.name", "")
            port = _int(entry.get("port"), f"{field}.port", 1, 65535)
            node_port: int | None = None
            if node_port_field and entry.get("nodePort") is not None:
                node_port = _int(entry.get("nodePort"), f"{field}.nodePort", NODEPORT_MIN, NODEPORT_MAX)
            if (name, proto) in used_ports:
                raise _Invalid(f"{field}.name", f"duplicates spec.ports[{used_ports[name, proto]}] "
                               f"(same name {_show(name)} and protocol {proto.name})")
        except _Invalid as bad:
            ctx.problems.append(Problem(obj, bad.field, bad.reason + "; the port is skipped"))
            continue
        used_ports[name, proto] = i

        wanted: list[tuple[L4Addr, FrontendKind, str]] = [
            (L4Addr(a, port, proto), FrontendKind.CLUSTER_IP, path) for a, path in cluster_ips]
        if node_port is not None:
            wanted += [(L4Addr(a, node_port, proto), FrontendKind.NODEPORT, f"{field}.nodePort")
                       for a in ctx.node_addrs]
        wanted += [(L4Addr(a, port, proto), FrontendKind.LOADBALANCER, path) for a, path in lb_ips]
        wanted += [(L4Addr(a, port, proto), FrontendKind.EXTERNAL_IP, path) for a, path in ext_ips]
        if exposed is not _ALL_KINDS:
            wanted = [w for w in wanted if w[1] in exposed]
        if not wanted:
            continue
        # The port's endpoints under each traffic policy its frontends use: the ClusterIP internalTrafficPolicy,
        # the others externalTrafficPolicy (computed once when both are alike).
        views: dict[bool, tuple[tuple[Backend, ...], tuple[Backend, ...], bool]] = {}
        internal: L4Addr | None = None
        for l4, fe_kind, path in wanted:
            policy_local = internal_local if fe_kind is FrontendKind.CLUSTER_IP else local_only
            if policy_local not in views:
                views[policy_local] = _backends(slices, name, proto, ctx.node_name, policy_local)
            backends, draining, no_endpoints = views[policy_local]
            ranged = fe_kind is FrontendKind.LOADBALANCER or fe_kind is FrontendKind.EXTERNAL_IP   # _RANGED_KINDS
            claims.append(Claim(l4, Frontend(
                l4=l4, kind=fe_kind, service=service, port_name=name, local_only=policy_local,
                backends=backends, no_endpoints=no_endpoints, algorithm=algorithm,
                affinity_timeout=affinity_timeout, draining=draining,
                source_ranges=ranges if ranged else None, source_ranges_deny=deny and ranged,
                internal=None if fe_kind is FrontendKind.CLUSTER_IP else internal,
                in_cluster=fe_kind is not FrontendKind.EXTERNAL_IP or l4[0] in node_ips), path, i))
            if fe_kind is FrontendKind.CLUSTER_IP and internal is None:
                internal = l4
    return claims


def _ipv6_only(spec: dict[str, Any], obj: str, ctx: _Context) -> bool:
    """An IPv6-only Service (spec.ipFamilies [IPv6]) has no IPv4 frontend: said once, and skipped."""
    families = spec.get("ipFamilies")
    if isinstance(families, list) and families and all(f == "IPv6" for f in families):
        ctx.notes.append(Problem(obj, "spec.ipFamilies", "IPv6 only: bpflb balances IPv4; no frontend"))
        return True
    return False


# Service fields bpflb does not act on, and why (said once per Service through state.notes).
_IGNORED_FIELDS = {
    "loadBalancerClass": "bpflb serves the addresses status.loadBalancer.ingress holds, whichever controller "
                         "wrote them; the class is not acted on",
    "loadBalancerIP": "deprecated; bpflb serves the addresses of status.loadBalancer.ingress",
    "trafficDistribution": "not acted on: every eligible endpoint is used, with no zone or node preference",
}


def _note_ignored_fields(meta: _Meta, spec: dict[str, Any], obj: str, ctx: _Context) -> None:
    for name, reason in _IGNORED_FIELDS.items():
        value = spec.get(name)
        if value not in (None, ""):
            ctx.notes.append(Problem(obj, f"spec.{name}", f"{_show(value)}: {reason}"))
    for annotation in sorted(meta.annotations):
        if annotation.startswith("service.cilium.io/") and annotation not in _CILIUM_ANNOTATIONS:
            ctx.notes.append(Problem(obj, f'metadata.annotations["{annotation}"]',
                                     f"Cilium's; bpflb honours only {', '.join(_CILIUM_ANNOTATIONS)}"))


def _exposed_kinds(meta: _Meta, obj: str, ctx: _Context) -> frozenset[FrontendKind]:
    """The frontend kinds the Service gets: all, or those service.cilium.io/type names (Cilium's semantics)."""
    value = meta.annotations.get(SERVICE_TYPE_ANNOTATION)
    if value is None:
        return _ALL_KINDS
    kinds = _EXPOSED_KINDS.get(value) if isinstance(value, str) else None
    if kinds is None:
        ctx.problems.append(Problem(obj, f'metadata.annotations["{SERVICE_TYPE_ANNOTATION}"]',
                                    f"expected one of {', '.join(_EXPOSED_KINDS)}; got {_show(value)}; "
                                    "every frontend is served"))
        return _ALL_KINDS
    return kinds


def _source_ranges(meta: _Meta, spec: dict[str, Any], kind: str, obj: str,
                   ctx: _Context) -> tuple[tuple[IPv4Network, ...] | None, bool]:
    """loadBalancerSourceRanges (else the beta annotation, as Kubernetes' own helper reads them) and whether
    they are a deny list: (None, False) when there are none or svcSourceRangeCheck is false (said once)."""
    field = "spec.loadBalancerSourceRanges"
    raw: Any = spec.get("loadBalancerSourceRanges")
    if not raw and isinstance(meta.annotations.get(SOURCE_RANGES_ANNOTATION), str):
        field = f'metadata.annotations["{SOURCE_RANGES_ANNOTATION}"]'
        raw = [part.strip() for part in meta.annotations[SOURCE_RANGES_ANNOTATION].split(",") if part.strip()]
    if not raw:
        return None, False
    if kind != "LoadBalancer" and not spec.get("externalIPs"):
        return None, False          # nothing it could limit (the API server clears it off other types)
    policy_field = f'metadata.annotations["{SOURCE_RANGES_POLICY_ANNOTATION}"]'
    policy = meta.annotations.get(SOURCE_RANGES_POLICY_ANNOTATION, "allow")
    if not isinstance(policy, str) or policy.lower() not in ("allow", "deny"):
        ctx.problems.append(Problem(obj, policy_field, f"expected allow or deny; got {_show(policy)}; allow is used"))
        policy = "allow"
    deny = policy.lower() == "deny"
    if not ctx.settings.source_range_check:
        ctx.notes.append(Problem(obj, field, "set but not enforced: the module setting svcSourceRangeCheck is "
                                 "false, so every client reaches this Service's LoadBalancer IPs"))
        return None, False
    try:
        entries = _list(raw, field)
    except _Invalid as bad:
        # Fail closed for an allow list: a Service that asked to be limited is never left open by a bad field.
        ctx.problems.append(Problem(obj, bad.field, bad.reason + ("; no client is admitted" if not deny
                                                                  else "; no client is refused")))
        return (None, False) if deny else ((), False)
    ranges: list[IPv4Network] = []
    for i, text in enumerate(entries):
        where = f"{field}[{i}]"
        try:
            net = ip_network(text.strip(), strict=False) if isinstance(text, str) else None
        except ValueError:
            net = None
        if net is None:
            ctx.problems.append(Problem(obj, where, f"expected a CIDR such as 203.0.113.0/24; got {_show(text)}; "
                                    "skipped"))
        elif isinstance(net, IPv6Network):
            ctx.notes.append(Problem(obj, where, f"{net}: IPv6 is not supported (IPv4 only); skipped"))
        else:
            ranges.append(net)
    if not ranges and deny:
        return None, False
    return tuple(dict.fromkeys(ranges)), deny


def _health_check(meta: _Meta, spec: dict[str, Any], obj: str, ctx: _Context) -> None:
    """An eTP Local LoadBalancer Service's healthCheckNodePort, with this node's ready endpoints (kube-proxy
    counts distinct ready addresses on the node, whatever the port)."""
    raw = spec.get("healthCheckNodePort")
    if raw is None:
        return
    try:
        port = _int(raw, "spec.healthCheckNodePort", NODEPORT_MIN, NODEPORT_MAX)
    except _Invalid as bad:
        ctx.problems.append(Problem(obj, bad.field, bad.reason + "; not served"))
        return
    local = {ep.ip for one in ctx.slices for ep in one.endpoints if ep.ready and ep.node == ctx.node_name}
    ctx.health = HealthCheck(port, meta.namespace, meta.name, len(local))   # who holds a port: the translator


def _affinity_timeout(spec: dict[str, Any]) -> int:
    """Return the ClientIP affinity timeout in seconds, 0 when the Service has no session affinity."""
    affinity = _str(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise _Invalid("spec.sessionAffinity", f"expected None or ClientIP; got {_show(affinity)}")
    config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return _int(timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT)


def _algorithm(meta: _Meta, obj: str, ctx: _Context) -> Algorithm:
    """Return the Service's algorithm annotation, else (also when invalid, with a Problem) the cluster's."""
    value = meta.annotations.get(LB_ALGORITHM_ANNOTATION)
    if value is None:
        return ctx.settings.algorithm
    if not ctx.settings.algorithm_annotation:
        ctx.problems.append(Problem(
            obj, f'metadata.annotations["{LB_ALGORITHM_ANNOTATION}"]',
            f"ignored: the module setting extraLoadBalancerAlgorithmsEnabled is false; the cluster default "
            f"{ctx.settings.algorithm.name.capitalize()} is used"))
        return ctx.settings.algorithm
    algorithm = _ALGORITHMS_BY_ANNOTATION.get(value.lower()) if isinstance(value, str) else None
    if algorithm is None:
        ctx.problems.append(Problem(
            obj, f'metadata.annotations["{LB_ALGORITHM_ANNOTATION}"]',
            f"expected random or maglev; got {_show(value)}; the cluster default "
            f"{ctx.settings.algorithm.name.capitalize()} is used"))
        return ctx.settings.algorithm
    return algorithm
