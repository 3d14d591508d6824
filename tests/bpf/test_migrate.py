"""Taking over another version's pinned maps (datapath.migrate) with the real objects: the default build and
the upgrade tests' build (`make bpf-layout-test`: conntrack half the size, a field added to struct ct_entry).
A SNAT flow opened by one build's program is translated by the other's after the take-over, both ways;
counters, settings and every other entry come along; compatible maps are reused as they are; a take-over cut
short is finished by the next load; a failed load gives the old maps back; a map without BTF whose sizes
changed starts empty, said in the log."""

from __future__ import annotations

import logging
import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpflb.datapath import migrate
from bpflb.datapath.lbmaps import LBMaps, NodeConfig, read_stats
from bpflb.datapath.libbpf import TC_ACT_REDIRECT, BpfError, ffi, lib, map_info, objects_dir, possible_cpus
from bpflb.datapath.loader import BpfObject, load_lb
from bpflb.model.types import Mode
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import scratch_node
from tests.bpf.packets import CLIENT, ETH0_MAC, NODE1, NODE2_MAC, REMOTE, REMOTE_POD, fe, frame_in, state

pytestmark = pytest.mark.privileged

LAYOUT_TEST_DIR = Path(__file__).resolve().parents[2] / "bpf_objects" / "build-layout-test"



def built(obj_dir: Path) -> Path:
    assert (obj_dir / "bpf_lb.o").exists(), f"{obj_dir}/bpf_lb.o is missing: run `make bpf bpf-layout-test`"
    return obj_dir


def map_id(obj: BpfObject, name: str) -> int:
    return int(map_info(obj.map(name).fd).id)


def ct_layout(obj_dir: Path) -> migrate.Layout:
    btf = lib().btf__parse(str(obj_dir / "bpf_lb.o").encode(), ffi().NULL)
    assert btf != ffi().NULL
    try:
        for tid in range(1, lib().btf__type_cnt(btf)):
            t = lib().btf__type_by_id(btf, tid)
            if (t.info >> 24) & 0x1F == 4 and ffi().string(lib().btf__name_by_offset(btf, t.name_off)) == b"ct_entry":
                found = migrate.layout(btf, tid)
                assert found is not None
                return found
    finally:
        lib().btf__free(btf)
    raise AssertionError("no struct ct_entry in the BTF")


def test_the_two_builds_differ_as_the_upgrade_tests_need() -> None:
    old, new = ct_layout(built(objects_dir())), ct_layout(built(LAYOUT_TEST_DIR))
    assert [f.path for f in new] == [f.path for f in old] + ["layout_test"]
    assert {f.path: f.offset for f in old}.items() <= {f.path: f.offset for f in new}.items()


def open_flow(obj: BpfObject, ns: str, eth0: int, sport: int) -> int:
    """A SYN from the client through node1 to the remote pod (SNAT): the NAT port node1 chose."""
    with entered(ns):
        run = obj.test_run("lb_ingress", frame_in(TCP(sport=sport, dport=30080, flags="S")), ifindex=eth0)
    assert run.retval == TC_ACT_REDIRECT
    return int(Ether(run.data)[TCP].sport)


def reply_reaches_client(obj: BpfObject, ns: str, eth0: int, sport: int, nat_port: int) -> bool:
    """The pod's reply to that flow, as it reaches node1: translated back to the client by this program?"""
    synack = Ether(src=NODE2_MAC, dst=ETH0_MAC) / IP(src=REMOTE_POD, dst=NODE1) / \
        TCP(sport=8080, dport=nat_port, flags="SA")
    with entered(ns):
        run = obj.test_run("lb_ingress", bytes(synack), ifindex=eth0)
    out = Ether(run.data)
    return run.retval == TC_ACT_REDIRECT and out[IP].dst == CLIENT and out[TCP].dport == sport and \
        out[TCP].sport == 30080


def set_counter(obj: BpfObject, index: int, per_cpu: int) -> None:
    ncpu = possible_cpus()
    values = ffi().new("__u64[]", [per_cpu] * ncpu)
    assert lib().bpf_map_update_elem(obj.map("lb_stats").fd, ffi().new("__u32 *", index), values, 0) == 0


