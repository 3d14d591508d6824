"""The agent's logic on the in-memory datapath (no root): a sync programs what the objects say, a failed write
of one frontend leaves that frontend out (reported) while everything else is programmed and the next sync
recovers, a mode switch rewrites lb_config and nothing else, a restart on existing (pinned) state writes
nothing, the agents' configuration acts (debugLogging, svcSourceRangeCheck, uninstall), DSR requests
are accepted for this node's backends of the named frontend only, and the neighbour watcher lives while the
agent does."""

from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.clustermaps import dsr_member_key
from bpflb.datapath.lbmaps import svc_key
from bpflb.datapath.memory import MemoryDatapath, MemoryPins
from bpflb.model.cluster import ANY_NODE
from bpflb.model.types import L4Addr, Mode, Proto
from tests.unit.helpers import (
    NODE,
    NODE_EXTERNAL,
    NODE_INTERNAL,
    Obj,
    StaticSource,
    endpoint,
    endpoint_slice,
    l4,
    service,
    two_pods,
)


def two_services() -> tuple[list[Obj], list[Obj]]:
    other = service("other", ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30090}])
    slices = [endpoint_slice(endpoints=two_pods()),
              endpoint_slice("other", [endpoint("10.0.3.1", NODE, "other-1")])]
    return [service(), other], slices


def make_agent(tmp_path: Path, pins: MemoryPins, config: dict[str, str] | None = None,
               **kwargs: Any) -> tuple[Agent, MemoryDatapath, StaticSource]:
    services, slices = two_services()
    source = StaticSource(services, slices, {"bpfLBMode": "SNAT"} if config is None else config)
    datapath = MemoryDatapath(pins)
    agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), source, datapath=datapath, **kwargs)
    agent.start()
    return agent, datapath, source


def lb_config_mode(datapath: MemoryDatapath) -> Mode | None:
    assert datapath.maps is not None
    return datapath.maps.mode()


def test_a_sync_programs_every_frontend_and_attaches_once(tmp_path: Path) -> None:
    agent, datapath, _ = make_agent(tmp_path, MemoryPins())
    report = agent.run_once()
    assert report is not None and report.frontends_added == 4 and agent.last_error is None   # 2 per address
    assert datapath.attached == "eth0"
    services = datapath.pins.maps["lb_services"]
    for port, count in ((30080, 2), (30090, 1)):
        master = datapath.map("lb_services").decode_value(services[svc_key(l4(NODE_INTERNAL, port), 0)])
        assert master.count == count
    assert len(datapath.pins.maps["lb_backends"]) == 3
    assert lb_config_mode(datapath) == Mode.SNAT
    assert (tmp_path / "ready").is_symlink()          # the ready marker after the first good sync
    again = agent.run_once()
    assert again is not None and not again.changed       # nothing differs: nothing written


def test_a_failed_write_stays_with_its_frontend_and_the_next_sync_recovers(tmp_path: Path) -> None:
    services, slices = two_services()
    agent, datapath, source = make_agent(tmp_path, MemoryPins())
    source.snap.services, source.snap.endpointslices = services[1:], slices[1:]
    assert agent.run_once() is not None                  # Service other is programmed
    programmed = dict(datapath.pins.maps["lb_services"])

    bad = svc_key(l4(NODE_INTERNAL, 30080), 0)
    datapath.map("lb_services").fail = lambda key: "injected E2BIG" if key == bad else None
    source.snap.services, source.snap.endpointslices = services, slices
    report = agent.run_once(retry_delay=0)
    assert report is not None and agent.last_error is None           # the sync went on without it
    assert [(f.frontend, f.map_name) for f in report.failures] == [(l4(NODE_INTERNAL, 30080), "lb_services")]
    assert "injected E2BIG" in str(agent.refused["default/echo"])
    held = datapath.pins.maps["lb_services"]
    assert bad not in held and not any(k[:6] == bad[:6] for k in held)   # none of its slots either
    assert programmed.items() <= held.items()                          # other's entries untouched
    assert svc_key(l4(NODE_EXTERNAL, 30080), 0) in held                # echo's other frontend is served

    datapath.map("lb_services").fail = lambda key: None
    report = agent.run_once()
    assert report is not None and agent.last_error is None and report.frontends_added == 1
    assert bad in datapath.pins.maps["lb_services"] and agent.refused == {}


