"""Failure stays with its object, on the in-memory datapath (no root): a Service that does not fit a map (too
many frontends, backends, endpoints) is refused alone, oldest Services first, while every other one is
programmed; deleting it lets the rest in at the next sync; deletions make room before additions; a map's
mirror never disagrees with the map after a refused write; an agent started on maps a previous one filled
recovers; a change re-translates and rewrites only the Service it touches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.lbmaps import BackendMirror, ServiceMirror, svc_key
from bpflb.datapath.mapdiff import MapMirror
from bpflb.datapath.memory import MemoryDatapath, MemoryPins
from bpflb.model.budget import SLOTS_MAX
from tests.unit.helpers import (
    NODE,
    NODE_EXTERNAL,
    NODE_INTERNAL,
    Obj,
    StaticSource,
    endpoint,
    endpoint_slice,
    l4,
)

CONFIG = {"bpfLBMode": "SNAT"}


def svc(name: str, created: str, node_port: int | None = None, external_ips: int = 0, ports: int = 1,
        first_ip: int = 0) -> Obj:
    """A Service created at `created`: a NodePort, or externalIPs (from the first_ip-th) x ports."""
    spec: dict[str, Any] = {"type": "NodePort" if node_port else "ClusterIP", "selector": {"app": name}}
    spec["ports"] = [{"name": f"p{i}", "port": 1000 + i, "targetPort": 8080, "protocol": "TCP",
                      **({"nodePort": node_port + i} if node_port else {})} for i in range(ports)]
    if external_ips:
        spec["externalIPs"] = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(first_ip, first_ip + external_ips)]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created}, "spec": spec}


def eps(service_name: str, count: int, base: int = 0, ports: int = 1) -> Obj:
    """An EndpointSlice of `count` ready endpoints (10.x addresses from base) for every port of the Service."""
    return endpoint_slice(service_name, [endpoint(f"10.{(base + i) // 65536 % 256}.{(base + i) // 256 % 256}."
                                                  f"{(base + i) % 256}", "node-b", f"{service_name}-{i}")
                                         for i in range(count)],
                          ports=[{"name": f"p{i}", "port": 8080, "protocol": "TCP"} for i in range(ports)])


def agent_on(tmp_path: Path, pins: MemoryPins, services: list[Obj], slices: list[Obj]
             ) -> tuple[Agent, MemoryDatapath, StaticSource]:
    source = StaticSource(services, slices, CONFIG)
    datapath = MemoryDatapath(pins)
    agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), source, datapath=datapath)
    agent.start()
    return agent, datapath, source


def masters(pins: MemoryPins) -> set[int]:
    """The ports of the frontends programmed (master slots of lb_services)."""
    return {int.from_bytes(k[4:6], "big") for k in pins.maps.get("lb_services", {}) if k[6:8] == b"\0\0"}


def within_capacity(datapath: MemoryDatapath) -> None:
    for name, m in datapath.opened.items():
        assert m.peak <= m.max_entries, f"{name} held {m.peak} entries at once; it has room for {m.max_entries}"


def test_a_service_with_too_many_frontends_is_refused_alone_and_admitted_once_room_appears(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pins = MemoryPins(capacity={"lb_dsr_frontends": 64})
    old, new = svc("old", "2024-01-01T00:00:00Z", 30001), svc("new", "2024-01-03T00:00:00Z", 30002)
    big = svc("big", "2024-01-02T00:00:00Z", external_ips=10, ports=10)        # 100 DSR frontends
    slices = [eps("old", 2), eps("new", 2, 100), eps("big", 3, 200, ports=10)]
    agent, datapath, source = agent_on(tmp_path, pins, [old, big, new], slices)
    report = agent.run_once()
    assert report is not None and agent.last_error is None
    assert masters(pins) == {30001, 30002}            # both NodePorts, on both node addresses
    assert list(agent.refused) == ["default/big"]
    problem = agent.refused["default/big"]
    assert problem.obj == "Service default/big" and "DSR frontends" in problem.field
    assert "lb_dsr_frontends" in problem.reason and "64" in problem.reason
    assert any("refused: Service default/big" in r.message for r in caplog.records)
    assert len(pins.maps["lb_dsr_frontends"]) <= 64
    within_capacity(datapath)

    source.snap.services = [old, new]                # the culprit is deleted: nothing refused any more
    assert agent.run_once() is not None and agent.refused == {}
    source.snap.services = [old, new, big]           # back, as the newest now: it fits if the others leave room
    source.snap.endpointslices = slices
    assert agent.run_once() is not None and list(agent.refused) == ["default/big"]
    assert masters(pins) == {30001, 30002}
    within_capacity(datapath)


def test_two_services_overflowing_lb_backends_the_older_keeps_its_place(tmp_path: Path) -> None:
    pins = MemoryPins(capacity={"lb_backends": 100})
    first, second = svc("first", "2024-01-01T00:00:00Z", 30001), svc("second", "2024-01-02T00:00:00Z", 30002)
    small = svc("small", "2024-01-03T00:00:00Z", 30003)
    slices = [eps("first", 60), eps("second", 60, 1000), eps("small", 5, 2000)]
    agent, datapath, source = agent_on(tmp_path, pins, [second, small, first], slices)
    assert agent.run_once() is not None
    assert masters(pins) == {30001, 30003} and list(agent.refused) == ["default/second"]
    assert "lb_backends" in agent.refused["default/second"].reason
    source.snap.services = [second, small]                   # the older one is deleted: the newer one fits now
    assert agent.run_once() is not None
    assert masters(pins) == {30002, 30003} and agent.refused == {}
    assert len(pins.maps["lb_backends"]) == 65
    within_capacity(datapath)


def test_a_service_port_with_more_endpoints_than_a_frontend_holds_is_refused_alone(tmp_path: Path) -> None:
    pins = MemoryPins()
    huge, small = svc("huge", "2024-01-01T00:00:00Z", 30001), svc("small", "2024-01-02T00:00:00Z", 30002)
    slices = [eps("huge", SLOTS_MAX + 1), eps("small", 3, 100_000)]
    agent, _datapath, source = agent_on(tmp_path, pins, [huge, small], slices)
    report = agent.run_once()
    assert report is not None and agent.last_error is None
    assert masters(pins) == {30002}
    problem = agent.refused["default/huge"]
    assert "65,536 endpoints" in problem.reason and "at most 65,535" in problem.reason
    assert problem.field == "endpoints (EndpointSlices)"
    source.snap.endpointslices = [eps("huge", 10), slices[1]]       # scaled down: served at the next sync
    assert agent.run_once() is not None and masters(pins) == {30001, 30002} and agent.refused == {}


def test_deletions_make_room_before_additions(tmp_path: Path) -> None:
    """A full map: one Service replaced by another of the same size in one sync, and one Service whose every
    backend changes. Neither fits if the new entries came before the old ones left."""
    pins = MemoryPins(capacity={"lb_services": 40, "lb_backends": 40})
    gone, kept = svc("gone", "2024-01-01T00:00:00Z", 30001), svc("kept", "2024-01-02T00:00:00Z", 30002)
    agent, datapath, source = agent_on(tmp_path, pins, [gone, kept], [eps("gone", 9), eps("kept", 9, 100)])
    assert agent.run_once() is not None and masters(pins) == {30001, 30002}   # 2 x 2 x (1 + 9) = 40 entries
    came = svc("came", "2024-01-03T00:00:00Z", 30003)
    source.snap.services = [kept, came]
    source.snap.endpointslices = [eps("kept", 9, 200), eps("came", 9, 300)]  # kept: every backend replaced
    report = agent.run_once()
    assert report is not None and not report.failures and agent.refused == {}
    assert masters(pins) == {30002, 30003}
    assert len(pins.maps["lb_services"]) == 40 and len(pins.maps["lb_backends"]) == 18
    within_capacity(datapath)


def test_a_refused_batch_leaves_the_mirror_equal_to_the_map(tmp_path: Path) -> None:
    pins = MemoryPins()
    services = [svc(f"s{i}", f"2024-01-01T00:00:{i:02}Z", 30000 + i) for i in range(6)]
    agent, datapath, _source = agent_on(tmp_path, pins, services, [eps(f"s{i}", 3, 10 * i) for i in range(6)])
    bad = svc_key(l4(NODE_INTERNAL, 30003), 2)          # a slot in the middle of the batch
    datapath.map("lb_services").fail = lambda key: "injected ENOMEM" if key == bad else None
    report = agent.run_once()
    assert report is not None and [f.frontend for f in report.failures] == [l4(NODE_INTERNAL, 30003)]
    assert datapath.maps is not None and datapath.cluster is not None
    mirrors: list[MapMirror | ServiceMirror | BackendMirror] = [datapath.maps._svc_m, datapath.maps._be_m, datapath.maps._mg_m,
                                                datapath.maps._am_m, datapath.cluster.dsr_frontends,
                                                datapath.cluster.local_backends]
    for mirror in mirrors:
        assert mirror.entries == pins.maps[mirror.map.name], f"{mirror.map.name}: mirror and map disagree"
    assert svc_key(l4(NODE_EXTERNAL, 30003), 0) in pins.maps["lb_services"]   # its other frontend is served
    datapath.map("lb_services").fail = lambda key: None
    assert agent.run_once() is not None and not agent.refused
    assert svc_key(l4(NODE_INTERNAL, 30003), 0) in pins.maps["lb_services"]


def test_an_agent_started_on_full_maps_a_previous_one_left_recovers(tmp_path: Path) -> None:
    """The wedge of issue 15: a previous agent (no budget) filled the maps with an oversized Service and
    died. A new agent on those pins refuses it, removes its entries first and programs everything else."""
    pins = MemoryPins()
    big = svc("big", "2024-01-02T00:00:00Z", external_ips=10, ports=10)
    small = svc("small", "2024-01-01T00:00:00Z", 30001)
    before, _, _ = agent_on(tmp_path, pins, [big, small], [eps("big", 2, ports=10), eps("small", 2, 100)])
    assert before.run_once() is not None and len(pins.maps["lb_dsr_frontends"]) == 100 + 2
    pins.capacity = {"lb_dsr_frontends": 64}        # this build's map holds fewer than the pins do now
    came = svc("came", "2024-01-03T00:00:00Z", 30002)
    agent, _datapath, _ = agent_on(tmp_path, pins, [big, small, came],
                                  [eps("big", 2, ports=10), eps("small", 2, 100), eps("came", 2, 200)])
    report = agent.run_once()
    assert report is not None and agent.last_error is None and not report.failures
    assert list(agent.refused) == ["default/big"] and masters(pins) == {30001, 30002}
    assert len(pins.maps["lb_dsr_frontends"]) == 4


def test_a_change_retranslates_and_rewrites_only_the_service_it_touches(tmp_path: Path) -> None:
    pins = MemoryPins()
    services = [svc(f"s{i}", "2024-01-01T00:00:00Z", 30000 + i) for i in range(50)]
    slices = [eps(f"s{i}", 4, 10 * i) for i in range(50)]
    agent, datapath, source = agent_on(tmp_path, pins, services, slices)
    assert agent.run_once() is not None and agent.state is not None
    before = dict(agent.state.frontends)
    writes = sum(m.writes for m in datapath.opened.values())
    source.snap.endpointslices = [*slices[:7], eps("s7", 5, 70), *slices[8:]]    # one Service gains an endpoint
    report = agent.run_once()
    assert report is not None and agent.state is not None
    changed = {k for k, fe in agent.state.frontends.items() if before[k] is not fe}
    assert {fe.l4.port for k, fe in agent.state.frontends.items() if k in changed} == {30007}
    assert len(changed) == 2                                          # its NodePort on both node addresses
    assert (report.slots_written, report.backends_written) == (4, 1)  # two new slots, two new masters
    assert sum(m.writes for m in datapath.opened.values()) - writes == 4 + 1      # and nothing else, anywhere


def test_incremental_cluster_facts_equal_a_full_computation(tmp_path: Path) -> None:
    """DSR frontends (with their kind), DSR members, local backends and internal views written change by change
    hold what computing them afresh gives."""
    from bpflb.datapath.clustermaps import dsr_member_key, l4_key
    from bpflb.model.cluster import dsr_backends, dsr_frontends, local_backends, node_addresses

    pins = MemoryPins()
    services = [svc(f"s{i}", "2024-01-01T00:00:00Z", 30000 + i) for i in range(6)]
    for i, service in enumerate(services[:3]):          # some with a clusterIP: the NodePort's internal view
        service["spec"]["clusterIP"] = f"10.96.0.{i + 1}"
    services[4]["spec"]["externalIPs"] = ["198.51.100.7"]  # not the node's own: not served in-cluster
    slices = [endpoint_slice(f"s{i}", [endpoint(f"10.1.{i}.1", NODE, f"s{i}-a"),
                                       endpoint(f"10.2.{i}.1", "node-b", f"s{i}-b")],
                             ports=[{"name": "p0", "port": 8080, "protocol": "TCP"}]) for i in range(6)]
    agent, _datapath, source = agent_on(tmp_path, pins, services, slices)
    local = {**services[2], "spec": {**services[2]["spec"], "externalTrafficPolicy": "Local"}}
    steps: list[Callable[[], None]] = [lambda: None,
             lambda: setattr(source.snap, "services", services[1:]),                       # one gone
             lambda: setattr(source.snap, "services", [*services[1:2], local, *services[3:]]),  # eTP Local
             lambda: setattr(source.snap, "endpointslices", slices[:4]),                  # endpoints gone
             lambda: setattr(source.snap, "services", services)]                           # all back
    for step in steps:
        step()
        assert agent.run_once() is not None and agent.state is not None
        assert step is steps[0] or agent.state.changes is not None          # the incremental path
        addrs = node_addresses(source.snap)
        assert pins.maps["lb_dsr_frontends"] == {l4_key(x): bytes([kind])
                                                 for x, kind in dsr_frontends(agent.state, addrs).items()}
        assert pins.maps["lb_dsr_backends"] == {dsr_member_key(fe, be): b"\x01"
                                                for fe, be in dsr_backends(agent.state)}
        assert set(pins.maps["lb_local_backends"]) == {l4_key(x) for x in local_backends(agent.state)}
        views = {l4_key(fe.l4): l4_key(fe.internal) if fe.in_cluster and fe.internal is not None else bytes(8)
                 for fe in agent.state.frontends.values() if not fe.in_cluster or fe.internal is not None}
        assert pins.maps["lb_internal_view"] == views and len(views) >= 3


def test_a_mode_switch_retranslates_nothing(tmp_path: Path) -> None:
    services = [svc(f"s{i}", "2024-01-01T00:00:00Z", 30000 + i) for i in range(20)]
    agent, datapath, source = agent_on(tmp_path, MemoryPins(), services, [eps(f"s{i}", 3, 10 * i) for i in range(20)])
    assert agent.run_once() is not None and agent.state is not None
    before = dict(agent.state.frontends)
    writes = {name: m.writes for name, m in datapath.opened.items()}
    source.snap.config = {"bpfLBMode": "DSR"}
    report = agent.run_once()
    assert report is not None and report.config_changed and agent.state is not None
    assert agent.state.changes == set()                                   # nothing to re-translate
    assert all(agent.state.frontends[k] is fe for k, fe in before.items())
    after = {name: m.writes for name, m in datapath.opened.items()}
    assert {name: n - writes.get(name, 0) for name, n in after.items() if n != writes.get(name, 0)} == \
        {"lb_config": 1}                                                  # the mode, and nothing else


def test_every_node_refuses_the_same_services_whatever_order_it_hears_of_them(tmp_path: Path) -> None:
    """Oldest first (creationTimestamp), then by namespace/name: the order of the source's lists, or of the
    events that built them, never decides."""
    services = [svc(f"s{i}", f"2024-01-01T00:00:{i % 3:02}Z", external_ips=4, ports=2, first_ip=4 * i)
                for i in range(12)]
    slices = [eps(f"s{i}", 2, 10 * i, ports=2) for i in range(12)]
    refused = []
    for k, order in enumerate((services, services[::-1], services[5:] + services[:5])):
        (tmp_path / str(k)).mkdir()
        agent, _, _ = agent_on(tmp_path / str(k), MemoryPins(capacity={"lb_dsr_frontends": 40}), order, slices)
        assert agent.run_once() is not None
        refused.append(sorted(agent.refused))
    # 8 DSR frontends each, 5 fit: created first s0 s3 s6 s9, then s1 (by name: s1 < s10 < s4 < s7)
    assert refused[0] == refused[1] == refused[2] == sorted(f"default/s{i}" for i in (10, 4, 7, 2, 5, 8, 11))
