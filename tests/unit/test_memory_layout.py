"""The agent's compact representations (docs/operations.md, "Where the memory goes") read back what the plain
ones held: L4Addr as one integer, packed EndpointSlices whose Backend tuples are made once and shared, the
lb_backends mirror kept by id, the Service view without its selector's labels, and the allocator setting."""

from __future__ import annotations

import pickle
import random
from ipaddress import IPv4Address
from typing import Any

import pytest

from bpflb.allocator import settle_allocator, tune_allocator
from bpflb.datapath.lbmaps import BACKEND, BackendMirror, LBMaps
from bpflb.datapath.memory import MemoryPins
from bpflb.model.endpoints import _backends, _Slice, read_slice, slice_record
from bpflb.model.translate import Translator, translate
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Proto
from bpflb.sources.base import Snapshot
from bpflb.sources.kube import SELECTOR_KEPT, service_view

NODE = "node1"


def test_l4addr_reads_back_as_the_triple_it_was_made_of() -> None:
    rnd = random.Random(15)
    triples = [(rnd.getrandbits(32), rnd.getrandbits(16), rnd.choice((6, 17))) for _ in range(500)]
    triples += [(0, 0, 6), (0xFFFFFFFF, 0xFFFF, 17), (1, 2, 6), (1, 1, 17)]
    made = [L4Addr(ip, port, proto) for ip, port, proto in triples]
    for (ip, port, proto), l4 in zip(triples, made, strict=True):
        assert (l4[0], l4[1], l4[2]) == tuple(l4) == (ip, port, proto) and len(l4) == 3
        assert (l4.ip, l4.port, l4.proto) == (ip, port, Proto(proto)) and l4.addr == IPv4Address(ip)
        assert l4.packed == ip.to_bytes(4, "big")
        assert l4 == L4Addr(IPv4Address(ip), port, Proto(proto)) and hash(l4) == hash(L4Addr(ip, port, proto))
        back = pickle.loads(pickle.dumps(l4))
        assert type(back) is L4Addr and back == l4
        assert str(l4) == f"{IPv4Address(ip)}:{port}/{Proto(proto).name}" == f"{l4}" == "%s" % l4  # noqa: UP031 (as logging formats it)
        assert l4  # never false: a protocol number is never 0 in the model
    # ordered as the (address, port, protocol) tuples were
    assert [tuple(x) for x in sorted(made)] == sorted(triples)
    assert L4Addr.of(1, 2, 6) == L4Addr(1, 2, 6)


@pytest.mark.parametrize("bad", [(1 << 32, 1, 6), (-1, 1, 6), (1, 65536, 6), (1, 1, 256)])
def test_l4addr_refuses_what_does_not_fit_its_integer(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        L4Addr(*bad)


def _slice(name: str, service: str, pods: list[tuple[str, str, str]], ports: list[tuple[str, int]],
           ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node,
                           "targetRef": {"kind": "Pod", "name": pod}} for pod, ip, node in pods]}


def _fresh(raw: dict[str, Any]) -> _Slice:
    """The slice as the pure translation reads it (read_slice: no record kept)."""
    parsed = read_slice(raw, 0).parsed
    assert parsed is not None
    return parsed


PODS = [("web-b", "10.0.0.2", "node2"), ("web-a", "10.0.0.1", NODE), ("web-c", "10.0.0.3", "node3")]


