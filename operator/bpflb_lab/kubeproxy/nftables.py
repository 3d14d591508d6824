"""kube-proxy's nftables mode for one node, as `nft -f` input.

The layout is kube-proxy's (pkg/proxy/nftables/proxier.go, v1.31): one `table ip kube-proxy` whose
`services` chain does two verdict-map lookups, `service-ips` (clusterIP, externalIP and LoadBalancer
IP . protocol . port) and, for local destinations, `service-nodeports` (protocol . port), so the cost
of finding a Service does not grow with their number. Each Service port has a
service-<hash>-<ns>/<name>/<proto>/<port> chain picking an endpoint with `numgen random mod N vmap`,
each endpoint an endpoint-<hash>-...__<ip>/<port> chain with its dnat, external traffic an
external-<hash>-... chain (or local-<hash>-... for eTP Local), `mark-for-masquerade` and
`masquerading` do the SNAT, and `no-endpoint-services` / `no-endpoint-nodeports` reject or drop in the
filter hooks. Chain names are kube-proxy's: 8 base32 characters of the SHA-256 of the rest.

The script starts by creating and deleting the table, so loading it replaces whatever kube-proxy table
the node had (as kube-proxy's own full resync does) and leaves every other table alone.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from bpflb_lab.kubeproxy.model import Endpoint, NodeView, ServicePort, policy, service_order

TABLE = "kube-proxy"
MASQ_MARK = "0x4000"
_Rule = Callable[[str, str], None]    # adds one rule to a chain
CHAIN_BASE_MAX = 200      # longest chain name base before its prefix (nft allows 256 characters)


def _hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: the name prefixed with 8 base32 characters of its SHA-256, cut to
    CHAIN_BASE_MAX characters (ending in "...") when longer."""
    named = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8] + "-" + name
    return named if len(named) <= CHAIN_BASE_MAX else named[:CHAIN_BASE_MAX - 3] + "..."


def _base(sp: ServicePort) -> str:
    """kube-proxy's servicePortChainNameBase: HASH-namespace/name/protocol/portname."""
    return _hash_and_truncate(f"{sp.namespace}/{sp.name}/{sp.protocol}/{sp.port_name}")


def service_chain(sp: ServicePort) -> str:
    """service-...: the Cluster-policy endpoints of a Service port."""
    return "service-" + _base(sp)


def local_chain(sp: ServicePort) -> str:
    """local-...: the Local-policy endpoints (this node's) of a Service port."""
    return "local-" + _base(sp)


def external_chain(sp: ServicePort) -> str:
    """external-...: where NodePort, externalIP and LoadBalancer traffic of a Service port goes."""
    return "external-" + _base(sp)


def _endpoint_base(sp: ServicePort, ep: Endpoint) -> str:
    """kube-proxy's servicePortEndpointChainNameBase: HASH-namespace/name/protocol/portname__ip/port."""
    return _hash_and_truncate(f"{sp.namespace}/{sp.name}/{sp.protocol}/{sp.port_name}__{ep.ip}/{ep.port}")


def endpoint_chain(sp: ServicePort, ep: Endpoint) -> str:
    """endpoint-...: one endpoint of a Service port (its dnat)."""
    return "endpoint-" + _endpoint_base(sp, ep)


def affinity_set(sp: ServicePort, ep: Endpoint) -> str:
    """affinity-...: the clients an endpoint had recently (sessionAffinity ClientIP)."""
    return "affinity-" + _endpoint_base(sp, ep)


def _q(name: str) -> str:
    """Chain and set names go unquoted, as kube-proxy writes them: nft's identifiers may hold '/', '.', '_'
    and '-', and nft 1.0 refuses quoted chain names."""
    return name


@dataclass
class Ruleset:
    """The rendered script and what it holds."""

    text: str
    chains: int
    service_ips: int          # elements of the service-ips verdict map
    service_nodeports: int    # elements of the service-nodeports verdict map
    no_endpoint: int          # elements of no-endpoint-services + no-endpoint-nodeports


