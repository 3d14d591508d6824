"""Unit tests of the Python side of forwarding safety: which (frontend, backend) pairs a node accepts DSR
requests for (bpflb.model.cluster), and which rtnetlink messages the neighbour hygiene acts on
(bpflb.datapath.neighbours.parse_events, on messages built byte by byte as the kernel sends them)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from bpflb.datapath.neighbours import (
    AF_BRIDGE,
    NDA_LLADDR,
    NDA_MASTER,
    NTF_SELF,
    NUD_PERMANENT,
    RTM_DELNEIGH,
    StationGone,
    parse_events,
)
from bpflb.model.cluster import ANY_NODE, DsrFrontendKind, dsr_backends, dsr_frontends
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Proto

N1, N2 = IPv4Address("198.18.0.11"), IPv4Address("198.18.0.12")


def l4(addr: str | IPv4Address, port: int, proto: Proto = Proto.TCP) -> L4Addr:
    return L4Addr(IPv4Address(addr), port, proto)


def be(addr: str, port: int, *, local: bool, terminating: bool = False) -> Backend:
    return Backend(l4(addr, port), addr, "node1" if local else "node2", local, terminating)


def front(addr: str | IPv4Address, port: int, kind: FrontendKind, backends: tuple[Backend, ...], *,
          local_only: bool = False, draining: tuple[Backend, ...] = ()) -> Frontend:
    return Frontend(l4(addr, port), kind, "default/echo", "http", local_only, backends, False, draining=draining)


def desired(*frontends: Frontend) -> DesiredState:
    return DesiredState("node1", (N1,), {f.l4: f for f in frontends})


LOCAL, REMOTE = be("10.244.1.10", 8080, local=True), be("10.244.2.10", 8080, local=False)
OLD = be("10.244.1.11", 8080, local=True, terminating=True)


def test_nodeports_are_named_on_every_node_and_listed_once() -> None:
    state = desired(front(N1, 30080, FrontendKind.NODEPORT, (LOCAL, REMOTE), draining=(OLD,)),
                    front("198.18.1.10", 80, FrontendKind.LOADBALANCER, (LOCAL, REMOTE)),
                    front(N1, 30180, FrontendKind.NODEPORT, (LOCAL,), local_only=True))
    assert dsr_frontends(state, {N1, N2}) == {
        l4(N1, 30080): DsrFrontendKind.NODEPORT, l4(N2, 30080): DsrFrontendKind.NODEPORT,
        l4("198.18.1.10", 80): DsrFrontendKind.ADDRESS}
    assert dsr_backends(state) == {
        (l4(ANY_NODE, 30080), LOCAL.l4), (l4(ANY_NODE, 30080), OLD.l4),      # draining: open flows' SYNs
        (l4("198.18.1.10", 80), LOCAL.l4)}                                    # never a remote backend


def test_an_external_ip_on_a_node_address_keeps_its_own_listing() -> None:
    state = desired(front(N2, 30080, FrontendKind.EXTERNAL_IP, (LOCAL,)),
                    front(N1, 30080, FrontendKind.NODEPORT, (LOCAL,)))
    assert dsr_frontends(state, {N1, N2})[l4(N2, 30080)] is DsrFrontendKind.ADDRESS
    assert dsr_frontends(state, {N1, N2})[l4(N1, 30080)] is DsrFrontendKind.NODEPORT


def _nlmsg(kind: int, family: int, state: int, flags: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BxxxiHBB", family, 5, state, flags, 0)
    for atype, value in attrs:
        rta = struct.pack("=HH", 4 + len(value), atype) + value
        body += rta + b"\0" * (-len(rta) % 4)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


MAC = bytes.fromhex("7226324f42c7")


def test_learned_fdb_removals_are_the_only_events_acted_on() -> None:
    master = (7).to_bytes(4, "little")
    data = b"".join([
        _nlmsg(RTM_DELNEIGH, AF_BRIDGE, 0x02, 0, [(NDA_LLADDR, MAC), (NDA_MASTER, master)]),     # a pod left
        _nlmsg(RTM_DELNEIGH, AF_BRIDGE, NUD_PERMANENT, 0, [(NDA_LLADDR, MAC)]),                 # a static one
        _nlmsg(RTM_DELNEIGH, AF_BRIDGE, 0x02, NTF_SELF, [(NDA_LLADDR, MAC)]),                   # the bridge's own
        _nlmsg(RTM_DELNEIGH, 2, 0x02, 0, [(NDA_LLADDR, MAC)]),                                  # an IPv4 neighbour
        _nlmsg(28, AF_BRIDGE, 0x02, 0, [(NDA_LLADDR, MAC)]),                                    # RTM_NEWNEIGH
    ])
    assert parse_events(data) == [StationGone(":".join(f"{b:02x}" for b in MAC), 7)]


def test_truncated_messages_are_ignored() -> None:
    whole = _nlmsg(RTM_DELNEIGH, AF_BRIDGE, 0x02, 0, [(NDA_LLADDR, MAC)])
    assert parse_events(whole[:-3]) == []
    assert parse_events(b"") == []