def test_a_packed_slice_makes_its_backends_once_and_reads_back_the_same() -> None:
    raw = _slice("web-1", "web", PODS, [("http", 8080), ("https", 8443)])
    fresh = read_slice(raw, 0).parsed                 # as the pure translation reads it
    kept = slice_record(raw).parsed                   # as the agent keeps it
    assert fresh is not None and kept is not None and kept.packed is not None
    columns = kept.columns
    endpoints = kept.endpoints
    first = _backends([kept], "http", Proto.TCP, NODE, False)
    assert kept.packed is None and kept.made is not None        # the columns gave way to the backends
    assert kept.columns == columns and kept.endpoints == endpoints
    again = _backends([kept], "http", Proto.TCP, NODE, False)
    assert again[0] is first[0]                                  # one tuple, every time
    assert first == _backends([fresh], "http", Proto.TCP, NODE, False)
    assert [(b.name, b.l4.port, b.local) for b in first[0]] == [("web-a", 8080, True), ("web-b", 8080, False),
                                                                 ("web-c", 8080, False)]
    # another port of the slice, eTP Local, another node: the same result as a fresh read
    for port_name, node, local_only in (("https", NODE, False), ("http", NODE, True), ("http", "node3", False),
                                        ("https", NODE, True), ("none", NODE, False)):
        assert _backends([kept], port_name, Proto.TCP, node, local_only) == \
            _backends([_fresh(raw)], port_name, Proto.TCP, node, local_only)


def test_a_service_of_several_slices_uses_the_packed_slices_backends_as_they_are() -> None:
    one = slice_record(_slice("web-1", "web", PODS, [("http", 8080)])).parsed
    other = slice_record(_slice("web-2", "web", [("web-d", "10.0.0.4", NODE), ("web-b", "10.0.0.2", "node2")],
                                [("http", 8080)], ready=False)).parsed
    assert one is not None and other is not None
    got = _backends([one, other], "http", Proto.TCP, NODE, False)
    want = _backends([_fresh(_slice("web-1", "web", PODS, [("http", 8080)])),
                      _fresh(_slice("web-2", "web", [("web-d", "10.0.0.4", NODE), ("web-b", "10.0.0.2", "node2")],
                                    [("http", 8080)], ready=False))], "http", Proto.TCP, NODE, False)
    assert got == want and [b.name for b in got[1]] == ["web-d"]          # not ready: draining
    made = {b.l4: b for b in _backends([one], "http", Proto.TCP, NODE, False)[0]}
    assert all(made[b.l4] is b for b in got[0])                           # the slice's own objects


def test_translations_share_the_slice_backends_between_frontends_and_syncs() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "web", "namespace": "default", "resourceVersion": "1"},
           "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}}
    node = {"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
    record: Any = slice_record(_slice("web-1", "web", PODS, [("http", 8080)]))     # what KubeSource hands over
    tr = Translator(NODE)
    state = tr.translate(Snapshot(services=[service_view(svc)], endpointslices=[record], nodes=[node]))
    tuples = {id(fe.backends) for fe in state.frontends.values()}
    assert len(state.frontends) == 2 and len(tuples) == 1
    plain = translate(Snapshot(services=[svc], endpointslices=[_slice("web-1", "web", PODS, [("http", 8080)])],
                               nodes=[node]), NODE)
    assert sorted(state.frontends.values(), key=lambda fe: fe.l4) == list(plain.frontends.values())
    svc2 = {**svc, "metadata": {**svc["metadata"], "resourceVersion": "2"}}   # the Service alone changes
    later = tr.translate(Snapshot(services=[service_view(svc2)], endpointslices=[record], nodes=[node]))
    assert {id(fe.backends) for fe in later.frontends.values()} == tuples


def test_the_service_view_keeps_only_whether_there_is_a_selector() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"},
                           "spec": {"selector": {"app": "a"}, "ipFamilies": ["IPv4"], "clusterIP": "10.96.0.1",
                                    "clusterIPs": ["10.96.0.1"], "ports": [{"port": 80, "protocol": "TCP"}]}}
    views = [service_view(pickle.loads(pickle.dumps(svc))) for _ in range(2)]
    assert all(v["spec"]["selector"] is SELECTOR_KEPT for v in views)
    assert views[0]["spec"]["ipFamilies"] is views[1]["spec"]["ipFamilies"] == ["IPv4"]
    assert views[0]["spec"]["clusterIPs"][0] is views[0]["spec"]["clusterIP"]
    empty = service_view({"metadata": {"name": "b"}, "spec": {"selector": {}}})
    assert empty["spec"]["selector"] == {}
    odd = service_view({"metadata": {"name": "c"}, "spec": {"selector": "app=c"}})
    assert odd["spec"]["selector"] == "app=c"                    # the wrong type, kept for the translation's report
    node = {"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
    for spec, skipped in (({"selector": {"app": "a"}}, False), ({}, True)):
        raw = {"metadata": {"name": "s", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 80, "protocol": "TCP"}], **spec}}
        got = translate(Snapshot(services=[service_view(raw)], nodes=[node]), NODE)
        assert got.problems == translate(Snapshot(services=[raw], nodes=[node]), NODE).problems
        assert any("selector-less" in p.reason for p in got.problems) == skipped