def render(view: NodeView) -> Ruleset:
    """The nft script kube-proxy's nftables mode would load on view.node_name."""
    t = f"ip {TABLE}"
    head = [f"add table {t} {{ comment \"rules for kube-proxy\" ; }}", f"delete table {t}",
            f"add table {t} {{ comment \"rules for kube-proxy\" ; }}"]
    chains: dict[str, list[str]] = {}
    base_chains = {
        "filter-prerouting": "type filter hook prerouting priority -110 ;",
        "filter-input": "type filter hook input priority -110 ;",
        "filter-forward": "type filter hook forward priority -110 ;",
        "filter-output": "type filter hook output priority -110 ;",
        "filter-output-post-dnat": "type filter hook output priority -90 ;",
        "nat-prerouting": "type nat hook prerouting priority -100 ;",
        "nat-output": "type nat hook output priority -100 ;",
        "nat-postrouting": "type nat hook postrouting priority 100 ;",
    }
    sets = [
        f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}',
        (f'add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; '
        f'comment "vmap to drop or reject packets to services with no endpoints" ; }}'),
        (f'add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; '
        f'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}'),
        (f'add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; '
        f'comment "destinations that are subject to LoadBalancerSourceRanges" ; }}'),
        (f'add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; '
        f'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}'),
        (f'add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; '
        f'comment "NodePort traffic" ; }}'),
    ]

    def rule(chain: str, text: str) -> None:
        chains.setdefault(chain, []).append(text)

    new = "ct state new"
    rule("filter-prerouting", f"{new} jump firewall-check")
    rule("filter-input", f"{new} jump nodeport-endpoints-check")
    rule("filter-input", f"{new} jump service-endpoints-check")
    rule("filter-forward", f"{new} jump service-endpoints-check")
    rule("filter-forward", f"{new} jump cluster-ips-check")
    rule("filter-output", f"{new} jump service-endpoints-check")
    rule("filter-output", f"{new} jump firewall-check")
    rule("filter-output-post-dnat", f"{new} jump cluster-ips-check")
    rule("nat-prerouting", "jump services")
    rule("nat-output", "jump services")
    rule("nat-postrouting", "jump masquerading")
    rule("firewall-check", "ip daddr . meta l4proto . th dport vmap @firewall-ips")
    rule("nodeport-endpoints-check", "ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport "
                                     "vmap @no-endpoint-nodeports")
    rule("service-endpoints-check", "ip daddr . meta l4proto . th dport vmap @no-endpoint-services")
    rule("cluster-ips-check", 'ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"')
    rule("mark-for-masquerade", f"mark set mark or {MASQ_MARK}")
    rule("masquerading", f"mark and {MASQ_MARK} == 0 return")
    rule("masquerading", f"mark set mark xor {MASQ_MARK}")
    rule("masquerading", "masquerade fully-random")
    rule("services", "ip daddr . meta l4proto . th dport vmap @service-ips")
    rule("services", "ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @service-nodeports")
    rule("reject-chain", "reject")

    elements: dict[str, list[str]] = {"cluster-ips": [], "service-ips": [], "service-nodeports": [],
                                      "no-endpoint-services": [], "no-endpoint-nodeports": []}
    affinity_sets: list[str] = []
    cluster_ips: set[str] = set()
    for sp in service_order(view.service_ports):
        _service_port(sp, view.local_cidr, rule, elements, affinity_sets, cluster_ips)
    elements["cluster-ips"] = sorted(cluster_ips)

    lines = list(head)
    for name, spec in base_chains.items():
        lines.append(f"add chain {t} {name} {{ {spec} }}")
    lines += sets + [f"add set {t} {a}" for a in affinity_sets]
    for name in chains:
        if name not in base_chains:
            lines.append(f"add chain {t} {_q(name)}")
    for name, rules in chains.items():
        lines += [f"add rule {t} {_q(name)} {r}" for r in rules]
    for name, elems in elements.items():
        for i in range(0, len(elems), 1000):      # nft parses huge element lists faster in chunks
            lines.append(f"add element {t} {name} {{ {', '.join(elems[i:i + 1000])} }}")
    return Ruleset("\n".join(lines) + "\n", chains=len(chains) + len(base_chains),
                   service_ips=len(elements["service-ips"]), service_nodeports=len(elements["service-nodeports"]),
                   no_endpoint=len(elements["no-endpoint-services"]) + len(elements["no-endpoint-nodeports"]))