def test_a_mode_switch_rewrites_lb_config_and_nothing_else(tmp_path: Path) -> None:
    agent, datapath, source = make_agent(tmp_path, MemoryPins())
    assert agent.run_once() is not None and lb_config_mode(datapath) == Mode.SNAT
    services_before = dict(datapath.pins.maps["lb_services"])
    for mode in (Mode.DSR, Mode.HYBRID, Mode.SNAT):
        source.snap.config = {"bpfLBMode": mode.label}
        report = agent.run_once()
        assert report is not None and report.config_changed
        assert (report.slots_written, report.backends_written, report.frontends_removed) == (0, 0, 0)
        assert lb_config_mode(datapath) == mode and agent.mode == mode
    assert datapath.pins.maps["lb_services"] == services_before


def test_a_restart_on_existing_state_recovers_ids_and_writes_nothing(tmp_path: Path) -> None:
    pins = MemoryPins()
    first, _before, _ = make_agent(tmp_path, pins, {"bpfLBMode": "DSR", "lbAlgorithm": "Maglev"})
    assert first.run_once() is not None
    held = {name: dict(entries) for name, entries in pins.maps.items()}
    restarted, after, _ = make_agent(tmp_path, pins, {"bpfLBMode": "DSR", "lbAlgorithm": "Maglev"})
    assert restarted.mode == Mode.DSR                     # what the pinned lb_config holds, before any sync
    report = restarted.run_once()
    assert report is not None and not report.changed and report.maglev_tables_built == 2   # a new cache
    assert {name: dict(entries) for name, entries in pins.maps.items()} == held
    assert sum(m.writes for m in after.opened.values()) == 0


def test_a_restarted_agents_partial_syncs_remove_nothing_until_the_view_is_complete(tmp_path: Path) -> None:
    """While the first list comes in, the agent programs the Services listed so far (Snapshot.partial): on a
    previous agent's maps, those syncs add and update but never remove what the partial view lacks (the
    Services not listed yet keep serving, their cluster-wide keys too), and the first complete sync removes
    what no Service wants any more."""
    pins = MemoryPins()
    first, _, _ = make_agent(tmp_path, pins, {"bpfLBMode": "DSR"})
    assert first.run_once() is not None
    held = {name: set(entries) for name, entries in pins.maps.items()}
    echo = svc_key(l4(NODE_INTERNAL, 30080), 0)
    restarted, datapath, source = make_agent(tmp_path, pins, {"bpfLBMode": "DSR"})
    services, slices = two_services()
    grown = endpoint_slice("other", [endpoint("10.0.3.1", NODE, "other-1"), endpoint("10.0.3.2", NODE, "other-2")])
    listed = replace(source.snap, services=[services[1]], endpointslices=[slices[0], grown], partial=True)
    report = restarted.sync_once(listed)            # "other" listed (and grown), "echo" not yet
    assert report is not None and report.slots_written and not report.frontends_removed
    assert (report.slots_removed, report.backends_removed) == (0, 0)
    assert all(held[name] <= set(pins.maps[name]) for name in held)        # every key still there
    assert echo in pins.maps["lb_services"]
    other = datapath.map("lb_services").decode_value(pins.maps["lb_services"][svc_key(l4(NODE_INTERNAL, 30090), 0)])
    assert other.count == 2
    # The list completes without "echo" (deleted meanwhile): now it goes, with its cluster-wide keys.
    source.snap = replace(listed, partial=False)
    done = restarted.run_once()
    assert done is not None and done.frontends_removed == 2
    assert echo not in pins.maps["lb_services"]
    assert len(pins.maps["lb_dsr_frontends"]) < len(held["lb_dsr_frontends"])


