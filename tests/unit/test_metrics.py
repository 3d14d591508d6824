"""The agent's metrics and probes over HTTP, on the in-memory datapath (no root): every STAT_* counter of
lb_structs.h is exposed under its derived name (drops by reason), each bounded map's fill level as
bpflb_map_pressure, sync durations, outcomes and the last good sync; /readyz answers 200 only after the
first full sync, /healthz only while the loop turns (a loop stuck in a sync turns it 503, and 200 again
once it moves). The operator's liveness check fails when its status loop stops turning."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.libbpf import stat_names
from bpflb.datapath.memory import MemoryDatapath, MemoryPins
from bpflb.metrics import AgentMetrics, MetricsServer, OperatorMetrics, split_listen
from bpflb.sources.base import Snapshot
from tests.unit.helpers import NODE, Obj, endpoint_slice, node, service, two_pods, wait_for


class Source:
    """A Source the test controls; snapshot() can be held (a sync that hangs)."""

    def __init__(self, services: list[Obj], slices: list[Obj]) -> None:
        self.snap = Snapshot(services=services, endpointslices=slices, nodes=[node()], config={"bpfLBMode": "SNAT"})
        self.go = threading.Event()
        self.go.set()
        self.broken: str | None = None

    def snapshot(self) -> Snapshot:
        self.go.wait()
        if self.broken:
            raise RuntimeError(self.broken)
        return self.snap

    def wait_for_change(self, timeout: float) -> bool:
        return False


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Agent, MemoryDatapath, Source, AgentMetrics, str]]:
    source = Source([service()], [endpoint_slice(endpoints=two_pods())])
    datapath = MemoryDatapath(MemoryPins())
    agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), source, datapath=datapath)
    agent.metrics = AgentMetrics(agent, stale_after=0.5, fill_interval=0.0)
    server = agent.metrics.serve("127.0.0.1:0")
    try:
        yield agent, datapath, source, agent.metrics, f"http://127.0.0.1:{server.port}"
    finally:
        agent.stop()
        source.go.set()
        server.close()


def test_readiness_follows_the_first_full_sync_and_the_metrics_the_datapath(
        served: tuple[Agent, MemoryDatapath, Source, AgentMetrics, str]) -> None:
    agent, datapath, _source, _metrics, url = served
    agent.start()
    assert get(f"{url}/readyz") == (503, "the first full sync is not done yet\n")
    assert get(f"{url}/healthz")[0] == 200
    # Every counter lb_structs.h defines, whatever its name: drops by reason, the others by name.
    datapath.pins.counters = {name: 100 + idx for idx, name in stat_names().items()}
    before = time.time()
    assert agent.run_once() is not None
    assert get(f"{url}/readyz") == (200, "synced\n")
    status, text = get(f"{url}/metrics")
    assert status == 200
    got = samples(text)
    for idx, name in stat_names().items():
        key = (("bpflb_drop_count_total", (("reason", name.removeprefix("drop_")),)) if name.startswith("drop_")
               else ("bpflb_datapath_packets_total", (("counter", name),)))
        assert got[key] == 100 + idx, key
    assert got[("bpflb_syncs_total", (("result", "ok"),))] == 1
    assert got[("bpflb_sync_duration_seconds_count", ())] == 1
    assert got[("bpflb_last_successful_sync_timestamp_seconds", ())] >= before
    assert got[("bpflb_frontends", ())] == 2 and got[("bpflb_agent_ready", ())] == 1
    # Fill levels: entries over max_entries for each bounded map, none for arrays.
    services = len(datapath.pins.maps["lb_services"])
    assert got[("bpflb_map_entries", (("map_name", "lb_services"),))] == services
    assert got[("bpflb_map_pressure", (("map_name", "lb_services"),))] == pytest.approx(services / 262144)
    assert got[("bpflb_map_pressure", (("map_name", "lb_backends"),))] == pytest.approx(2 / 65536)
    pressured = {labels[0][1] for (metric, labels) in got if metric == "bpflb_map_pressure"}
    assert {"ct_fwd", "ct_rev", "lb_affinity", "lb_maglev", "lb_tunnel_map", "lb_cluster_cidrs"} <= pressured
    assert not pressured & {"lb_config", "lb_stats", "lb_maglev_cfg"}


def test_a_failed_sync_is_counted_and_the_last_good_one_kept(
        served: tuple[Agent, MemoryDatapath, Source, AgentMetrics, str]) -> None:
    agent, _datapath, source, _metrics, url = served
    agent.start()
    assert agent.run_once() is not None
    good = samples(get(f"{url}/metrics")[1])[("bpflb_last_successful_sync_timestamp_seconds", ())]
    source.broken = "the source is broken"
    assert agent.run_once(retry_delay=0) is None
    got = samples(get(f"{url}/metrics")[1])
    assert got[("bpflb_syncs_total", (("result", "error"),))] == 1
    assert got[("bpflb_syncs_total", (("result", "ok"),))] == 1
    assert got[("bpflb_last_successful_sync_timestamp_seconds", ())] == good
    assert get(f"{url}/readyz")[0] == 200                       # ready stays: the datapath serves what it had


def test_liveness_means_the_loop_turns(served: tuple[Agent, MemoryDatapath, Source, AgentMetrics, str]) -> None:
    agent, _datapath, source, _metrics, url = served
    loop = threading.Thread(target=agent.run, name="agent-loop", daemon=True)
    loop.start()
    wait_for("ready", lambda: get(f"{url}/readyz")[0] == 200)
    beat = agent.heartbeat
    wait_for("the loop turning", lambda: agent.heartbeat > beat)
    assert get(f"{url}/healthz")[0] == 200
    # A sync that hangs (the source never answers) stops the loop: past the bound the probe fails ...
    source.go.clear()
    agent.opts.resync_interval = 0.0                           # the next turn starts a sync at once
    wait_for("the probe failing", lambda: get(f"{url}/healthz")[0] == 503)
    assert "has not turned for" in get(f"{url}/healthz")[1]
    # ... and passes again once the loop moves.
    source.go.set()
    wait_for("the probe passing again", lambda: get(f"{url}/healthz")[0] == 200)
    agent.stop()
    loop.join(10)


def test_the_server_answers_what_it_serves_and_refuses_a_bad_address() -> None:
    metrics = OperatorMetrics()
    server = MetricsServer("127.0.0.1:0", metrics.registry, name="operator")
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        metrics.leading(True)
        metrics.reconciled("ok")
        got = samples(get(f"{url}/metrics")[1])
        assert got[("bpflb_operator_leader", ())] == 1
        assert got[("bpflb_operator_reconciles_total", (("result", "ok"),))] == 1
        assert get(f"{url}/nothing")[0] == 404
        with pytest.raises(OSError, match="operator metrics and probes: cannot listen on 127.0.0.1"):
            MetricsServer(f"127.0.0.1:{server.port}", metrics.registry, name="operator").start()
    finally:
        server.close()
    with pytest.raises(ValueError, match="expected ADDR:PORT"):
        split_listen("localhost")


def test_the_node_neighbour_refreshers_counters_are_exposed_when_it_runs(
        served: tuple[Agent, MemoryDatapath, Source, AgentMetrics, str]) -> None:
    agent, datapath, _source, _metrics, url = served
    agent.start()
    assert agent.run_once() is not None
    assert not [k for k in samples(get(f"{url}/metrics")[1]) if k[0].startswith("bpflb_node_neighbour")]
    datapath.node_neighbour_counts = lambda: {"unicast": 40, "broadcast": 3, "mac_changes": 1}  # type: ignore[method-assign]
    got = samples(get(f"{url}/metrics")[1])
    assert got[("bpflb_node_neighbour_arp_requests_total", (("kind", "unicast"),))] == 40
    assert got[("bpflb_node_neighbour_arp_requests_total", (("kind", "broadcast"),))] == 3
    assert got[("bpflb_node_neighbour_mac_changes_total", ())] == 1
