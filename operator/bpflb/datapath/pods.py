"""Finding this node's pods' host-side veths (where the pod-facing tc path attaches) and noticing new ones.

A pod's host-side device is a veth whose peer lives in another network namespace (IFLA_LINK_NETNSID) and
that leads to this node's pod CIDR: either it is a port of a bridge holding an address inside the pod CIDR
(bridge CNIs: cni0 with the pods' gateway, as the lab and flannel/bridge plugins do), or a route to an
address inside the pod CIDR goes out of it (routed CNIs: Calico's cali*, Cilium's lxc*, a /32 per pod).
Names are not trusted: the node's external device and a veth to anything else (another node, a
container outside the pod network) never match.  The agent re-scans on every sync and whenever the kernel
announces a link, address or route change (a netlink subscription, polled without blocking), so a new pod
gets the path as soon as its veth is wired, whether or not its Services changed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RT_TABLE_LOCAL = 255


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _veths(links: Iterable[Any]) -> dict[int, str]:
    """The veths among links whose peer lives in another network namespace, {ifindex: name}."""
    return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links
            if _kind(link) == "veth" and link.get_attr("IFLA_LINK_NETNSID") is not None}


def _in(addr: str | None, nets: Iterable[IPv4Network]) -> bool:
    if addr is None:
        return False
    try:
        ip = IPv4Address(addr)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def pod_devices(pod_cidrs: Iterable[IPv4Network], exclude: Iterable[int] = ()) -> dict[int, str]:
    """The host-side veths of this node's pods, {ifindex: name}, in the calling thread's namespace."""
    from pyroute2 import IPRoute

    nets = list(pod_cidrs)
    if not nets:
        return {}
    skip = set(exclude)
    with IPRoute() as ipr:
        links = ipr.get_links()
        veths = {i: name for i, name in _veths(links).items() if i not in skip}
        bridges = {int(link["index"]) for link in links if _kind(link) == "bridge"}
        gateways = {int(a["index"]) for a in ipr.get_addr(family=socket.AF_INET)
                    if int(a["index"]) in bridges and _in(a.get_attr("IFA_ADDRESS"), nets)}
        found = {idx for idx, link in ((int(link["index"]), link) for link in links)
                 if idx in veths and link.get_attr("IFLA_MASTER") in gateways}
        for route in ipr.route("dump", family=socket.AF_INET):      # every table
            oif = route.get_attr("RTA_OIF")
            if oif in veths and route.get_attr("RTA_TABLE") != RT_TABLE_LOCAL and \
                    _in(route.get_attr("RTA_DST"), nets):
                found.add(int(oif))
    return {idx: veths[idx] for idx in sorted(found)}


def veth_devices(exclude: Iterable[str] = ()) -> dict[int, str]:
    """Every veth whose peer is in another namespace, {ifindex: name}, but those named in exclude (what
    uninstall searches: a pod gone from the pod CIDR's routes may still carry the path)."""
    from pyroute2 import IPRoute

    skip = set(exclude)
    with IPRoute() as ipr:
        return {i: name for i, name in _veths(ipr.get_links()).items() if name not in skip}


class LinkWatch:
    """The kernel's announcements of link, address and route changes in this namespace, read without
    blocking: changed() is True when any came since the last call (or some were lost: an overrun)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))

    def changed(self) -> bool:
        seen = False
        while True:
            try:
                if not self.sock.recv(1 << 16):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError:          # ENOBUFS: events were dropped; something changed
                seen = True

    def close(self) -> None:
        self.sock.close()
