"""The agent's conntrack GC (bpflb.datapath.conntrack) on the real maps: it removes exactly the flows the
datapath would give away (both entries dead), never a live one; under pressure it drops handshakes pending
for seconds first (nf_conntrack's early_drop); an entry the datapath took over meanwhile is put back; and
its view of the SNAT pool per backend is what `bpflb inspect` shows."""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP

from bpflb.datapath.conntrack import CT_ENTRY, CT_TUPLE, Collector, pool_use, snapshot
from bpflb.datapath.libbpf import ffi
from bpflb.inspect import collect_maps
from bpflb.model.types import Proto
from tests.bpf.ct_util import age, backend_frame, client_frame, configure, entries, out_sport
from tests.bpf.packets import NODE1, REMOTE_POD, Node, backend, fe, state

pytestmark = pytest.mark.privileged


def test_the_packed_layouts_match_the_structs() -> None:
    f = ffi()
    assert CT_TUPLE.size == f.sizeof("struct ct_tuple") and CT_ENTRY.size == f.sizeof("struct ct_entry")
    raw = bytes(range(48))
    entry = f.new("struct ct_entry *")
    f.memmove(entry, raw, 48)
    unpacked = CT_ENTRY.unpack(raw)
    assert unpacked[0] == entry.last_seen and unpacked[1] == entry.backend_id
    assert unpacked[6:10] == (entry.backend_port, entry.nat_port, entry.fe_port, entry.client_port)
    assert unpacked[10:] == (entry.svc_id, entry.flags, entry.mode, entry.state, entry.syn_ack_seq)


def program(node: Node, lo: int = 40000, hi: int = 40999) -> None:
    configure(node, nat_port_min=lo, nat_port_max=hi)
    node.maps.sync(state(fe(NODE1, 30080, (backend(REMOTE_POD, 8080, local=False),)),
                         fe(NODE1, 30081, (backend(REMOTE_POD, 8081, local=False, proto=Proto.UDP),),
                            proto=Proto.UDP)))


def collector(node: Node) -> Collector:
    return Collector(node.maps.ct_fwd, node.maps.ct_rev, node.maps.config)


def open_tcp(node: Node, sport: int, *, established: bool = False, close: str = "") -> int:
    nat = out_sport(node.ingress(client_frame(TCP(sport=sport, dport=30080, flags="S", seq=1))).data)
    if established or close:
        node.ingress(backend_frame(TCP(sport=8080, flags="SA", seq=9, ack=2), nat))
        node.ingress(client_frame(TCP(sport=sport, dport=30080, flags="A", seq=2, ack=10)))
    if close == "fin":
        node.ingress(client_frame(TCP(sport=sport, dport=30080, flags="FA", seq=2, ack=10)))
        node.ingress(backend_frame(TCP(sport=8080, flags="FA", seq=10, ack=3), nat))
    if close == "rst":
        node.ingress(client_frame(TCP(sport=sport, dport=30080, flags="R", seq=2)))
    return nat


def client_ports(node: Node) -> set[int]:
    return {int.from_bytes(k[8:10], "big") for k in entries(node.maps.ct_fwd)}


def test_gc_removes_exactly_the_flows_whose_entries_are_both_dead(node: Node) -> None:
    program(node)
    open_tcp(node, 2001)                                  # handshake never completed
    open_tcp(node, 2002, established=True)
    open_tcp(node, 2003, close="fin")
    open_tcp(node, 2004, close="rst")
    node.ingress(client_frame(UDP(sport=2005, dport=30081), b"x"))
    age(node, 30)
    node.ingress(client_frame(UDP(sport=2006, dport=30081), b"x"))
    assert collector(node).collect().removed_fwd == 2     # 30 s: the FIN'd (10 s) and reset (1 s) flows
    assert client_ports(node) == {2001, 2002, 2005, 2006}
    age(node, 31)
    report = collector(node).collect()                    # 61 s: the handshake and the first UDP flow too
    assert (report.removed_fwd, report.removed_rev) == (2, 2)
    assert client_ports(node) == {2002, 2006}
    assert len(entries(node.maps.ct_rev)) == 2
    assert collector(node).collect().removed_fwd == 0


def test_gc_keeps_a_flow_while_either_of_its_entries_lives(node: Node) -> None:
    program(node)
    node.ingress(client_frame(UDP(sport=2005, dport=30081), b"x"))
    age(node, 61)
    m = node.maps.ct_fwd
    [(key, _)] = list(m.items_raw())
    live = m.lookup(m.decode_key(key))
    assert live is not None
    live.last_seen += 61 * 10**9
    m.update(m.decode_key(key), live)
    report = collector(node).collect()
    assert (report.removed_fwd, report.removed_rev) == (0, 0)