def test_the_backend_mirror_holds_what_the_map_holds() -> None:
    pins = MemoryPins()
    m = pins.map("lb_backends")
    leftover = (7).to_bytes(4, "little"), BACKEND.pack(bytes([10, 0, 0, 7]), (80).to_bytes(2, "big"), 6, 1)
    m.entries[leftover[0]] = leftover[1]                 # a previous agent's, with a flag
    mirror = BackendMirror(m)
    assert mirror.entries == m.entries and len(mirror) == 1 and leftover[0] in mirror
    assert mirror.backends[7] == L4Addr(IPv4Address("10.0.0.7"), 80, Proto.TCP) and mirror.flags == {7: 1}
    l4s = [L4Addr(IPv4Address(f"10.0.1.{i}"), 8080, Proto.UDP) for i in range(1, 6)]
    ids = [100 + i for i in range(5)]
    values = [(l4 << 8 | (i % 2)).to_bytes(8, "big") for i, l4 in enumerate(l4s)]
    assert values[1] == BACKEND.pack(l4s[1].packed, (8080).to_bytes(2, "big"), 17, 1)   # the struct's bytes
    keys = [i.to_bytes(4, "little") for i in ids]
    assert mirror.write_columns(keys, values, (ids, l4s)) == []
    assert mirror.entries == m.entries and all(mirror.backends[i] is l4 for i, l4 in zip(ids, l4s, strict=True))
    m.fail = lambda key: "injected" if key == keys[2] else None
    bad = mirror.write_columns([keys[1], keys[2]], [values[2], values[1]])     # swapped values; one refused
    assert [k for k, _ in bad] == [keys[2]] and mirror.entries == m.entries
    m.fail = lambda key: None
    assert mirror.remove([keys[0], keys[0], leftover[0], (999).to_bytes(4, "little")]) == []
    assert mirror.entries == m.entries and len(mirror) == 4 and mirror.flags == {103: 1}
    mirror.reload()
    assert mirror.entries == m.entries and mirror.reloads == 1


def test_a_restarted_lbmaps_shares_its_backend_objects_and_rewrites_nothing() -> None:
    pins = MemoryPins()
    bes = tuple(Backend(L4Addr(IPv4Address(f"10.0.0.{i}"), 8080, Proto.TCP), f"p{i}", "node2", i == 1)
                for i in range(1, 4))
    fe = Frontend(L4Addr(IPv4Address("192.0.2.1"), 30080, Proto.TCP), FrontendKind.NODEPORT, "default/a", "",
                  False, bes, False)
    st = DesiredState(NODE, (IPv4Address("192.0.2.1"),), frontends={fe.l4: fe}, generation=1)
    assert LBMaps(pins).sync(st).backends_written == 3
    maps = LBMaps(pins)
    assert all(maps._be_ids._ids.get(l4) == ident for ident, l4 in maps._be_m.backends.items())
    assert {id(k) for k in maps._be_ids._ids} == {id(v) for v in maps._be_m.backends.values()}
    report = maps.sync(st)
    assert report.backends_written == 0 and report.slots_written == 0
    assert maps._prog[fe.l4].backends == [b.l4 for b in bes]


def test_the_allocator_setting_is_harmless_to_repeat() -> None:
    assert tune_allocator() == settle_allocator() == tune_allocator()
