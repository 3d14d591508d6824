"""A Service a node refuses (it does not fit the datapath's maps) is said where users look: a Warning Event on
the Service in the (emulated) API, once per node and reason; the node report lists it; the ModuleConfig's
message names it with the nodes that refused it."""

from __future__ import annotations

import time
from types import SimpleNamespace

from bpflb.control.events import REASON, ServiceEvents
from bpflb.control.report import READY, REFUSED_KEY, agent_report, now_rfc3339
from bpflb.control.status import compute_status
from bpflb.kubeapi import KubeClient, resource_path
from bpflb.model.settings import CONFIG_GENERATION_KEY, agent_config_data, validate_spec
from bpflb.model.types import Mode, Problem
from tests.control.helpers import wait_for

BIG = Problem("Service default/big", "spec.ports x frontend addresses (DSR frontends)",
              "needs 75,000 more entries of map lb_dsr_frontends and 65,530 of its 65,536 are left")


def events_about(client: KubeClient, name: str) -> list[dict[str, object]]:
    items, _ = client.list(resource_path("v1", "events", "default"))
    return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]


def test_a_refused_service_gets_one_warning_event_per_reason(client: KubeClient) -> None:
    events = ServiceEvents(client, "node1", uid_of=lambda key: "uid-big" if key == "default/big" else None)
    events.start()
    try:
        events.update({"default/big": BIG})
        [event] = wait_for("the Event about default/big", lambda: events_about(client, "big"))
        assert event["type"] == "Warning" and event["reason"] == REASON
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Service", "namespace": "default",
                                           "name": "big", "uid": "uid-big"}
        assert "node node1" in str(event["message"]) and "lb_dsr_frontends" in str(event["message"])
        events.update({"default/big": BIG})          # still refused, same reason: nothing new to say
        events.update({})                            # admitted
        events.update({"default/big": BIG})          # refused again: news
        wait_for("a second Event", lambda: len(events_about(client, "big")) == 2)
    finally:
        events.close()
    assert len(events_about(client, "big")) == 2


def test_the_node_report_and_the_module_config_name_the_refused_service() -> None:
    spec = {"enabled": True, "version": 1, "settings": {"bpfLBMode": "SNAT"}}
    applied = agent_config_data(validate_spec(spec).settings)
    agent = SimpleNamespace(state=SimpleNamespace(frontends={1: 1, 2: 2}, problems=[], notes=[]), mode=Mode.SNAT,
                            uninstalled=False, last_error=None, refused={"default/big": BIG})
    source = SimpleNamespace(last_config=applied, connected=True, errors=list)
    data = agent_report(agent, source, SimpleNamespace())  # type: ignore[arg-type]
    assert data["state"] == READY and data[REFUSED_KEY] == "default/big"
    assert "1 Service refused, each alone" in data["message"] and "default/big: spec.ports" in data["message"]

    reports = {n: {**data, "node": n, "updated": now_rfc3339(), CONFIG_GENERATION_KEY: applied[CONFIG_GENERATION_KEY]}
               for n in ("node1", "node2")}
    reports["node3"] = {**reports["node1"], "node": "node3", REFUSED_KEY: ""}
    status = compute_status(spec, applied, ["node1", "node2", "node3"], reports, time.time())
    assert status["message"].startswith("Ready: 3/3 nodes run SNAT")
    assert "1 Service refused, each alone" in status["message"]
    assert "default/big on node1, node2" in status["message"]
