"""The lab with Kubernetes (`lab up --kube`): the emulated API and the operator on the control-plane host,
real agents on the nodes list+watching it. The mode is changed the operator's way, by patching the
ModuleConfig through the API, and so is an invalid value (the emulator calls no admission webhook, so it
reaches the operator, which must keep the last valid configuration)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab, kube
from tests.lab.helpers import unique_lab_name

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1 = "198.18.0.11"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    shared = Lab(unique_lab_name())
    try:
        shared.up(kube=True)
        yield shared
    finally:
        shared.down()


def mc(lab: Lab) -> dict[str, Any]:
    obj: dict[str, Any] = kube.call(lab, "get", kube.MC_PATH)
    return obj


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"not within {timeout:.0f}s: {what}; last: {last!r}")


def datapath(lab: Lab) -> dict[str, Any]:
    return {node: {k: v for k, v in collect(lab.pin_root / node).items() if k in ("mode", "frontends")}
            for node in ("node1", "node2", "node3")}


def test_the_lab_runs_on_the_api(lab: Lab) -> None:
    st = lab.status()
    assert st["kube"]["host"] == "control-plane"
    assert st["kube"]["kubeconfig"].endswith("/kubeconfig")
    assert any(h["name"] == "control-plane" and h["ip"] == "198.18.0.2" for h in st["hosts"])
    assert "--kube" in json.dumps(lab.state().agent_cmd)
    services = {s["metadata"]["name"] for s in kube.call(lab, "list", "/api/v1/services")}
    assert {"echo", "echo-local", "echo-lb"} <= services
    report = lab.check()
    assert report.ok, report.render()
    obj = wait("the status Ready on SNAT", lambda: (o := mc(lab)) and
               condition(o, "Ready").get("status") == "True" and o, 10)
    assert obj["status"]["bpfLBMode"] == "SNAT" and obj["status"]["nodes"]["ready"] == "3/3"


def test_patching_the_module_config_to_dsr_preserves_the_client_address(lab: Lab) -> None:
    start = time.monotonic()
    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "DSR"}}})

    def client_seen_by_remote_pods() -> bool:
        results = lab.connections("client", NODE1, 30080, 6, request="/clientip", timeout=0.5)
        return any(r.ok for r in results) and \
            all(r.ok and r.replies[0].rsplit(":", 1)[0] == CLIENT for r in results)

    wait("/clientip via node1:30080 shows the client's address", client_seen_by_remote_pods, 10)
    obj = wait("the ModuleConfig status: all nodes on DSR", lambda: (o := mc(lab)) and
               o["status"].get("nodes", {}).get("byMode") == [{"mode": "DSR", "nodes": 3}] and
               condition(o, "Ready").get("status") == "True" and o, max(1.0, 10 - (time.monotonic() - start)))
    assert obj["status"]["bpfLBMode"] == "DSR"
    assert obj["status"]["message"] == "Ready: 3/3 nodes run DSR, tunnel Disabled"
    assert time.monotonic() - start < 10


def test_an_invalid_value_keeps_the_last_valid_configuration_running(lab: Lab) -> None:
    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "DSR"}}})
    wait("DSR everywhere", lambda: all(d["mode"] == "DSR" for d in datapath(lab).values()), 10)
    config = kube.call(lab, "get", "/api/v1/namespaces/kube-system/configmaps/bpflb-agent")["data"]
    before = datapath(lab)

    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "dsr"}}})
    obj = wait("Degraded with the reason", lambda: (o := mc(lab)) and
               condition(o, "Degraded").get("reason") == "InvalidConfiguration" and o, 10)
    message = condition(obj, "Degraded")["message"]
    assert 'spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"' in message
    assert "the last valid configuration (bpfLBMode DSR, tunnelMode Disabled) stays in force" in message
    wait("the operator's reconcile refused it (its Warning Event)", lambda: any(
        e.get("reason") == "InvalidConfiguration" for e in kube.call(lab, "list", "/api/v1/events")), 10)
    assert kube.call(lab, "get", "/api/v1/namespaces/kube-system/configmaps/bpflb-agent")["data"] == config
    assert datapath(lab) == before
    assert obj["status"]["bpfLBMode"] == "DSR"
    body, err = lab.http_get("client", f"http://{NODE1}:30080/clientip")
    assert err is None and body is not None and body.startswith(CLIENT)
    events = [e["message"] for e in kube.call(lab, "list", "/api/v1/events")]
    assert any(m.startswith("not applied: spec.settings.bpfLBMode") for m in events)

    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "SNAT"}}})
    wait("back on SNAT and not Degraded", lambda: (o := mc(lab)) and
         condition(o, "Degraded").get("status") == "False" and o["status"]["bpfLBMode"] == "SNAT", 10)


def test_services_changed_through_the_api_reach_the_datapath(lab: Lab) -> None:
    lab.apply("kind: Service\nmetadata: {name: api-svc}\nspec: {type: NodePort, selector: {app: echo}, "
              "ports: [{port: 80, targetPort: 8080, nodePort: 30500}]}\n")
    wait("the new frontend on every node", lambda: all(
        any(f["frontend"] == f"198.18.0.1{k}:30500/TCP" for f in datapath(lab)[f"node{k}"]["frontends"])
        for k in (1, 2, 3)), 10)
    lab.delete("service", "api-svc")
    wait("the frontend gone", lambda: not any(f["frontend"].endswith(":30500/TCP")
                                              for d in datapath(lab).values() for f in d["frontends"]), 10)
