"""The agent's in-cluster wiring on the in-memory datapath (no root): the socket LB follows the configuration's
socketLB and the agent's --no-socket-lb, the pods' veths get the pod-facing path at a sync and between syncs,
and the pod path's sources are this node's pod CIDRs (every source when its Node has none)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.clustermaps import cidr_key
from bpflb.datapath.memory import MemoryDatapath
from bpflb.sources.base import Snapshot
from tests.unit.helpers import NODE, Obj, endpoint_slice, node, service, two_pods

CGROUP = Path("/sys/fs/cgroup/unified/bpflb-test")


class StaticSource:
    """A Source whose snapshot is whatever the test put there."""

    def __init__(self, config: dict[str, str] | None, nodes: list[Obj]) -> None:
        self.snap = Snapshot(services=[service(clusterIP="10.96.0.10")], endpointslices=[endpoint_slice(
            endpoints=two_pods())], nodes=nodes, config=config)

    def snapshot(self) -> Snapshot:
        return self.snap

    def wait_for_change(self, timeout: float) -> bool:
        return False


def with_pod_cidr(cidr: str | None) -> Obj:
    obj = node()
    if cidr is not None:
        obj["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    return obj


def make_agent(tmp_path: Path, config: dict[str, str] | None = None, *, socket_lb: bool = True,
               pod_cidr: str | None = "10.244.1.0/24") -> tuple[Agent, MemoryDatapath, StaticSource]:
    source = StaticSource(config, [with_pod_cidr(pod_cidr)])
    datapath = MemoryDatapath(cgroup_root=CGROUP)
    opts = AgentOptions(NODE, tmp_path, device="eth0", cgroup_root=CGROUP, socket_lb=socket_lb)
    agent = Agent(opts, source, datapath=datapath)
    agent.start()
    return agent, datapath, source


def test_the_socket_lb_follows_socketlb_live(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent, datapath, source = make_agent(tmp_path)
    with caplog.at_level(logging.INFO, logger="bpflb.agent"):
        assert agent.run_once() is not None
        assert datapath.socket_lb == CGROUP                        # on by default
        source.snap.config = {"socketLB": "false"}                 # a cluster that keeps kube-proxy
        assert agent.run_once() is not None
        assert datapath.socket_lb is None
        source.snap.config = {"socketLB": "true"}
        assert agent.run_once() is not None
    assert datapath.socket_lb == CGROUP
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("in-cluster: socket LB")]
    assert said == [f"in-cluster: socket LB attached to cgroup {CGROUP}",
                    f"in-cluster: socket LB detached from cgroup {CGROUP}",
                    f"in-cluster: socket LB attached to cgroup {CGROUP}"]


def test_no_socket_lb_flag_keeps_it_off_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent, datapath, _ = make_agent(tmp_path, socket_lb=False)
    with caplog.at_level(logging.WARNING, logger="bpflb.agent"):
        assert agent.run_once() is not None
        assert agent.run_once() is not None
    assert datapath.socket_lb is None
    said = [r.getMessage() for r in caplog.records if "--no-socket-lb" in r.getMessage()]
    assert len(said) == 1 and "socketLB is true" in said[0]


def test_pod_veths_get_the_pod_path_at_a_sync_and_between_syncs(tmp_path: Path) -> None:
    agent, datapath, _ = make_agent(tmp_path)
    datapath.pod_devices = {7: "vethaaaa"}
    assert agent.run_once() is not None
    assert datapath.pod_path == {7: "vethaaaa"}
    datapath.pod_devices[9] = "vethbbbb"                          # a new pod, no Service changed
    agent._refresh_pods()
    assert datapath.pod_path == {7: "vethaaaa", 9: "vethbbbb"}
    del datapath.pod_devices[7]                                    # a pod gone
    agent._refresh_pods()
    assert datapath.pod_path == {9: "vethbbbb"}


@pytest.mark.parametrize(("pod_cidr", "sources"), [("10.244.1.0/24", "10.244.1.0/24"), (None, "0.0.0.0/0")])
def test_the_pod_paths_sources_are_this_nodes_pod_cidrs(tmp_path: Path, pod_cidr: str | None, sources: str) -> None:
    agent, datapath, _ = make_agent(tmp_path, pod_cidr=pod_cidr)
    assert agent.run_once() is not None
    assert set(datapath.pins.maps["lb_pod_cidrs"]) == {cidr_key(IPv4Network(sources))}


def test_uninstall_takes_the_in_cluster_paths_away(tmp_path: Path) -> None:
    agent, datapath, source = make_agent(tmp_path)
    datapath.pod_devices = {7: "vethaaaa"}
    assert agent.run_once() is not None
    source.snap.config = {"uninstall": "true"}
    assert agent.run_once() is None
    assert datapath.uninstalled and datapath.socket_lb is None and datapath.pod_path == {}
