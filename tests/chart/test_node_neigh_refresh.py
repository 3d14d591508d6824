"""The peer-node neighbour refresh from the Helm value to the agent's command line: values.schema.json checks
it, the chart hands it to the operator (agent-pod.yaml), the operator refuses a bad one naming it and puts it
into the agents' DaemonSet as --node-neigh-refresh, with the NET_RAW capability its ARP requests need."""

from __future__ import annotations

import helm_python as helm
import pytest

from bpflb.control.manifests import AgentPod, agent_daemonset
from tests.chart.helpers import render
from tests.chart.test_nat_port_range import agent_command


def refresh(command: list[str]) -> str:
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith("--node-neigh-refresh="))


def test_the_default_and_a_set_interval_reach_the_agent() -> None:
    assert refresh(agent_command({})) == "0.5"
    assert refresh(agent_command({"nodeNeighRefresh": 2})) == "2"
    assert refresh(agent_command({"nodeNeighRefresh": 0})) == "0"


def test_the_agents_may_send_arp_requests() -> None:
    ds = agent_daemonset(pod=AgentPod())
    caps = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert "NET_RAW" in caps["add"] and caps["drop"] == ["ALL"]


@pytest.mark.parametrize("bad", [-1, 7200, "fast"])
def test_the_schema_refuses_a_bad_interval(bad: object) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"nodeNeighRefresh": bad})
    assert "at '/nodeNeighRefresh'" in str(caught.value)


@pytest.mark.parametrize(("bad", "why"), [(-1, "from 0 (off) to 3600"), ("0.5", "must be seconds"),
                                          (True, "must be seconds")])
def test_the_operator_refuses_a_bad_interval_naming_it(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=r"agent-pod.yaml: nodeNeighRefresh: ") as caught:
        AgentPod.from_mapping({"nodeNeighRefresh": bad}, where="agent-pod.yaml")
    assert why in str(caught.value)
