"""The ModuleConfig CRD: the seeds' example ModuleConfigs validate against its openAPIV3Schema (with
jsonschema, as the API server's structural validation would), bad ones do not, and it stays compatible
with Deckhouse's definition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRD = Path(__file__).resolve().parents[2] / "crds" / "moduleconfig.yaml"

# The example ModuleConfig of seeds 000 and 001 (Deckhouse's bpfLB documentation), verbatim.
SEED_EXAMPLE = """\
apiVersion: deckhouse.io/v1alpha1
kind: ModuleConfig
metadata:
  name: cni-cilium
spec:
  settings:
    tunnelMode: VXLAN
    bpfLBMode: SNAT # SNAT mode is selected.
  version: 1
  enabled: true
"""


def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD.read_text())
    return doc


def schema() -> dict[str, Any]:
    [version] = crd()["spec"]["versions"]
    out: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return out


def errors(obj: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(schema()).iter_errors(obj)]


@pytest.mark.parametrize("mode", ["SNAT", "DSR", "Hybrid"])
def test_the_seed_examples_validate(mode: str) -> None:
    example = yaml.safe_load(SEED_EXAMPLE)
    assert errors(example) == []
    example["spec"]["settings"]["bpfLBMode"] = mode
    example["spec"]["settings"]["tunnelMode"] = "Disabled"
    assert errors(example) == []


def test_a_status_as_the_operator_writes_it_validates() -> None:
    from bpflb.control.status import compute_status
    from bpflb.model.settings import agent_config_data, validate_spec

    spec = yaml.safe_load(SEED_EXAMPLE)["spec"]
    applied = agent_config_data(validate_spec(spec).settings)
    status = compute_status(spec, applied, ["node1"], {}, 0.0, generation=1)
    assert errors({**yaml.safe_load(SEED_EXAMPLE), "status": status}) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"spec": None}, "None is not of type 'object'"),
    ({"spec": {"enabled": "yes", "version": 1}}, "'yes' is not of type 'boolean'"),
    ({"spec": {"version": 0, "settings": {}}}, "0 is less than the minimum of 1"),
    ({"spec": {"settings": {"bpfLBMode": "SNAT"}}}, "is not valid under any of the given schemas"),
    ({"spec": {"version": 1, "settings": "SNAT"}}, "'SNAT' is not of type 'object'"),
    ({"spec": {"version": 1, "maintenance": "Always"}}, "'Always' is not one of ['NoResourceReconciliation']"),
])
def test_bad_module_configs_fail(change: dict[str, Any], expected: str) -> None:
    example = {**yaml.safe_load(SEED_EXAMPLE), **change}
    assert any(expected in e for e in errors(example)), errors(example)


def test_missing_spec_fails() -> None:
    example = yaml.safe_load(SEED_EXAMPLE)
    del example["spec"]
    assert errors(example) == ["'spec' is a required property"]


def test_compatible_with_deckhouse() -> None:
    """Same identity and spec fields as deckhouse-controller/crds/module-config.yaml; status subresource;
    the printer columns show mode, tunnel, ready nodes and the message."""
    doc = crd()
    assert doc["metadata"]["name"] == "moduleconfigs.deckhouse.io"
    spec = doc["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == \
        ("deckhouse.io", "Cluster", "ModuleConfig", "moduleconfigs")
    assert spec["names"]["shortNames"] == ["mc"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    props = version["schema"]["openAPIV3Schema"]["properties"]
    assert set(props["spec"]["properties"]) == {"enabled", "version", "settings", "maintenance", "updatePolicy",
                                                "source"}
    assert props["spec"]["properties"]["settings"]["x-kubernetes-preserve-unknown-fields"] is True
    assert {"version", "message"} <= set(props["status"]["properties"])
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Enabled": ".spec.enabled", "Version": ".status.version", "Mode": ".status.bpfLBMode",
                       "Tunnel": ".status.tunnelMode", "Ready Nodes": ".status.nodes.ready",
                       "Age": ".metadata.creationTimestamp", "Message": ".status.message"}


# ---------------------------------------------------------------------------------------------------------
# kubectl: what `kubectl get mc` and `kubectl explain mc` show.


def _json_path(obj: Any, path: str) -> Any:
    """The simple JSONPath of a printer column (.a.b.c), as kubectl evaluates it; None when absent."""
    for key in path.lstrip(".").split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def test_kubectl_get_shows_mode_tunnel_ready_nodes_and_message() -> None:
    """The printer columns read the status the operator really writes (compute_status)."""
    import time

    from bpflb.control.report import now_rfc3339
    from bpflb.control.status import compute_status
    from bpflb.model.settings import agent_config_data, validate_spec

    mc = yaml.safe_load(SEED_EXAMPLE)
    mc["spec"]["settings"] = {"bpfLBMode": "DSR", "tunnelMode": "VXLAN"}
    mc["metadata"]["creationTimestamp"] = "2026-11-21T10:00:00Z"
    applied = agent_config_data(validate_spec(mc["spec"]).settings)
    reports = {n: {"node": n, "state": "Ready", "bpfLBMode": "DSR", "tunnelMode": "VXLAN",
                   "configGeneration": applied["configGeneration"], "updated": now_rfc3339()}
               for n in ("node1", "node2", "node3")}
    mc["status"] = compute_status(mc["spec"], applied, ["node1", "node2", "node3"], reports, time.time())
    [version] = crd()["spec"]["versions"]
    row = {c["name"]: _json_path(mc, c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert row == {"Enabled": True, "Version": "1", "Mode": "DSR", "Tunnel": "VXLAN", "Ready Nodes": "3/3",
                   "Age": "2026-11-21T10:00:00Z", "Message": "Ready: 3/3 nodes run DSR, tunnel VXLAN"}
    types = {c["name"]: c["type"] for c in version["additionalPrinterColumns"]}
    assert types["Enabled"] == "boolean" and types["Age"] == "date"


def _undescribed(node: dict[str, Any], where: str) -> list[str]:
    missing = [] if node.get("description", "").strip() else [where]
    for name, child in (node.get("properties") or {}).items():
        missing += _undescribed(child, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        missing += _undescribed(node["items"], f"{where}[]")
    return missing


def test_kubectl_explain_has_a_description_for_every_field() -> None:
    assert _undescribed(schema(), "mc") == []


def test_kubectl_explain_settings_names_every_cni_cilium_setting_and_its_choices() -> None:
    from bpflb.model.settings import MAGLEV_TABLE_SIZES, SETTING_NAMES, _choices

    text = schema()["properties"]["spec"]["properties"]["settings"]["description"]
    for name in SETTING_NAMES:
        assert name in text, name
        for choice in _choices(name) or ():
            assert choice in text, (name, choice)
    assert " | ".join(str(s) for s in MAGLEV_TABLE_SIZES) in text