def test_partial_syncs_leave_only_the_rest_of_the_list_to_the_complete_sync(tmp_path: Path) -> None:
    """On fresh maps, what the partial syncs programmed is not written again: the complete sync writes only the
    Services listed after them."""
    agent, _, source = make_agent(tmp_path, MemoryPins())
    partial = agent.sync_once(replace(source.snap, services=source.snap.services[:1], partial=True))
    assert partial is not None and partial.frontends_added == 2 and partial.backends_written == 2
    done = agent.run_once()
    assert done is not None and (done.frontends_added, done.backends_written, done.frontends_removed) == (2, 1, 0)
    assert done.slots_written == 4                      # "other": a slot and a master on each of its 2 frontends
    assert (tmp_path / "ready").is_symlink()


def test_the_maglev_table_cache_builds_each_table_once(tmp_path: Path) -> None:
    agent, _datapath, source = make_agent(tmp_path, MemoryPins(), {"bpfLBMode": "SNAT", "lbAlgorithm": "Maglev"})
    first = agent.run_once()
    assert first is not None and first.maglev_tables_built == 2      # two backend sets, two tables
    source.snap.config = {"bpfLBMode": "DSR", "lbAlgorithm": "Maglev"}
    again = agent.run_once()
    assert again is not None and again.maglev_tables_built == 0     # same backends: from the cache
    source.snap.endpointslices = [endpoint_slice(endpoints=two_pods()[:1]), source.snap.endpointslices[1]]
    changed = agent.run_once()
    assert changed is not None and changed.maglev_tables_built == 1  # only the changed set is rebuilt


