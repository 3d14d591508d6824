"""The one configuration schema: every field of the ModuleConfig CRD (spec's properties, and the cni-cilium
settings its description lists) has a stated effect (SETTING_EFFECTS), and each is shown here taking effect
or being refused: the webhook's and operator's validation, the agents' ConfigMap written from it, and the
agent (on the in-memory datapath) reading that ConfigMap back. Deckhouse's defaults are the schema's."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpflb.agent import Agent, AgentOptions
from bpflb.control import operator as op
from bpflb.datapath.memory import MemoryDatapath
from bpflb.model.cluster import Tunnel
from bpflb.model.settings import (
    DEFAULTS,
    SETTING_EFFECTS,
    SETTING_NAMES,
    AgentConfig,
    CiliumSettings,
    Invalid,
    agent_config_data,
    decode_agent_config,
    validate_spec,
)
from bpflb.model.types import AgentSettings, Algorithm, Mode
from bpflb.sources.base import Snapshot
from tests.unit.helpers import NODE, NODE_INTERNAL, endpoint_slice, l4, lb_service, node, service, two_pods

ROOT = Path(__file__).resolve().parents[2]


def crd_spec() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds" / "moduleconfig.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def described_settings() -> list[str]:
    """The setting keys spec.settings' description lists ("  key: values (default ...)" lines), read from the
    text itself: a key the CRD names that the model lacks is one of them too."""
    text = crd_spec()["properties"]["settings"]["description"]
    return re.findall(r"^  (\w+): ", text, re.MULTILINE)


def crd_fields() -> list[str]:
    """spec's properties, and every cni-cilium setting spec.settings' description lists."""
    return list(crd_spec()["properties"]) + described_settings()


def test_deckhouse_defaults_are_the_schemas_and_the_agents() -> None:
    assert (DEFAULTS.bpfLBMode, DEFAULTS.tunnelMode, DEFAULTS.svcSourceRangeCheck, DEFAULTS.debugLogging,
            DEFAULTS.createNodeRoutes) == ("Hybrid", "Disabled", False, False, None)
    assert decode_agent_config(None) == (AgentConfig(), [])
    assert decode_agent_config({})[0].agent_settings() == AgentSettings()      # the model's defaults agree
    assert AgentSettings().mode == Mode.HYBRID


def test_every_field_of_the_crd_has_a_stated_effect() -> None:
    described = described_settings()
    assert len(described) == len(set(described)), described
    assert set(described) == set(SETTING_NAMES), {"described, not in the model": set(described) - set(SETTING_NAMES),
                                                  "in the model, not described": set(SETTING_NAMES) - set(described)}
    fields = crd_fields()
    assert set(fields) == set(SETTING_EFFECTS), set(fields) ^ set(SETTING_EFFECTS)


# -- the agent's side: a ConfigMap written from the settings, read back, acted on ----------------------------


class Node:
    """One agent on the in-memory datapath, fed a Service with an algorithm annotation."""

    def __init__(self, tmp_path: Path, data: dict[str, str]) -> None:
        svc = service()
        svc["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev"}
        ranged = lb_service("ranged", loadBalancerSourceRanges=["203.0.113.0/24"],
                            ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30100}])
        self.snap = Snapshot(services=[svc, ranged], endpointslices=[endpoint_slice(endpoints=two_pods()),
                                                                     endpoint_slice("ranged", endpoints=two_pods())],
                             nodes=[node()], config=data)
        self.datapath = MemoryDatapath()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.agent = Agent(AgentOptions(NODE, tmp_path, device="eth0"), self, datapath=self.datapath)
        self.agent.start()
        self.agent.run_once(retry_delay=0)
        self.debug = logging.getLogger("bpflb").level == logging.DEBUG
        logging.getLogger("bpflb").setLevel(logging.NOTSET)

    def snapshot(self) -> Snapshot:
        return self.snap

    def wait_for_change(self, timeout: float) -> bool:
        return False

    def view(self) -> dict[str, Any]:
        """What the node runs, as far as settings can change it."""
        dp = self.datapath
        if dp.uninstalled:
            return {"uninstalled": True}
        assert self.agent.last_error is None, self.agent.last_error
        assert self.agent.state is not None and dp.maps is not None
        front = self.agent.state.frontends[l4(NODE_INTERNAL, 30080)]
        network = dp.network_applied[-1][0] if dp.network_applied else None
        lb = self.agent.state.frontends[l4("198.51.100.1", 80)]
        maglev = dp.maps.maglev_cfg.lookup(dp.maps.maglev_cfg.new_key())
        assert maglev is not None, "maglev_cfg: no entry at its one key"
        return {"mode": dp.maps.mode(), "algorithm": front.algorithm, "acceleration": dp.acceleration,
                "source_ranges": (lb.source_ranges, len(dp.pins.maps.get("lb_src_ranges", {}))),
                "tunnel": network.tunnel if network else None, "routes": network.create_node_routes if network else None,
                "maglev": maglev.table_size, "debug": self.debug,
                "socket_lb": dp.socket_lb, "uninstalled": dp.uninstalled}


CHANGES: dict[str, tuple[Any, Callable[[dict[str, Any]], bool]]] = {
    "bpfLBMode": ("DSR", lambda v: v["mode"] == Mode.DSR),
    "tunnelMode": ("VXLAN", lambda v: v["tunnel"] == Tunnel.VXLAN),
    "createNodeRoutes": (True, lambda v: v["routes"] is True),
    "debugLogging": (True, lambda v: v["debug"] is True),
    "extraLoadBalancerAlgorithmsEnabled": (True, lambda v: v["algorithm"] == Algorithm.MAGLEV),
    "lbAlgorithm": ("Maglev", lambda v: v["algorithm"] == Algorithm.MAGLEV),
    "maglevTableSize": (65521, lambda v: v["maglev"] == 65521),
    "xdpAcceleration": ("Native", lambda v: v["acceleration"] == "Native"),
    "svcSourceRangeCheck": (True, lambda v: v["source_ranges"] == ((IPv4Network("203.0.113.0/24"),), 1)),
    "socketLB": (False, lambda v: v["socket_lb"] is None),
}


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_each_setting_takes_effect_on_the_agent(name: str, tmp_path: Path) -> None:
    value, took_effect = CHANGES[name]
    spec = validate_spec({"version": 1, "settings": {name: value}})       # the webhook's and operator's check
    before = Node(tmp_path / "default", agent_config_data(CiliumSettings())).view()
    after = Node(tmp_path / "changed", agent_config_data(spec.settings)).view()
    assert not took_effect(before) and took_effect(after), (before, after)


def test_source_range_check_is_accepted_everywhere_and_read_back(tmp_path: Path) -> None:
    assert validate_spec({"version": 1, "settings": {"svcSourceRangeCheck": True}}).settings.svcSourceRangeCheck
    config, problems = decode_agent_config({"svcSourceRangeCheck": "true"})    # a hand-written ConfigMap
    assert problems == [] and config.agent_settings().source_range_check
    config, problems = decode_agent_config({"svcSourceRangeCheck": "yes"})
    assert not config.settings.svcSourceRangeCheck
    assert [p.field for p in problems] == ["data.svcSourceRangeCheck"] and "false is used" in problems[0].reason
    assert validate_spec({"version": 1, "settings": {"svcSourceRangeCheck": False}}).settings == DEFAULTS


# -- spec's own fields ---------------------------------------------------------------------------------------


def test_enabled_false_uninstalls_the_agents(tmp_path: Path) -> None:
    spec = validate_spec({"enabled": False})
    assert Node(tmp_path, agent_config_data(spec.settings, uninstall=not spec.enabled)).view()["uninstalled"]


def test_version_must_be_a_known_schema_version() -> None:
    with pytest.raises(Invalid, match="spec.version: unsupported settings schema version 2"):
        validate_spec({"version": 2, "settings": {}})


class NoClient:
    """An API client that must not be used."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the operator called the API ({name}) under maintenance")