def test_under_pool_pressure_pending_handshakes_are_dropped_after_seconds(node: Node) -> None:
    program(node, 40000, 40019)
    for sport in range(3000, 3017):
        open_tcp(node, sport)                             # 17 spoofed SYNs: pending handshakes
    open_tcp(node, 3100, established=True)                # and one real connection: 18 of 20 ports (90%)
    age(node, 2)
    assert collector(node).collect().early_dropped == 0, "a handshake pending for 2 s is not dropped"
    age(node, 4)
    report = collector(node).collect()
    assert report.early_dropped == 17 and report.pressure == ["SNAT pool of 10.244.2.10:8080/TCP 90% taken"]
    assert client_ports(node) == {3100}
    assert len(entries(node.maps.ct_rev)) == 1


def test_no_pressure_no_early_drop(node: Node) -> None:
    program(node, 40000, 40099)
    for sport in range(3000, 3050):
        open_tcp(node, sport)
    age(node, 30)
    assert collector(node).collect().early_dropped == 0
    assert len(client_ports(node)) == 50


def test_an_entry_the_datapath_took_over_meanwhile_is_put_back(node: Node) -> None:
    program(node, 40000, 40000)
    node.ingress(client_frame(UDP(sport=2005, dport=30081), b"x"))
    age(node, 61)
    gc = collector(node)
    snap = snapshot(node.maps.ct_fwd, node.maps.ct_rev, node.maps.config)
    dead_fwd, dead_rev = gc._dead(snap)
    assert len(dead_fwd) == len(dead_rev) == 1
    # Between the GC's read and its removal, a new flow takes the dead flow's port over.
    assert out_sport(node.ingress(client_frame(UDP(sport=2006, dport=30081), b"x")).data) == 40000
    from bpflb.datapath.conntrack import GcReport

    report = GcReport()
    assert gc._remove(node.maps.ct_rev, snap.rev, dead_rev, report) == 0
    assert report.kept_touched == 1
    [rev] = entries(node.maps.ct_rev).values()
    assert int.from_bytes(rev.client_port.to_bytes(2, "little"), "big") == 2006


def test_pool_use_and_inspect_show_the_fill_levels(node: Node) -> None:
    program(node, 40000, 40009)
    for sport in range(3000, 3004):
        open_tcp(node, sport, established=True)
    node.ingress(client_frame(UDP(sport=2005, dport=30081), b"x"))
    snap = snapshot(node.maps.ct_fwd, node.maps.ct_rev, node.maps.config)
    use = {u.backend: (u.used, u.size) for u in pool_use(snap, 10)}
    assert use == {"10.244.2.10:8080/TCP": (4, 10), "10.244.2.10:8081/UDP": (1, 10)}
    data = collect_maps(node.maps)
    ct = data["conntrack"]
    assert ct["ct_fwd"]["entries"] == 5 and ct["ct_rev"]["entries"] == 5 and ct["ct_fwd"]["max"] == 262144
    assert ct["nat_pool"][0] == {"backend": "10.244.2.10:8080/TCP", "ports_used": 4, "ports": 10, "fill": 0.4}
    assert ct["ct_fwd"]["established"] == 4 and ct["ct_fwd"]["udp"] == 1


def test_an_upgrade_that_changed_the_conntrack_maps_replaces_their_pins(tmp_path: object) -> None:
    """Pins left by a release whose ct_fwd was an LRU map of another value size: the new object loads on
    them all the same (the old map unpinned, said in the log), and keeps every compatible pin."""
    import os
    import uuid
    from pathlib import Path

    from bpflb.datapath.libbpf import lib
    from bpflb.datapath.loader import load_lb, remove_pins

    root = Path(f"/sys/fs/bpf/bpflb-test-{uuid.uuid4().hex[:8]}")
    try:
        first = load_lb(root)
        services_id = _map_id(first.map("lb_services").fd)
        first.close()
        (root / "ct_fwd").unlink()
        fd = lib().bpf_map_create(9, b"ct_fwd", 16, 40, 1024, ffi().NULL)   # BPF_MAP_TYPE_LRU_HASH, old shape
        assert fd >= 0 and lib().bpf_obj_pin(fd, str(root / "ct_fwd").encode()) == 0
        os.close(fd)
        again = load_lb(root)
        try:
            assert again.map("ct_fwd").value_size == CT_ENTRY.size
            assert _map_id(again.map("lb_services").fd) == services_id, "compatible pins are kept"
        finally:
            again.close()
    finally:
        remove_pins(root)


def _map_id(fd: int) -> int:
    from bpflb.datapath.libbpf import lib

    info = ffi().new("struct bpf_map_info_prefix *")
    size = ffi().new("__u32 *", ffi().sizeof("struct bpf_map_info_prefix"))
    assert lib().bpf_obj_get_info_by_fd(fd, info, size) == 0
    return int(info.id)