def test_debug_logging_and_source_range_check_act(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    agent, datapath, source = make_agent(tmp_path, MemoryPins(),
                                         {"bpfLBMode": "SNAT", "debugLogging": "true", "svcSourceRangeCheck": "true"})
    ranged = service("ranged", type_="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"],
                     ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30100}])
    ranged["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    source.snap.services.append(ranged)
    source.snap.endpointslices.append(endpoint_slice("ranged", endpoints=two_pods()))
    try:
        assert agent.run_once() is not None
        assert logging.getLogger("bpflb").level == logging.DEBUG
        assert len(datapath.pins.maps["lb_src_ranges"]) == 1          # svcSourceRangeCheck true: enforced
        source.snap.config = {"bpfLBMode": "SNAT"}
        assert agent.run_once() is not None and agent.run_once() is not None
        assert logging.getLogger("bpflb").level == logging.NOTSET
        assert datapath.pins.maps["lb_src_ranges"] == {}               # false: the prefixes are gone...
        said = [r.getMessage() for r in caplog.records if "not enforced" in r.getMessage()]
        assert len(said) == 1 and "Service default/ranged" in said[0] and "svcSourceRangeCheck is false" in said[0]
    finally:
        logging.getLogger("bpflb").setLevel(logging.NOTSET)


def test_uninstall_removes_the_state_and_a_later_config_brings_it_back(tmp_path: Path) -> None:
    pins = MemoryPins()
    agent, datapath, source = make_agent(tmp_path, pins)
    assert agent.run_once() is not None and pins.maps["lb_services"]
    source.snap.config = {"bpfLBMode": "SNAT", "uninstall": "true"}
    assert agent.run_once() is None and agent.uninstalled and datapath.uninstalled and not pins.maps
    source.snap.config = {"bpfLBMode": "SNAT"}
    report = agent.run_once()
    assert report is not None and report.frontends_added == 4 and not agent.uninstalled
    assert datapath.attached == "eth0" and datapath.loads == 2


def test_dsr_requests_are_accepted_for_this_nodes_backends_of_the_named_frontend_only(tmp_path: Path) -> None:
    agent, datapath, source = make_agent(tmp_path, MemoryPins(), {"bpfLBMode": "DSR"})
    assert agent.run_once() is not None

    def pair(port: int, pod: str) -> bytes:     # a NodePort's frontend is listed once, under address 0
        return dsr_member_key(L4Addr(ANY_NODE, port, Proto.TCP), L4Addr(IPv4Address(pod), 8080, Proto.TCP))

    # echo-1 and other-1 run on this node; echo-2 on node-b is not this node's to accept.
    assert set(datapath.pins.maps["lb_dsr_backends"]) == {pair(30080, "10.0.1.1"), pair(30090, "10.0.3.1")}
    source.snap.endpointslices = [endpoint_slice(endpoints=two_pods()[1:]), source.snap.endpointslices[1]]
    assert agent.run_once() is not None
    assert set(datapath.pins.maps["lb_dsr_backends"]) == {pair(30090, "10.0.3.1")}


def test_the_neighbour_watcher_runs_from_attach_until_the_agent_ends_or_uninstalls(tmp_path: Path) -> None:
    during: list[bool] = []

    def after_sync(a: Agent, _report: object) -> None:
        assert isinstance(a.datapath, MemoryDatapath)
        during.append(a.datapath.watching_neighbours)
        a.stop()

    agent, datapath, _ = make_agent(tmp_path, MemoryPins(), on_sync=after_sync)
    assert not datapath.watching_neighbours
    agent.run()                                   # one sync (the hook stops the loop), then the agent ends
    assert during == [True]
    assert datapath.attached == "eth0" and not datapath.watching_neighbours   # the programs stay attached
    (tmp_path / "other").mkdir()
    other, memory, source = make_agent(tmp_path / "other", MemoryPins())
    assert other.run_once() is not None and memory.watching_neighbours
    source.snap.config = {"bpfLBMode": "SNAT", "uninstall": "true"}
    assert other.run_once() is None and not memory.watching_neighbours
    source.snap.config = {"bpfLBMode": "SNAT"}
    assert other.run_once() is not None and memory.watching_neighbours       # attached again: watching again


class ReportSource(StaticSource):
    """What agent_report reads of the kube source."""

    connected = True
    last_config: dict[str, str] | None = None

    def errors(self) -> list[str]:
        return []


def test_the_node_report_lists_the_fields_not_acted_on(tmp_path: Path) -> None:
    from bpflb.control.report import IGNORED_SHOWN, agent_report

    services, slices = two_services()
    ranged = service("ranged", type_="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/24"],
                     loadBalancerClass="example.com/lb",
                     ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30100}])
    ranged["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    source = ReportSource([*services, ranged], [*slices, endpoint_slice("ranged", endpoints=two_pods())],
                          {"bpfLBMode": "SNAT"})
    agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), source, datapath=MemoryDatapath())
    agent.start()
    report = agent.run_once()
    lines = agent_report(agent, source, report)["notActedOn"].splitlines()     # type: ignore[arg-type]
    assert len(lines) == 2 and all(line.startswith("Service default/ranged: spec.") for line in lines)
    assert any("loadBalancerSourceRanges: set but not enforced" in line for line in lines)
    source.snap.config = {"bpfLBMode": "SNAT", "svcSourceRangeCheck": "true"}
    agent.run_once()
    assert "loadBalancerSourceRanges" not in agent_report(agent, source, report)["notActedOn"]  # type: ignore[arg-type]
    # A cluster with many: the report lists the first ones and says where the rest is.
    many = [service(f"s{i}", trafficDistribution="PreferClose",
                    ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 31000 + i}])
            for i in range(IGNORED_SHOWN + 5)]
    source.snap.services = many
    agent.run_once()
    lines = agent_report(agent, source, report)["notActedOn"].splitlines()      # type: ignore[arg-type]
    assert len(lines) == IGNORED_SHOWN + 1 and lines[-1] == "... and 5 more in the agent's log"
