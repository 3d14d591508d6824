"""The lab's address plan and the wiring of its namespaces: a fabric bridge joining a client and N nodes,
and per node a cni0 bridge with one namespace per pod (native routing between the pod CIDRs).

Nothing here touches the root network namespace: every link is created inside a lab namespace, and veth
peers are created directly in their target namespace.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network

from bpflb_lab.lab import netns
from bpflb_lab.lab.errors import LabError

FABRIC_NET = IPv4Network("198.18.0.0/24")
CLIENT_IP = IPv4Address("198.18.0.100")
LB_NET = IPv4Network("198.18.1.0/24")  # LoadBalancer / external IPs, routed by the client via node1
LB_POOL_FIRST = 10                      # first host number the lab hands out in LB_NET
LB_GATEWAY_NODE = 1
POD_NET = IPv4Network("10.244.0.0/16")
SERVICE_NET = IPv4Network("10.96.0.0/12")  # clusterIPs: routed nowhere, reachable only through the datapath
POD_FIRST = 10                          # pods on node K get 10.244.K.10, .11, ...
MAX_NODES = 50
DEVICE = "eth0"                         # the device of every host on its network (node, client, pod)

_LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


@dataclass(frozen=True)
class Host:
    """One lab machine: the fabric switch, the client, a node or a pod."""

    name: str           # fabric, client, node1.., or the pod's name
    role: str           # fabric | client | node | pod
    netns: str
    ip: str | None      # its address on its network (None for the fabric)
    device: str         # the device carrying that address (br0 for the fabric)
    node: str | None = None  # for pods: the node the pod runs on

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def validate_lab_name(name: str) -> None:
    """Lab names become namespace-name prefixes; refuse names that could be confused with another lab's."""
    if not _LAB_NAME.match(name):
        raise LabError(f"lab name {name!r}: use 1-40 lower-case letters, digits and '-', "
                       "starting and ending with a letter or digit")
    if "-pod-" in name or name.endswith("-pod"):
        raise LabError(f"lab name {name!r}: must not contain '-pod-' or end in '-pod' "
                       "(it would look like a pod namespace of another lab)")


def node_name(k: int) -> str:
    return f"node{k}"


def node_index(name: str) -> int | None:
    """K for 'nodeK', None for anything else."""
    m = re.fullmatch(r"node([1-9][0-9]*)", name)
    return int(m.group(1)) if m else None


def node_ip(k: int) -> IPv4Address:
    return FABRIC_NET.network_address + 10 + k


def pod_cidr(k: int) -> IPv4Network:
    return IPv4Network(f"10.244.{k}.0/24")


def bridge_mac(k: int) -> str:
    """node K's cni0 MAC, fixed as a CNI fixes its bridge's: a Linux bridge left to itself takes its lowest
    port's MAC, so pods coming and going would change it, and the kernel flushes a device's neighbours
    when its MAC changes (which would hide a stale neighbour entry behind a replaced pod)."""
    return f"02:62:6c:62:{k:02x}:01"


def pod_gateway(k: int) -> IPv4Address:
    return pod_cidr(k).network_address + 1


def pod_ip(k: int, i: int) -> IPv4Address:
    """The i-th pod address on node k (i from 0)."""
    if not 0 <= i <= 254 - POD_FIRST:
        raise LabError(f"node{k} has no free pod address left in {pod_cidr(k)}")
    return pod_cidr(k).network_address + POD_FIRST + i


def receiving_node(addr: IPv4Address, nodes: int) -> int | None:
    """Which node a packet from the client to addr enters the cluster through (None: not routable)."""
    for k in range(1, nodes + 1):
        if addr == node_ip(k):
            return k
    if addr in LB_NET:
        return LB_GATEWAY_NODE
    return None


def ns_name(lab: str, host: str) -> str:
    """Namespace of a fixed host (fabric, client, nodeK)."""
    return f"{lab}-{host}"


def pod_ns_name(lab: str, namespace: str, pod: str) -> str:
    """Namespace of a pod: LAB-pod-NAME, or LAB-pod-NAMESPACE_NAME outside the default namespace."""
    return f"{lab}-pod-{pod}" if namespace == "default" else f"{lab}-pod-{namespace}_{pod}"


def pod_veth(namespace: str, pod: str) -> str:
    """The node-side veth of a pod (15 characters at most, stable for the pod)."""
    return "veth" + hashlib.sha1(f"{namespace}/{pod}".encode()).hexdigest()[:8]


def lab_netns_regex(lab: str) -> re.Pattern[str]:
    """Matches exactly the namespaces of lab (not those of a lab whose name merely starts the same)."""
    return re.compile(rf"^{re.escape(lab)}-(fabric|client|control-plane|node[1-9][0-9]*|pod-.+)$")


def lab_namespaces(lab: str) -> list[str]:
    """The existing namespaces that belong to lab, found by name (works after a crash)."""
    pattern = lab_netns_regex(lab)
    return [n for n in netns.list_netns() if pattern.match(n)]


def base_hosts(lab: str, nodes: int) -> list[Host]:
    hosts = [Host("fabric", "fabric", ns_name(lab, "fabric"), None, "br0"),
             Host("client", "client", ns_name(lab, "client"), str(CLIENT_IP), DEVICE)]
    hosts += [Host(node_name(k), "node", ns_name(lab, node_name(k)), str(node_ip(k)), DEVICE)
              for k in range(1, nodes + 1)]
    return hosts


