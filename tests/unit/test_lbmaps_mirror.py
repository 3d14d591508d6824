"""LBMaps' lb_services mirror, kept per frontend (ServiceMirror), on the in-memory maps (no root): after any
sequence of syncs (frontends added, grown, shrunk, replaced, removed; full and incremental), of writes the
kernel refuses and of restarts on the pinned maps, the mirror holds exactly what the map holds, the map holds
exactly the wanted frontends' entries, and a restarted LBMaps recovers its ids and rewrites nothing."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from bpflb.datapath.lbmaps import SVC_KEY, SVC_VAL, LBMaps, ServiceMirror, svc_key
from bpflb.datapath.libbpf import const
from bpflb.datapath.memory import MemoryPins
from bpflb.model.types import Backend, DesiredState, Frontend, FrontendKind, L4Addr, Proto

NODE = IPv4Address("192.0.2.1")


def frontend(port: int, backends: list[int], kind: FrontendKind = FrontendKind.NODEPORT) -> Frontend:
    """A TCP frontend on NODE:port whose backends are 10.0.0.<b>:8080."""
    bes = tuple(Backend(L4Addr(IPv4Address(f"10.0.{b // 250}.{b % 250 + 1}"), 8080, Proto.TCP), f"pod{b:04}",
                        "node-b", False) for b in sorted(backends))
    return Frontend(L4Addr(NODE, port, Proto.TCP), kind, f"default/s{port}", "", False, bes, not bes)


def state(frontends: list[Frontend], generation: int, changes: set[L4Addr] | None = None) -> DesiredState:
    return DesiredState("node1", (NODE,), frontends={fe.l4: fe for fe in frontends}, generation=generation,
                        base=generation - 1, changes=changes)


def check(maps: LBMaps, pins: MemoryPins, want: list[Frontend], skip: frozenset[L4Addr] = frozenset()) -> None:
    """The mirror equals the map; the map holds exactly each wanted frontend's master and slots (count, backend
    ids as lb_backends names them)."""
    held = pins.maps["lb_services"]
    assert maps._svc_m.entries == held
    # a frontend whose slots 1..n the map holds keeps their values as one object (memory)
    assert all(type(rec[1]) is bytes or None in rec[1] for rec in maps._svc_m.frontends.values())
    assert len(maps._svc_m) == len(held)
    ids = {int.from_bytes(k, "little"): v for k, v in pins.maps["lb_backends"].items()}
    expected = 0
    for fe in want:
        if fe.l4 in skip:
            continue
        sid, count = SVC_VAL.unpack(held[svc_key(fe.l4, 0)])[:2]
        assert count == len(fe.backends) and sid == maps._svc_ids.known(fe.l4)
        for slot, be in enumerate(fe.backends, 1):
            bid = SVC_VAL.unpack(held[svc_key(fe.l4, slot)])[0]
            assert ids[bid][:6] == be.l4.packed + be.l4.port.to_bytes(2, "big")
        expected += 1 + len(fe.backends)
    assert len(held) == expected, "entries nobody wants are left"


def test_service_mirror_follows_writes_and_removals_key_by_key() -> None:
    pins = MemoryPins()
    m = pins.map("lb_services")
    m.entries[svc_key(L4Addr(NODE, 1, Proto.TCP), 3)] = bytes(16)       # a slot without its master (a leftover)
    mirror = ServiceMirror(m)
    assert len(mirror) == 1 and mirror.entries == m.entries
    master = svc_key(L4Addr(NODE, 2, Proto.TCP), 0)
    keys = [svc_key(L4Addr(NODE, 2, Proto.TCP), s) for s in (1, 2, 3)]
    values = [SVC_VAL.pack(s, 0, 0, 0, 0) for s in (1, 2, 3)]
    assert mirror.write(keys, values, [(master, 1, 0, 3, b"".join(values))]) == []
    assert mirror.entries == m.entries and len(mirror) == 4 and master not in mirror
    assert mirror.absent(master, 3) == 1 and mirror.absent(master, 5) == 3
    m.fail = lambda key: "injected" if key == keys[1] else None
    bad = mirror.write([master, keys[1]], [SVC_VAL.pack(9, 3, 0, 0, 0), bytes(16)],
                       [(master, 0, 0, 1, None), (master, 2, 1, 1, None)])
    assert [k for k, _ in bad] == [keys[1]] and mirror.entries == m.entries and mirror.get(keys[1]) == values[1]
    assert mirror.remove([keys[2], keys[2], svc_key(L4Addr(NODE, 1, Proto.TCP), 3)]) == []
    assert mirror.entries == m.entries and len(mirror) == 3
    assert mirror.remove([master, keys[0], keys[1]]) == [] and mirror.frontends == {} and len(mirror) == 0
    assert SVC_KEY.unpack(keys[0])[2] == 1


def test_random_syncs_restarts_and_refusals_keep_the_map_exact() -> None:
    rnd = random.Random(15)
    pins = MemoryPins()
    maps = LBMaps(pins)
    ports = list(range(30000, 30040))
    live: dict[int, Frontend] = {}
    generation = 0
    refused = 0
    for round_ in range(120):
        generation += 1
        before = dict(live)
        for port in rnd.sample(ports, rnd.randint(1, 8)):
            if port in live and rnd.random() < 0.25:
                del live[port]
            else:
                live[port] = frontend(port, rnd.sample(range(300), rnd.randint(0, 12)))
        changes = {L4Addr(NODE, p, Proto.TCP) for p in set(before) | set(live) if before.get(p) is not live.get(p)}
        want = list(live.values())
        failing: frozenset[L4Addr] = frozenset()
        fresh = [fe for fe in want if fe.backends and before.get(fe.l4[1]) is None]
        if round_ % 3 == 1 and fresh:          # the kernel refuses one slot of a frontend that comes
            victim = rnd.choice(fresh)
            bad = svc_key(victim.l4, rnd.randint(1, len(victim.backends)))
            maps.services.fail = lambda key, bad=bad: "injected ENOMEM" if key == bad else None  # type: ignore[attr-defined]
        report = maps.sync(state(want, generation, changes if round_ % 5 else None))
        maps.services.fail = lambda key: None                                # type: ignore[attr-defined]
        failing = frozenset(f.frontend for f in report.failures)
        if failing:
            assert len(failing) == 1
            refused += 1
        check(maps, pins, want, failing)
        if round_ % 11 == 10:                  # a restart on the pinned maps: ids recovered, nothing rewritten
            ids = {fe.l4: maps._svc_ids.known(fe.l4) for fe in want if fe.l4 not in failing}
            maps = LBMaps(pins)
            assert {l4: maps._svc_ids.known(l4) for l4 in ids} == ids
            report = maps.sync(state(want, generation + 1))
            generation += 1
            assert not report.failures and report.slots_removed == 0 and report.backends_removed == 0
            assert report.slots_written == sum(1 + len(pins_fe.backends) for pins_fe in want if pins_fe.l4 in failing)
            check(maps, pins, want)
    assert refused >= 10, refused


def test_a_restart_removes_what_no_frontend_wants_and_keeps_what_they_do() -> None:
    pins = MemoryPins()
    kept, shrunk, gone = frontend(30001, [1, 2, 3]), frontend(30002, [4, 5, 6, 7]), frontend(30003, [8, 9])
    assert not LBMaps(pins).sync(state([kept, shrunk, gone], 1)).failures
    maps = LBMaps(pins)
    smaller = frontend(30002, [4, 5])
    report = maps.sync(state([kept, smaller], 1))
    check(maps, pins, [kept, smaller])
    assert report.frontends_removed == 1 and report.slots_removed == 3 + 2
    assert report.slots_written == 1           # the shrunk frontend's master (its count)
    assert report.backends_removed == 4        # 6, 7, 8, 9
    assert const("LB_SVC_SLOTS_MAX") == maps._svc_m.capacity
