"""BPF unit tests of backend selection on the real bpf_lb.o: Maglev picks the same backend for the same
packet on independently loaded datapaths (and the one bpflb.model.maglev predicts), session affinity keeps a
client on its backend until the timeout and never on one that stopped being eligible, and a terminating
backend keeps its open flows while getting no new ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpflb.datapath.lbmaps import LBMaps, NodeConfig
from bpflb.datapath.libbpf import TC_ACT_REDIRECT
from bpflb.datapath.loader import load_lb
from bpflb.model import maglev
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Proto,
)
from tests.bpf.packets import CLIENT, CLIENT_MAC, ETH0_MAC, NODE1, NODE2, Node, wait_idle

pytestmark = pytest.mark.privileged

PODS = {f"echo-{c}": f"10.244.2.{10 + i}" for i, c in enumerate("abcd")}


def backend(name: str) -> Backend:
    return Backend(L4Addr(IPv4Address(PODS[name]), 8080, Proto.TCP), name, "node2", False)


def frontend(addr: str, names: list[str], *, algorithm: Algorithm = Algorithm.MAGLEV, affinity: int = 0,
             draining: list[str] | None = None, port: int = 30080) -> Frontend:
    return Frontend(L4Addr(IPv4Address(addr), port, Proto.TCP), FrontendKind.NODEPORT, "default/echo", "http",
                    False, tuple(backend(n) for n in names), False, algorithm=algorithm,
                    affinity_timeout=affinity, draining=tuple(backend(n) for n in draining or []))


def state(*frontends: Frontend, m: int = maglev.DEFAULT_TABLE_SIZE, seed: int = 7) -> DesiredState:
    return DesiredState("node1", (IPv4Address(NODE1),), {f.l4: f for f in frontends},
                        settings=AgentSettings(maglev_table_size=m, maglev_seed=seed))


def syn(sport: int, dst: str = NODE1, flags: str = "S", src: str = CLIENT, dport: int = 30080) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=src, dst=dst, ttl=64) /
                 TCP(sport=sport, dport=dport, flags=flags))


def pod_of(node: Node, frame: bytes) -> str:
    """Which pod the datapath sent the frame to."""
    run = node.ingress(frame)
    assert run.retval == TC_ACT_REDIRECT, run.retval
    dst = Ether(run.data)[IP].dst
    return next(name for name, ip in PODS.items() if ip == dst)


def predicted(names: list[str], sport: int, *, src: str = CLIENT, m: int = maglev.DEFAULT_TABLE_SIZE,
              seed: int = 7) -> str:
    return maglev.pick(names, IPv4Address(src), sport, 30080, int(Proto.TCP), m, seed)


@pytest.fixture
def second(node: Node) -> Iterator[Node]:
    """Another datapath loaded independently in the same namespace (a second node's object and maps)."""
    obj = load_lb(None)
    try:
        yield Node(node.ns, obj, LBMaps(obj), node.eth0, node.lxc0)
    finally:
        obj.close()


def test_the_same_packet_selects_the_same_backend_on_two_independent_datapaths(node: Node, second: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c", "echo-d"]
    node.program(state(frontend(NODE1, names)))
    # The second datapath allocated other ids first, lists the backends in another order, and serves the
    # frontend on its own address (node2:30080): only names, M and the seed decide the table.
    second.program(state(frontend("198.18.0.77", ["echo-d"], port=30999)))
    second.program(state(frontend(NODE2, list(reversed(names)))))
    seen: Counter[str] = Counter()
    for sport in range(20000, 20400):
        one, two = pod_of(node, syn(sport)), pod_of(second, syn(sport, dst=NODE2))
        assert one == two == predicted(names, sport), sport
        seen[one] += 1
    assert set(seen) == set(names) and min(seen.values()) > 50, seen


def test_the_programmed_table_is_the_model_table_in_blocks(node: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c"]
    node.program(state(frontend(NODE1, names), m=16381))
    [sid] = [node.maps.services.decode_value(v).id for k, v in node.maps.services.items_raw()
             if node.maps.services.decode_key(k).slot == 0]
    blocks = sorted((node.maps.maglev.decode_key(k).block, v) for k, v in node.maps.maglev.items_raw()
                    if node.maps.maglev.decode_key(k).svc_id == sid)
    assert [b for b, _ in blocks] == [0, 1]              # two blocks of 8192 hold 16381 entries
    raw = b"".join(v for _, v in blocks)
    assert raw[:2 * 16381] == maglev.build_slots(names, 16381, 7).tobytes()
    assert raw[2 * 16381:] == bytes(2 * (2 * 8192 - 16381))


def test_random_frontends_have_no_table_and_switching_algorithm_live_works(node: Node) -> None:
    names = ["echo-a", "echo-b"]
    node.program(state(frontend(NODE1, names, algorithm=Algorithm.RANDOM)))
    assert list(node.maps.maglev.items_raw()) == []
    node.program(state(frontend(NODE1, names)))
    assert len(list(node.maps.maglev.items_raw())) == 2
    assert all(pod_of(node, syn(sport)) == predicted(names, sport) for sport in range(21000, 21050))
    node.program(state(frontend(NODE1, names, algorithm=Algorithm.RANDOM)))
    assert list(node.maps.maglev.items_raw()) == []


def test_changing_the_table_size_or_seed_live_rewrites_every_table(node: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c"]
    node.program(state(frontend(NODE1, names), m=16381))
    report = node.maps.sync(state(frontend(NODE1, names), m=251, seed=99))
    assert report.maglev_config_changed and report.maglev_blocks_written == 1 and report.maglev_blocks_removed == 1
    for sport in range(22000, 22060):
        assert pod_of(node, syn(sport)) == predicted(names, sport, m=251, seed=99)


def test_backend_changes_follow_the_table(node: Node) -> None:
    three, two = ["echo-a", "echo-b", "echo-c"], ["echo-a", "echo-c"]
    node.program(state(frontend(NODE1, three)))
    node.program(state(frontend(NODE1, two)))
    assert all(pod_of(node, syn(sport)) == predicted(two, sport) for sport in range(23000, 23100))


def test_affinity_keeps_a_client_on_its_backend_until_the_timeout(node: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c", "echo-d"]
    node.program(state(frontend(NODE1, names, affinity=1)))
    first = pod_of(node, syn(24000))
    assert first == predicted(names, 24000)
    other = next(p for p in range(24001, 25000) if predicted(names, p) != first)
    # 50 new flows, their own Maglev choices notwithstanding, all go where the client's first one went.
    assert {pod_of(node, syn(p)) for p in [other, *range(24100, 24149)]} == {first}
    # Another client is not affected by that.
    client2 = "198.18.0.101"
    assert pod_of(node, syn(other, src=client2)) == predicted(names, other, src=client2)
    wait_idle(node.maps.affinity, "last_used", 1.0)
    # The timeout passed without a new flow: the next flow is chosen afresh, and becomes the new affinity.
    fresh = pod_of(node, syn(other + 5000))
    assert fresh == predicted(names, other + 5000)
    assert {pod_of(node, syn(p)) for p in range(26000, 26020)} == {fresh}


def test_switching_affinity_off_and_on_on_a_live_frontend(node: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c", "echo-d"]
    node.program(state(frontend(NODE1, names, affinity=60)))
    pinned = pod_of(node, syn(27000))
    assert {pod_of(node, syn(p)) for p in range(27001, 27030)} == {pinned}
    node.program(state(frontend(NODE1, names)))                       # sessionAffinity: None
    assert list(node.maps.affinity_members.items_raw()) == []
    spread = {pod_of(node, syn(p)) for p in range(27100, 27160)}
    assert spread == set(names)
    node.program(state(frontend(NODE1, names, affinity=60)))          # ClientIP again
    again = pod_of(node, syn(27200))
    assert {pod_of(node, syn(p)) for p in range(27201, 27230)} == {again}


def test_affinity_is_not_kept_to_a_backend_that_became_terminating(node: Node) -> None:
    names = ["echo-a", "echo-b", "echo-c"]
    node.program(state(frontend(NODE1, names, affinity=600)))
    pinned = pod_of(node, syn(28000))
    rest = [n for n in names if n != pinned]
    node.program(state(frontend(NODE1, rest, affinity=600, draining=[pinned])))
    moved = pod_of(node, syn(28001))
    assert moved in rest
    assert {pod_of(node, syn(p)) for p in range(28002, 28030)} == {moved}
    # The flow opened before keeps its (terminating) backend.
    assert pod_of(node, syn(28000, flags="A")) == pinned


@pytest.mark.parametrize("algorithm", [Algorithm.MAGLEV, Algorithm.RANDOM])
def test_a_terminating_backend_gets_no_new_flows_while_its_open_flows_continue(node: Node,
                                                                               algorithm: Algorithm) -> None:
    names = ["echo-a", "echo-b"]
    node.program(state(frontend(NODE1, names, algorithm=algorithm)))
    sport = next(p for p in range(29000, 29100) if pod_of(node, syn(p)) == "echo-a")
    node.program(state(frontend(NODE1, ["echo-b"], algorithm=algorithm, draining=["echo-a"])))
    assert _backend_addrs(node) == {PODS["echo-a"], PODS["echo-b"]}       # still there for its flows
    assert pod_of(node, syn(sport, flags="A")) == "echo-a"
    assert {pod_of(node, syn(p)) for p in range(29200, 29250)} == {"echo-b"}
    # When it disappears from the EndpointSlices, its flows are steered away instead of black-holed.
    node.program(state(frontend(NODE1, ["echo-b"], algorithm=algorithm)))
    assert _backend_addrs(node) == {PODS["echo-b"]}
    assert pod_of(node, syn(sport, flags="A")) == "echo-b"


def _backend_addrs(node: Node) -> set[str]:
    return {str(IPv4Address(node.maps.backends.decode_value(v).addr.to_bytes(4, "little")))
            for _, v in node.maps.backends.items_raw()}



def test_a_restart_on_pinned_maps_rebuilds_the_same_tables_and_writes_nothing(pin_root: Path) -> None:
    desired = state(frontend(NODE1, ["echo-a", "echo-b", "echo-c"], affinity=30),
                    frontend(NODE2, ["echo-b", "echo-d"]))
    cfg = NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=1)
    obj = load_lb(pin_root)
    try:
        maps = LBMaps(obj)
        maps.set_config(cfg)
        first = maps.sync(desired)
        assert first.maglev_tables_built == 2 and first.maglev_blocks_written == 4
        assert first.affinity_members_written == 3
    finally:
        obj.close()
    obj = load_lb(pin_root)
    try:
        again = LBMaps(obj).sync(desired)
        assert not again.changed and again.maglev_tables_built == 2, again
    finally:
        obj.close()


def test_the_datapath_hash_is_the_documented_one(node: Node) -> None:
    """Many client addresses, another table size and seed: the datapath indexes the table exactly where
    bpflb.model.maglev.packet_hash says."""
    names = ["echo-a", "echo-b", "echo-c", "echo-d"]
    node.program(state(frontend(NODE1, names), m=251, seed=12345))
    for i in range(60):
        src = f"198.18.0.{120 + i}"
        assert pod_of(node, syn(40000 + i, src=src)) == predicted(names, 40000 + i, src=src, m=251, seed=12345)
