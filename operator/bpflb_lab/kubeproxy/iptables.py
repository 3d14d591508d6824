"""kube-proxy's iptables mode for one node, as `iptables-restore` input.

The layout is kube-proxy's (pkg/proxy/iptables/proxier.go, v1.28+): in the nat table KUBE-SERVICES
matches every clusterIP, externalIP and LoadBalancer IP one rule at a time and ends in KUBE-NODEPORTS
for local destinations; each Service port has a KUBE-SVC-<hash> chain that picks an endpoint with
`-m statistic --mode random --probability 1/n` rules, each endpoint a KUBE-SEP-<hash> chain with its
DNAT, external traffic goes through KUBE-EXT-<hash> (masquerade mark, or eTP Local's KUBE-SVL-<hash>
of this node's endpoints), and KUBE-POSTROUTING masquerades what KUBE-MARK-MASQ marked. The filter
table REJECTs Services without endpoints and DROPs eTP Local traffic on nodes without a local one.
Chain hashes are kube-proxy's: base32 of SHA-256, 16 characters.

Rules are written the way `iptables-save` prints them (what one sees on a kube-proxy node), so the
output is what iptables-restore reads and iptables-save gives back, rule for rule. Every table is
complete (built-in chains and the jumps into KUBE-* included): it replaces the node's filter and
nat tables when loaded without --noflush.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from bpflb_lab.kubeproxy.model import Endpoint, NodeView, ServicePort, policy, service_order

MASQ_MARK = "0x4000"


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(sp: ServicePort) -> str:
    """KUBE-SVC-<hash>: the Cluster-policy endpoints of a Service port."""
    return "KUBE-SVC-" + _hash16(sp.key + sp.protocol)


def svl_chain(sp: ServicePort) -> str:
    """KUBE-SVL-<hash>: the Local-policy endpoints (this node's) of a Service port."""
    return "KUBE-SVL-" + _hash16(sp.key + sp.protocol)


def ext_chain(sp: ServicePort) -> str:
    """KUBE-EXT-<hash>: where NodePort, externalIP and LoadBalancer traffic of a Service port goes."""
    return "KUBE-EXT-" + _hash16(sp.key + sp.protocol)


def sep_chain(sp: ServicePort, ep: Endpoint) -> str:
    """KUBE-SEP-<hash>: one endpoint of a Service port (its DNAT)."""
    return "KUBE-SEP-" + _hash16(sp.key + sp.protocol + str(ep))


def probability(n: int) -> str:
    """The statistic match's probability for a rule with n endpoints left, as iptables-save prints it."""
    return f"{1.0 / n:.11f}"


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


@dataclass
class Ruleset:
    """The rendered tables and a few counts (for tests and the benchmark's progress lines)."""

    text: str
    nat_chains: int = 0
    nat_rules: int = 0
    filter_rules: int = 0
    chains: dict[str, list[str]] = field(default_factory=dict)   # nat chain -> its rules ("-A ..." lines)


class _Table:
    def __init__(self, name: str, builtins: tuple[str, ...]) -> None:
        self.name = name
        self.builtins = builtins
        self.chains: dict[str, list[str]] = {b: [] for b in builtins}

    def add(self, chain: str, rule: str) -> None:
        self.chains.setdefault(chain, []).append(f"-A {chain} {rule}")

    def declare(self, chain: str) -> None:
        self.chains.setdefault(chain, [])

    def render(self) -> list[str]:
        lines = [f"*{self.name}"]
        lines += [f":{c} ACCEPT [0:0]" for c in self.builtins]
        lines += [f":{c} - [0:0]" for c in sorted(c for c in self.chains if c not in self.builtins)]
        for chain in [*self.builtins, *sorted(c for c in self.chains if c not in self.builtins)]:
            lines += self.chains[chain]
        lines.append("COMMIT")
        return lines


def _match(sp: ServicePort, dst: str | None, dport: int, comment: str) -> str:
    """`[-d IP/32] -p proto -m comment --comment "..." -m proto --dport N`, in iptables-save order."""
    where = f"-d {dst}/32 " if dst else ""
    return f"{where}-p {sp.protocol} {_comment(comment)} -m {sp.protocol} --dport {dport}"


def render(view: NodeView) -> Ruleset:
    """The iptables-restore input kube-proxy's iptables mode would load on view.node_name."""
    nat = _Table("nat", ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"))
    flt = _Table("filter", ("INPUT", "FORWARD", "OUTPUT"))
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"):
        nat.declare(chain)
    for chain in ("KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL",
                  "KUBE-SERVICES"):
        flt.declare(chain)

    new = "-m conntrack --ctstate NEW"
    flt.add("INPUT", f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL')
    flt.add("INPUT", '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS')
    flt.add("INPUT", f'{new} -m comment --comment "kubernetes externally-visible service portals" '
                     "-j KUBE-EXTERNAL-SERVICES")
    flt.add("FORWARD", f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL')
    flt.add("FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD')
    flt.add("FORWARD", f'{new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES')
    flt.add("FORWARD", f'{new} -m comment --comment "kubernetes externally-visible service portals" '
                       "-j KUBE-EXTERNAL-SERVICES")
    flt.add("OUTPUT", f'{new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL')
    flt.add("OUTPUT", f'{new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES')
    flt.add("KUBE-FORWARD", "-m conntrack --ctstate INVALID -j DROP")
    flt.add("KUBE-FORWARD", f'-m comment --comment "kubernetes forwarding rules" -m mark --mark '
                            f"{MASQ_MARK}/{MASQ_MARK} -j ACCEPT")
    flt.add("KUBE-FORWARD", '-m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
                            "--ctstate RELATED,ESTABLISHED -j ACCEPT")

    nat.add("PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES')
    nat.add("OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES')
    nat.add("POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING')
    nat.add("KUBE-MARK-MASQ", f"-j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}")
    nat.add("KUBE-POSTROUTING", f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN")
    nat.add("KUBE-POSTROUTING", f"-j MARK --set-xmark {MASQ_MARK}/0x0")
    nat.add("KUBE-POSTROUTING", '-m comment --comment "kubernetes service traffic requiring SNAT" '
                                "-j MASQUERADE --random-fully")

    for sp in service_order(view.service_ports):
        _service_port(sp, view.local_cidr, nat, flt)

    nat.add("KUBE-SERVICES", '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
                             'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    lines = flt.render() + nat.render()
    kube_nat = {c: r for c, r in nat.chains.items() if c not in nat.builtins}
    return Ruleset("\n".join(lines) + "\n", nat_chains=len(kube_nat),
                   nat_rules=sum(len(r) for r in nat.chains.values()),
                   filter_rules=sum(len(r) for r in flt.chains.values()), chains=nat.chains)


def _service_port(sp: ServicePort, local_cidr: str | None, nat: _Table, flt: _Table) -> None:
    pol = policy(sp)
    cat, uses_cluster, uses_local, uses_ext = pol.cat, pol.uses_cluster, pol.uses_local, pol.uses_ext
    has_internal, has_external = pol.has_internal, pol.has_external
    key = sp.key
    svc, svl, ext = svc_chain(sp), svl_chain(sp), ext_chain(sp)
    internal_chain = svl if sp.internal_local else svc
    external_policy_chain = svl if sp.external_local else svc

    internal_target = external_target = "REJECT --reject-with icmp-port-unreachable"
    internal_comment = external_comment = f"{key} has no endpoints"
    if cat.has_endpoints:
        if not has_internal:
            internal_target, internal_comment = "DROP", f"{key} has no local endpoints"
        if not has_external:
            external_target, external_comment = "DROP", f"{key} has no local endpoints"

    # Capture the clusterIP, the externalIPs, the LoadBalancer IPs and the nodePort.
    if has_internal:
        nat.add("KUBE-SERVICES", f"{_match(sp, sp.cluster_ip, sp.port, f'{key} cluster IP')} -j {internal_chain}")
    else:
        flt.add("KUBE-SERVICES", f"{_match(sp, sp.cluster_ip, sp.port, internal_comment)} -j {internal_target}")
    for ip in sp.external_ips:
        if cat.has_endpoints:
            nat.add("KUBE-SERVICES", f"{_match(sp, ip, sp.port, f'{key} external IP')} -j {ext}")
        if not has_external:
            flt.add("KUBE-EXTERNAL-SERVICES", f"{_match(sp, ip, sp.port, external_comment)} -j {external_target}")
    for ip in sp.lb_ips:
        if cat.has_endpoints:
            nat.add("KUBE-SERVICES", f"{_match(sp, ip, sp.port, f'{key} loadbalancer IP')} -j {ext}")
        if not has_external:
            flt.add("KUBE-EXTERNAL-SERVICES", f"{_match(sp, ip, sp.port, external_comment)} -j {external_target}")
    if sp.node_port:
        if cat.has_endpoints:
            nat.add("KUBE-NODEPORTS", f"-p {sp.protocol} {_comment(key)} -m {sp.protocol} --dport {sp.node_port} "
                                      f"-j {ext}")
        if not has_external:
            flt.add("KUBE-EXTERNAL-SERVICES", f"-p {sp.protocol} {_comment(external_comment)} -m addrtype "
                                              f"--dst-type LOCAL -m {sp.protocol} --dport {sp.node_port} "
                                              f"-j {external_target}")
    if sp.health_check_node_port:
        flt.add("KUBE-NODEPORTS", f"-p tcp {_comment(f'{key} health check node port')} -m tcp --dport "
                                  f"{sp.health_check_node_port} -j ACCEPT")

    # Internal traffic from outside the local pods is masqueraded (detect-local).
    if has_internal and local_cidr:
        nat.add(internal_chain, f"! -s {local_cidr} {_match(sp, sp.cluster_ip, sp.port, f'{key} cluster IP')} "
                                "-j KUBE-MARK-MASQ")

    if uses_ext:
        nat.declare(ext)
        if not sp.external_local:
            nat.add(ext, f'-m comment --comment "masquerade traffic for {key} external destinations" '
                         "-j KUBE-MARK-MASQ")
        else:
            if local_cidr:
                nat.add(ext, f'-s {local_cidr} -m comment --comment "pod traffic for {key} external destinations" '
                             f"-j {svc}")
            nat.add(ext, f'-m comment --comment "masquerade LOCAL traffic for {key} external destinations" '
                         "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
            nat.add(ext, f'-m comment --comment "route LOCAL traffic for {key} external destinations" '
                         f"-m addrtype --src-type LOCAL -j {svc}")
        if has_external:
            nat.add(ext, f"-j {external_policy_chain}")

    if uses_cluster:
        nat.declare(svc)
        _to_endpoints(sp, svc, cat.cluster, nat)
    if uses_local:
        nat.declare(svl)
        _to_endpoints(sp, svl, cat.local, nat)
    for ep in cat.reachable:
        sep = sep_chain(sp, ep)
        nat.add(sep, f"-s {ep.ip}/32 {_comment(key)} -j KUBE-MARK-MASQ")
        recent = f" -m recent --set --name {sep} --mask 255.255.255.255 --rsource" if sp.affinity_timeout else ""
        nat.add(sep, f"-p {sp.protocol} {_comment(key)}{recent} -m {sp.protocol} -j DNAT --to-destination {ep}")


def _to_endpoints(sp: ServicePort, chain: str, endpoints: list[Endpoint], nat: _Table) -> None:
    """Session affinity first, then one statistic rule per endpoint (the last one matches always)."""
    if sp.affinity_timeout:
        for ep in endpoints:
            sep = sep_chain(sp, ep)
            nat.add(chain, f'-m comment --comment "{sp.key} -> {ep}" -m recent --rcheck --seconds '
                           f"{sp.affinity_timeout} --reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}")
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        stat = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        nat.add(chain, f'-m comment --comment "{sp.key} -> {ep}"{stat} -j {sep_chain(sp, ep)}')
