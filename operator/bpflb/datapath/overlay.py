"""The node's pod network across nodes, in netlink (pyroute2): with tunnelMode VXLAN a VXLAN device
(UDP 8472) with a static FDB, neighbour entries and routes to every other node's pod CIDRs; with
tunnelMode Disabled native routes via the other nodes (when createNodeRoutes asks for them)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import IPRoute

from bpflb.model.cluster import NetworkSettings, NodeInfo, Tunnel

log = logging.getLogger(__name__)

VXLAN_DEV = "bpflb_vxlan"
VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RTPROT_BPFLB = 178            # routes bpflb installs carry this protocol, so it removes only its own


def vtep_mac(addr: IPv4Address) -> str:
    """A node's VXLAN MAC: 0e:b1 and its underlay address (the datapath derives the same)."""
    return "0e:b1:" + ":".join(f"{b:02x}" for b in addr.packed)


def _gateway(net: IPv4Network) -> str:
    """The on-link next hop standing for a remote pod CIDR (its network address, as flannel does)."""
    return str(net.network_address)


class Overlay:
    """Applies NetworkSettings to this node's netlink state; idempotent, touching only its own objects."""

    def __init__(self, underlay_dev: str) -> None:
        self.underlay_dev = underlay_dev
        self.applied: tuple[Any, ...] | None = None
        self.told_rp_filter = False     # a strict conf.all.rp_filter said (once, until it changes)

    def _check_rp_filter(self) -> None:
        """The kernel applies max(conf.all, conf.<device>) of rp_filter: a strict conf.all (1) overrules the
        overlay device's 0. Said once per agent, not changed: the node's own setting (Deckhouse's nodes set
        0 everywhere, as Cilium asks)."""
        with open("/proc/sys/net/ipv4/conf/all/rp_filter") as f:
            strict = f.read().strip() == "1"
        if strict and not self.told_rp_filter:
            log.warning("net.ipv4.conf.all.rp_filter is 1 (strict), and the kernel applies the larger of it and "
                        "%s's 0: it drops what arrives through the overlay from addresses it routes elsewhere "
                        "(DSR requests from clients, answers from other nodes' addresses to this node's pods). "
                        "Set net.ipv4.conf.all.rp_filter to 0 or 2 (loose) on this node", VXLAN_DEV)
        self.told_rp_filter = strict

    def vxlan_ifindex(self) -> int | None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=VXLAN_DEV)
            return int(found[0]) if found else None

    def apply(self, settings: NetworkSettings, me: NodeInfo, peers: list[NodeInfo]) -> list[str]:
        """Make netlink match the settings; returns what was done (for the agent's log)."""
        key = (settings, me, tuple(peers))
        if key == self.applied:
            return []
        with IPRoute() as ipr:
            actions = (self._vxlan(ipr, settings, me, peers) if settings.tunnel is Tunnel.VXLAN
                       else self._native(ipr, settings, peers))
        self.applied = key
        return actions

    # -- VXLAN ---------------------------------------------------------------------------------
    def _vxlan(self, ipr: IPRoute, settings: NetworkSettings, me: NodeInfo, peers: list[NodeInfo]) -> list[str]:
        actions: list[str] = []
        underlay = ipr.link_lookup(ifname=self.underlay_dev)
        if not underlay:
            raise OSError(f"underlay device {self.underlay_dev} not found")
        mtu = int(ipr.get_links(underlay[0])[0].get_attr("IFLA_MTU")) - VXLAN_OVERHEAD
        idx = self._vxlan_device(ipr, settings, me, underlay[0], mtu, actions)
        with open(f"/proc/sys/net/ipv4/conf/{VXLAN_DEV}/rp_filter", "w") as f:
            f.write("0")   # decapsulated requests carry client addresses the node has no route to via the tunnel
        self._check_rp_filter()
        if me.pod_cidrs:
            own = f"{_gateway(me.pod_cidrs[0])}/32"
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
            if _gateway(me.pod_cidrs[0]) not in have:
                ipr.addr("add", index=idx, address=_gateway(me.pod_cidrs[0]), prefixlen=32)
                actions.append(f"address {own} on {VXLAN_DEV}")
        want_routes: dict[str, str] = {}
        want_fdb: dict[str, str] = {}
        want_neigh: dict[str, str] = {}
        for peer in peers:
            mac = vtep_mac(peer.addr)
            want_fdb[mac] = str(peer.addr)
            for net in peer.pod_cidrs:
                want_routes[str(net)] = _gateway(net)
                want_neigh[_gateway(net)] = mac
        have_fdb = {str(n.get_attr("NDA_LLADDR")): str(n.get_attr("NDA_DST"))
                    for n in ipr.fdb("dump", ifindex=idx) if n.get_attr("NDA_DST")}
        for mac, dst in want_fdb.items():
            if have_fdb.get(mac) != dst:
                ipr.fdb("replace", ifindex=idx, lladdr=mac, dst=dst, state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)
                actions.append(f"fdb {mac} -> {dst}")
        for mac, dst in have_fdb.items():
            if mac not in want_fdb:
                ipr.fdb("del", ifindex=idx, lladdr=mac, dst=dst, flags=NTF_SELF)
                actions.append(f"fdb {mac} removed")
        have_neigh = {str(n.get_attr("NDA_DST")): str(n.get_attr("NDA_LLADDR"))
                      for n in ipr.get_neighbours(ifindex=idx, family=2)}
        for gw, mac in want_neigh.items():
            if have_neigh.get(gw) != mac:
                ipr.neigh("replace", dst=gw, lladdr=mac, ifindex=idx, state=NUD_PERMANENT)
        for gw in set(have_neigh) - set(want_neigh):
            ipr.neigh("del", dst=gw, ifindex=idx)
        have_routes = {f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=2, oif=idx)
                       if r.get_attr("RTA_DST") and r["dst_len"] < 32}
        for dst, gw in want_routes.items():
            ipr.route("replace", dst=dst, gateway=gw, oif=idx, flags=RTNH_F_ONLINK, proto=RTPROT_BPFLB)
            if dst not in have_routes:
                actions.append(f"route {dst} via {gw} dev {VXLAN_DEV}")
        for dst in have_routes - set(want_routes):
            ipr.route("del", dst=dst, oif=idx)
            actions.append(f"route {dst} removed")
        return actions

    def _vxlan_device(self, ipr: IPRoute, settings: NetworkSettings, me: NodeInfo, underlay: int, mtu: int,
                      actions: list[str]) -> int:
        found = ipr.link_lookup(ifname=VXLAN_DEV)
        if found:
            link = ipr.get_links(found[0])[0]
            data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
            if (data.get_attr("IFLA_VXLAN_ID") == settings.vni and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT
                    and data.get_attr("IFLA_VXLAN_LOCAL") == str(me.addr)
                    and link.get_attr("IFLA_ADDRESS") == vtep_mac(me.addr)):
                return int(found[0])
            ipr.link("del", index=found[0])
            actions.append(f"{VXLAN_DEV} recreated (its parameters changed)")
        ipr.link("add", ifname=VXLAN_DEV, kind="vxlan", vxlan_id=settings.vni, vxlan_port=VXLAN_PORT,
                 vxlan_local=str(me.addr), vxlan_link=underlay, vxlan_learning=0, address=vtep_mac(me.addr),
                 mtu=mtu)
        idx = int(ipr.link_lookup(ifname=VXLAN_DEV)[0])
        ipr.link("set", index=idx, state="up")
        actions.append(f"created {VXLAN_DEV} (VNI {settings.vni}, UDP {VXLAN_PORT}, MTU {mtu}, "
                       f"VTEP {vtep_mac(me.addr)})")
        return idx

    # -- native routing ------------------------------------------------------------------------
    def _native(self, ipr: IPRoute, settings: NetworkSettings, peers: list[NodeInfo]) -> list[str]:
        actions: list[str] = []
        found = ipr.link_lookup(ifname=VXLAN_DEV)
        if found:
            ipr.link("del", index=found[0])
            actions.append(f"removed {VXLAN_DEV} and its routes (tunnelMode Disabled)")
        if settings.create_node_routes:
            for peer in peers:
                for net in peer.pod_cidrs:
                    ipr.route("replace", dst=str(net), gateway=str(peer.addr), proto=RTPROT_BPFLB)
                    actions.append(f"route {net} via {peer.addr} (native routing)")
        return actions

    def remove(self) -> list[str]:
        """Take the VXLAN device away (uninstall)."""
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=VXLAN_DEV)
            if found:
                ipr.link("del", index=found[0])
                return [f"removed {VXLAN_DEV}"]
        return []