def _service_port(sp: ServicePort, local_cidr: str | None, rule: _Rule, elements: dict[str, list[str]],
                  affinity_sets: list[str], cluster_ips: set[str]) -> None:
    pol = policy(sp)
    cat, uses_cluster, uses_local, uses_ext = pol.cat, pol.uses_cluster, pol.uses_local, pol.uses_ext
    has_internal, has_external = pol.has_internal, pol.has_external
    svc, loc, ext = service_chain(sp), local_chain(sp), external_chain(sp)
    internal_chain = loc if sp.internal_local else svc
    external_policy_chain = loc if sp.external_local else svc
    comment = f'comment "{sp.key}"'
    internal_verdict = external_verdict = "goto reject-chain"
    if cat.has_endpoints:
        if not has_internal:
            internal_verdict = "drop"
        if not has_external:
            external_verdict = "drop"
    proto = sp.protocol

    cluster_ips.add(sp.cluster_ip)
    if has_internal:
        elements["service-ips"].append(f"{sp.cluster_ip} . {proto} . {sp.port} : goto {_q(internal_chain)}")
    else:
        elements["no-endpoint-services"].append(f"{sp.cluster_ip} . {proto} . {sp.port} {comment} : "
                                                f"{internal_verdict}")
    for ip in (*sp.external_ips, *sp.lb_ips):
        if uses_ext:
            elements["service-ips"].append(f"{ip} . {proto} . {sp.port} : goto {_q(ext)}")
        if not has_external:
            elements["no-endpoint-services"].append(f"{ip} . {proto} . {sp.port} {comment} : {external_verdict}")
    if sp.node_port:
        if uses_ext:
            elements["service-nodeports"].append(f"{proto} . {sp.node_port} : goto {_q(ext)}")
        if not has_external:
            elements["no-endpoint-nodeports"].append(f"{proto} . {sp.node_port} {comment} : {external_verdict}")

    if uses_cluster:
        if local_cidr:
            rule(svc, f"ip daddr {sp.cluster_ip} {proto} dport {sp.port} ip saddr != {local_cidr} "
                      "jump mark-for-masquerade")
        _to_endpoints(sp, svc, cat.cluster, rule)
    if uses_local:
        _to_endpoints(sp, loc, cat.local, rule)
    if uses_ext:
        if not sp.external_local:
            rule(ext, 'jump mark-for-masquerade comment "masquerade"')
        else:
            if local_cidr:
                rule(ext, f'ip saddr {local_cidr} goto {_q(svc)} comment "short-circuit pod traffic"')
            rule(ext, 'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"')
            rule(ext, f'fib saddr type local goto {_q(svc)} comment "short-circuit local traffic"')
        if has_external:
            rule(ext, f"goto {_q(external_policy_chain)}")
    for ep in cat.reachable:
        chain = endpoint_chain(sp, ep)
        rule(chain, f"ip saddr {ep.ip} jump mark-for-masquerade")
        if sp.affinity_timeout:
            rule(chain, f"update @{_q(affinity_set(sp, ep))} {{ ip saddr }}")
            affinity_sets.append(f"{_q(affinity_set(sp, ep))} {{ type ipv4_addr ; flags dynamic,timeout ; "
                                 f"timeout {sp.affinity_timeout}s ; }}")
        rule(chain, f"meta l4proto {proto} dnat to {ep}")


def _to_endpoints(sp: ServicePort, chain: str, endpoints: list[Endpoint], rule: _Rule) -> None:
    """Affinity first (a client seen recently goes back to its endpoint), then a random pick."""
    if sp.affinity_timeout:
        for ep in endpoints:
            rule(chain, f"ip saddr @{_q(affinity_set(sp, ep))} goto {_q(endpoint_chain(sp, ep))}")
    picks = ", ".join(f"{i} : goto {_q(endpoint_chain(sp, ep))}" for i, ep in enumerate(endpoints))
    rule(chain, f"numgen random mod {len(endpoints)} vmap {{ {picks} }}")
