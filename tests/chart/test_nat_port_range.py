"""The SNAT port range setting from the Helm value to the agent's command line: values.schema.json checks its
form, the chart hands it to the operator (agent-pod.yaml), the operator refuses a bad one naming it and puts
it into the agents' DaemonSet as --nat-port-range, and the agent refuses a bad one at start."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import helm_python as helm
import pytest
import yaml

from bpflb.control.manifests import AgentPod, agent_daemonset
from bpflb.model.types import NAT_PORT_RANGE_DEFAULT, parse_port_range
from tests.chart.helpers import documents, find, render


def agent_command(values: dict[str, Any]) -> list[str]:
    settings = find(documents(values), "ConfigMap", "bpflb-operator")["data"]["agent-pod.yaml"]
    ds = agent_daemonset(pod=AgentPod.from_mapping(yaml.safe_load(settings)))
    command: list[str] = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    return command


def test_the_default_range_reaches_the_agent() -> None:
    assert NAT_PORT_RANGE_DEFAULT == (32768, 65535)
    command = agent_command({})
    assert command[command.index("--nat-port-range") + 1] == "32768-65535"


def test_a_set_range_reaches_the_agent() -> None:
    command = agent_command({"natPortRange": "20000-29999"})
    assert command[command.index("--nat-port-range") + 1] == "20000-29999"


@pytest.mark.parametrize("bad", ["32768", "a-b", "32768:65535"])
def test_the_schema_refuses_a_malformed_range(bad: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"natPortRange": bad})
    assert "at '/natPortRange'" in str(caught.value) and "does not match pattern" in str(caught.value)


@pytest.mark.parametrize(("bad", "why"), [("70000-80000", "1 <= MIN <= MAX <= 65535"),
                                          ("40000-30000", "1 <= MIN <= MAX <= 65535"),
                                          ("x", "must be MIN-MAX")])
def test_the_operator_refuses_a_bad_range_naming_it(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"agent-pod.yaml: natPortRange: ") as caught:
        AgentPod.from_mapping({"natPortRange": bad}, where="agent-pod.yaml")
    assert why in str(caught.value)
    with pytest.raises(ValueError, match="natPortRange: must be a port range"):
        AgentPod.from_mapping({"natPortRange": 32768}, where="agent-pod.yaml")


def test_the_agent_refuses_a_bad_range_at_start() -> None:
    done = subprocess.run([sys.executable, "-m", "bpflb", "agent", "--node-name", "n", "--source-dir", "/nonexistent",
                           "--nat-port-range", "0-100"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--nat-port-range must be 1 <= MIN <= MAX <= 65535; got '0-100'" in done.stderr
    assert parse_port_range("1-65535") == (1, 65535)
