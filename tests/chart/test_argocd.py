"""GitOps with Argo CD: the ModuleConfig health check (examples/argocd/moduleconfig-health.lua) run by a real
Lua 5.1 interpreter (lupa; Argo CD's gopher-lua is Lua 5.1) against ModuleConfigs whose status is what the
operator writes (control/status.py) in each state; the example Application's sync waves and
ignoreDifferences; the argocd-cm snippet carries the same script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from bpflb.control.report import now_rfc3339
from bpflb.control.status import compute_status
from bpflb.model.settings import agent_config_data, validate_spec
from tests.chart.helpers import ROOT, documents, find

EXAMPLES = ROOT / "examples" / "argocd"
LUA = EXAMPLES / "moduleconfig-health.lua"
NODES = ["node1", "node2", "node3"]


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health script the way Argo CD does: `obj` is the live object, the script returns a table with
    status and message."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals()["obj"] = lua.table_from(obj, recursive=True)
    result: Any = lua.execute(LUA.read_text())          # the script's table (the stubs type a Lua value as object)
    return str(result["status"]), str(result["message"] or "")


def spec(mode: str = "DSR", enabled: bool = True, **settings: Any) -> dict[str, Any]:
    return {"enabled": enabled, "version": 1, "settings": {"bpfLBMode": mode, **settings}}


def report(mode: str, generation: str, state: str = "Ready", message: str = "") -> dict[str, str]:
    return {"node": "", "state": state, "bpfLBMode": mode, "tunnelMode": "Disabled", "configGeneration": generation,
            "message": message, "updated": now_rfc3339()}


def module_config(spec_: dict[str, Any], status: dict[str, Any] | None, generation: int = 2,
                  name: str = "cni-cilium") -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig",
                           "metadata": {"name": name, "generation": generation}, "spec": spec_}
    if status is not None:
        obj["status"] = status
    return obj


def operator_status(spec_: dict[str, Any], applied_spec: dict[str, Any] | None,
                    reports: dict[str, dict[str, str]], generation: int = 2) -> dict[str, Any]:
    """The status the operator writes for spec_, with applied_spec's configuration in force."""
    import time

    applied = None
    if applied_spec is not None:
        valid = validate_spec(applied_spec)
        applied = agent_config_data(valid.settings, uninstall=not valid.enabled)
    return compute_status(spec_, applied, NODES, reports, time.time(), generation=generation)


def generation_of(spec_: dict[str, Any]) -> str:
    valid = validate_spec(spec_)
    return agent_config_data(valid.settings, uninstall=not valid.enabled)["configGeneration"]


def all_nodes(mode: str, spec_: dict[str, Any], state: str = "Ready", **kw: str) -> dict[str, dict[str, str]]:
    return {n: {**report(mode, generation_of(spec_), state, **kw), "node": n} for n in NODES}


def state_ready() -> dict[str, Any]:
    s = spec("DSR")
    return module_config(s, operator_status(s, s, all_nodes("DSR", s)))


def state_rolling_out() -> dict[str, Any]:
    s = spec("DSR")
    reports = all_nodes("DSR", s)
    del reports["node3"]
    return module_config(s, operator_status(s, s, reports))


def state_reconciling() -> dict[str, Any]:
    """The spec changed (SNAT -> DSR) and the operator has not applied it yet."""
    old, new = spec("SNAT"), spec("DSR")
    return module_config(new, operator_status(new, old, all_nodes("SNAT", old)))


def state_not_seen_yet() -> dict[str, Any]:
    """A Ready status of generation 2 on a ModuleConfig now at generation 3."""
    obj = state_ready()
    obj["metadata"]["generation"] = 3
    return obj


def state_invalid() -> dict[str, Any]:
    good, bad = spec("DSR"), spec("dsr")
    return module_config(bad, operator_status(bad, good, all_nodes("DSR", good)))


def state_agent_error() -> dict[str, Any]:
    s = spec("DSR")
    reports = all_nodes("DSR", s)
    reports["node2"] = {**report("DSR", generation_of(s), "Error", "last sync failed: E2BIG"), "node": "node2"}
    return module_config(s, operator_status(s, s, reports))