def test_maintenance_leaves_the_agents_alone() -> None:
    spec = validate_spec({"version": 1, "maintenance": "NoResourceReconciliation", "settings": {"bpfLBMode": "DSR"}})
    state = op.State(client=NoClient(), options=op.OperatorOptions())   # type: ignore[arg-type]
    events, pending = op.apply_module(state, spec, {})
    assert pending is None and [e[1] for e in events] == ["Maintenance"]
    assert op.apply_module(state, spec, {}) == ([], None)                   # said once


def test_update_policy_and_source_are_said_once_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    spec = validate_spec({"version": 1, "updatePolicy": "auto", "source": "deckhouse"})
    state = op.State(client=NoClient(), options=op.OperatorOptions())   # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="bpflb.operator"):
        op.take_effect(state, spec)
        op.take_effect(state, spec)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and any("spec.updatePolicy" in s for s in said) and any("spec.source" in s for s in said)
    assert all("bpflb does not act on it" in s for s in said)


def test_settings_reach_the_configmap_and_come_back_unchanged() -> None:
    settings = CiliumSettings(bpfLBMode="SNAT", tunnelMode="VXLAN", createNodeRoutes=False, debugLogging=True,
                              svcSourceRangeCheck=True,
                              extraLoadBalancerAlgorithmsEnabled=True, lbAlgorithm="Maglev", maglevTableSize=4093,
                              xdpAcceleration="BestEffort", socketLB=False)
    data = agent_config_data(settings)
    config, problems = decode_agent_config(data)
    assert problems == [] and config.settings == settings and config.generation == data["configGeneration"]