def test_flows_counters_and_settings_survive_an_upgrade_and_a_downgrade(
        pin_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ncpu = possible_cpus()
    with scratch_node() as sn:
        old = load_lb(pin_root, built(objects_dir()))
        maps = LBMaps(old)
        maps.set_config(NodeConfig(mode=Mode.DSR, snat_addr=IPv4Address(NODE1), ext_ifindex=sn.eth0))
        maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=sn.eth0))
        maps.sync(state(fe(NODE1, 30080, (REMOTE,))))
        first = open_flow(old, sn.ns, sn.eth0, 40001)
        set_counter(old, 3, 5)
        kept = {name: map_id(old, name) for name in ("lb_services", "lb_backends", "lb_config")}
        old.close()

        new = load_lb(pin_root, built(LAYOUT_TEST_DIR))          # the upgrade
        try:
            assert new.map("ct_fwd").max_entries == 131072 and new.map("ct_fwd").value_size == 56
            assert {name: map_id(new, name) for name in kept} == kept, "compatible maps are reused as they are"
            assert {m.name for m in new.migrations} == {"ct_fwd", "ct_rev"}
            assert (pin_root / "migrating").is_dir()
            assert reply_reaches_client(new, sn.ns, sn.eth0, 40001, first)   # the old flow, on the new program
            second = open_flow(new, sn.ns, sn.eth0, 40002)
            assert read_stats(new.map("lb_stats"))["reply_snat"] >= 5 * ncpu
            assert LBMaps(new).mode() == Mode.SNAT
            new.finish_migrations()
            assert not (pin_root / "migrating").exists()
        finally:
            new.close()
        assert any("ct_fwd was made by another version (value size 48 -> 56; max_entries 262144 -> 131072; "
                   "value layout +layout_test)" in r.message for r in caplog.records)

        back = load_lb(pin_root, built(objects_dir()))           # and back: the downgrade
        try:
            assert back.map("ct_fwd").max_entries == 262144 and back.map("ct_fwd").value_size == 48
            for sport, port in ((40001, first), (40002, second)):
                assert reply_reaches_client(back, sn.ns, sn.eth0, sport, port)
            back.finish_migrations()
        finally:
            back.close()


def test_a_take_over_cut_short_is_finished_by_the_next_load(pin_root: Path) -> None:
    with scratch_node() as sn:
        old = load_lb(pin_root, built(objects_dir()))
        LBMaps(old).set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=sn.eth0))
        LBMaps(old).sync(state(fe(NODE1, 30080, (REMOTE,))))
        port = open_flow(old, sn.ns, sn.eth0, 40001)
        old.close()
        died = load_lb(pin_root, built(LAYOUT_TEST_DIR))         # an agent that died before finishing
        died.close()
        assert sorted(p.name for p in (pin_root / "migrating").iterdir()) == ["ct_fwd__1", "ct_rev__1"]
        again = load_lb(pin_root, built(LAYOUT_TEST_DIR))
        try:
            assert {m.name for m in again.migrations} == {"ct_fwd", "ct_rev"}
            again.finish_migrations()
            assert not (pin_root / "migrating").exists()
            assert reply_reaches_client(again, sn.ns, sn.eth0, 40001, port)
        finally:
            again.close()


class RefusedLoad(BpfObject):
    """An object whose load the kernel refuses (a verifier rejection, say), after the old maps were parked."""

    def _load(self, obj: object) -> int:
        return -22


def test_a_failed_load_gives_the_old_maps_back(pin_root: Path) -> None:
    old = load_lb(pin_root, built(objects_dir()))
    ct_id = map_id(old, "ct_fwd")
    old.close()
    with pytest.raises(BpfError, match="loading BPF object"):
        RefusedLoad(built(LAYOUT_TEST_DIR) / "bpf_lb.o", pin_root)
    fd = lib().bpf_obj_get(str(pin_root / "ct_fwd").encode())
    assert fd >= 0, "the old ct_fwd is not back in its place"
    try:
        assert int(map_info(fd).id) == ct_id
    finally:
        os.close(fd)
    assert not any((pin_root / "migrating").glob("*")) if (pin_root / "migrating").exists() else True


def test_a_map_without_btf_whose_size_changed_starts_empty(pin_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = load_lb(pin_root, built(objects_dir()))
    first.close()
    (pin_root / "ct_fwd").unlink()
    fd = lib().bpf_map_create(9, b"ct_fwd", 16, 40, 1024, ffi().NULL)     # an LRU hash of another value size
    assert fd >= 0 and lib().bpf_obj_pin(fd, str(pin_root / "ct_fwd").encode()) == 0
    assert lib().bpf_map_update_elem(fd, bytes(16), bytes(40), 0) == 0
    os.close(fd)
    again = load_lb(pin_root, built(objects_dir()))
    try:
        assert again.map("ct_fwd").value_size == 48
        assert list(again.map("ct_fwd").items_raw()) == []
        again.finish_migrations()
    finally:
        again.close()
    assert any("cannot be matched" in r.message and "it starts empty" in r.message for r in caplog.records)