def state_wrong_mode() -> dict[str, Any]:
    s = spec("DSR")
    reports = all_nodes("DSR", s)
    reports["node1"]["bpfLBMode"] = "SNAT"
    return module_config(s, operator_status(s, s, reports))


def state_uninstalling() -> dict[str, Any]:
    s = spec("DSR", enabled=False)
    return module_config(s, operator_status(s, s, all_nodes("DSR", s)))


def state_disabled() -> dict[str, Any]:
    s = spec("DSR", enabled=False)
    return module_config(s, operator_status(s, s, all_nodes("", s, state="Uninstalled")))


def state_first_seen() -> dict[str, Any]:
    return module_config(spec("DSR"), None)


def state_not_configured() -> dict[str, Any]:
    s = spec("DSR")
    return module_config(s, operator_status(s, None, {}))


def state_other_module() -> dict[str, Any]:
    return module_config({"enabled": True, "version": 2, "settings": {"retention": "7d"}},
                         {"version": "2", "message": ""}, name="prometheus")


STATES = [
    (state_ready, "Healthy", "Ready: 3/3 nodes run DSR, tunnel Disabled"),
    (state_rolling_out, "Progressing", "RollingOut: waiting for node3 to apply configuration"),
    (state_reconciling, "Progressing", "Reconciling: configuration"),
    (state_not_seen_yet, "Progressing", "Waiting for the operator to see generation 3 (status is of 2)"),
    (state_invalid, "Degraded", ('InvalidConfiguration: spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; '
                                 'got "dsr"')),
    (state_agent_error, "Degraded", "AgentError: node2: last sync failed: E2BIG"),
    (state_wrong_mode, "Degraded", "ModeNotSupported: node1 runs SNAT instead of DSR"),
    (state_uninstalling, "Progressing", "Uninstalling: waiting for node1, node2, node3 to remove their datapath"),
    (state_disabled, "Healthy", "Disabled: the datapath is removed from 3 nodes"),
    (state_first_seen, "Progressing", "Waiting for bpflb's operator to report on cni-cilium"),
    (state_not_configured, "Progressing", "NotConfigured"),
    (state_other_module, "Healthy", ""),
]


@pytest.mark.parametrize(("make", "status", "message"), STATES, ids=[s[0].__name__[6:] for s in STATES])
def test_the_health_check_in_each_state(make: Any, status: str, message: str) -> None:
    got_status, got_message = health(make())
    assert got_status == status and got_message.startswith(message), (got_status, got_message)


def test_the_argocd_cm_snippet_carries_the_script() -> None:
    cm = yaml.safe_load((EXAMPLES / "argocd-cm-health.yaml").read_text())
    assert cm["data"]["resource.customizations.health.deckhouse.io_ModuleConfig"] == LUA.read_text()


def test_the_application_example() -> None:
    """Installs the chart into kube-system from Git, with the ModuleConfig; ignores exactly the webhook's
    caBundle (and respects that on sync); the values it gives pass the chart's schema."""
    app = yaml.safe_load((EXAMPLES / "application.yaml").read_text())
    assert app["kind"] == "Application" and app["apiVersion"] == "argoproj.io/v1alpha1"
    source = app["spec"]["source"]
    assert source["path"] == "charts/bpflb" and (ROOT / source["path"] / "Chart.yaml").exists()
    assert app["spec"]["destination"]["namespace"] == "kube-system"
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]
    [ignored] = app["spec"]["ignoreDifferences"]
    assert ignored == {"group": "admissionregistration.k8s.io", "kind": "ValidatingWebhookConfiguration",
                       "name": "bpflb-webhook", "jqPathExpressions": [".webhooks[]?.clientConfig.caBundle"]}
    docs = documents(source["helm"]["valuesObject"])
    mc = find(docs, "ModuleConfig", "cni-cilium")
    validate_spec(mc["spec"])
    find(docs, "ValidatingWebhookConfiguration", ignored["name"])


def test_examples_have_purpose_comments() -> None:
    for path in sorted(Path(EXAMPLES).iterdir()):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith(("#", "--")), path