_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6?": "1", "net.ipv6.conf.default.disable_ipv6?": "1"}
_NO_BRIDGE_NF = {f"net.bridge.bridge-nf-call-{t}?": "0" for t in ("iptables", "ip6tables", "arptables")}
_NODE_BEFORE_LINKS = {
    **_NO_IPV6, **_NO_BRIDGE_NF,
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.conf.all.send_redirects": "0", "net.ipv4.conf.default.send_redirects": "0",
}
_NODE_AFTER_LINKS = {f"net.ipv4.conf.{DEVICE}.rp_filter": "0", f"net.ipv4.conf.{DEVICE}.send_redirects": "0"}


def create_base(lab: str, nodes: int, native_routes: bool = True) -> None:
    """Create and wire the fabric, the client and nodes 1..N (no pods).  native_routes: routes to the
    other nodes' pod CIDRs via the underlay (tunnelMode Disabled); with VXLAN the agents build the
    overlay and the underlay never learns a pod address."""
    fabric, client = ns_name(lab, "fabric"), ns_name(lab, "client")
    node_ns = [ns_name(lab, node_name(k)) for k in range(1, nodes + 1)]
    netns.add_netns([fabric, client, *node_ns])
    # Defaults first, so that the devices created below inherit them (no IPv6 chatter, no bridge netfilter).
    netns.write_sysctls(fabric, {**_NO_IPV6, **_NO_BRIDGE_NF})
    netns.write_sysctls(client, _NO_IPV6)
    for ns in node_ns:
        netns.write_sysctls(ns, _NODE_BEFORE_LINKS)

    cmds = ["link add br0 type bridge", "link set br0 up"]
    for host, peer_ns in [("client", client), *((node_name(k), node_ns[k - 1]) for k in range(1, nodes + 1))]:
        cmds += [f"link add {host} type veth peer name {DEVICE} netns {peer_ns}",
                 f"link set {host} master br0", f"link set {host} up"]
    netns.ip_batch(fabric, cmds)

    prefix = FABRIC_NET.prefixlen
    netns.ip_batch(client, [f"addr add {CLIENT_IP}/{prefix} dev {DEVICE}", f"link set {DEVICE} up",
                            f"route add {LB_NET} via {node_ip(LB_GATEWAY_NODE)}"])
    for k in range(1, nodes + 1):
        cidr = pod_cidr(k)
        cmds = [f"addr add {node_ip(k)}/{prefix} dev {DEVICE}", f"link set {DEVICE} up",
                f"link add cni0 address {bridge_mac(k)} type bridge",
                f"addr add {pod_gateway(k)}/{cidr.prefixlen} dev cni0",
                "link set cni0 up"]
        if native_routes:
            cmds += [f"route add {pod_cidr(j)} via {node_ip(j)}" for j in range(1, nodes + 1) if j != k]
        netns.ip_batch(node_ns[k - 1], cmds)
        netns.write_sysctls(node_ns[k - 1], _NODE_AFTER_LINKS)


POD_MTU = {"Disabled": 1500, "VXLAN": 1450}   # the overlay costs 50 bytes; a CNI sizes pods for it


def create_pod(lab: str, node_k: int, pod_ns: str, veth: str, addr: IPv4Address, mtu: int = 1500,
               full_checksums: bool = False) -> None:
    """Create a pod namespace on node K: eth0 with addr and mtu, default route via the node's cni0.
    full_checksums: the pod computes its own checksums (see prepare_for_xdp)."""
    node_ns = ns_name(lab, node_name(node_k))
    if not netns.netns_exists(node_ns):
        raise LabError(f"node namespace {node_ns} does not exist")
    netns.add_netns([pod_ns])
    netns.write_sysctls(pod_ns, _NO_IPV6)
    # Both ends of the veth get the pod's MTU, as a CNI sets them: the node's route to the pod (cni0, whose MTU
    # follows its ports') then says what fits, and the node fragments or answers rather than the veth dropping.
    netns.ip_batch(node_ns, [f"link add {veth} mtu {mtu} type veth peer name {DEVICE} netns {pod_ns}",
                             f"link set {veth} master cni0", f"link set {veth} up"])
    netns.ip_batch(pod_ns, [f"addr add {addr}/{pod_cidr(node_k).prefixlen} dev {DEVICE}",
                            f"link set {DEVICE} mtu {mtu}", f"link set {DEVICE} up",
                            f"route add default via {pod_gateway(node_k)}"])
    if full_checksums:
        netns.run(netns.nsenter_argv(pod_ns, ["ethtool", "-K", DEVICE, "tx", "off"]))


def prepare_for_xdp(lab: str, nodes: int) -> None:
    """What a physical network gives XDP for free, the lab's veths must be asked for: the fabric end
    of every node's veth runs a pass-through XDP program (veth delivers XDP_TX frames only to a peer
    with NAPI, and GRO-based NAPI was seen holding them back), and hosts send complete checksums
    (tx checksumming off: veth would otherwise hand XDP partial ones, as no NIC would; pods get the
    same in create_pod)."""
    from bpflb.datapath.libbpf import objects_dir

    fabric = ns_name(lab, "fabric")
    xdp_pass = str(objects_dir() / "bpf_xdp_pass.o")
    for host in ["client", *(node_name(k) for k in range(1, nodes + 1))]:
        netns.run(["ip", "-n", fabric, "link", "set", "dev", host, "xdpdrv", "obj", xdp_pass, "sec", "xdp"])
        netns.run(netns.nsenter_argv(ns_name(lab, host), ["ethtool", "-K", DEVICE, "tx", "off"]))
