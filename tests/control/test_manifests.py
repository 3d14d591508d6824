"""The operator's objects without an API: the agents' pod settings from the chart (AgentPod: every bad key
named), the drift check and patch of the DaemonSet, and the status while a new spec is not applied yet."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from bpflb.control.manifests import AgentPod, agent_daemonset, daemonset_drifted, daemonset_patch
from bpflb.control.status import compute_status
from bpflb.model.settings import agent_config_data, validate_spec


def test_agent_pod_from_the_charts_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent-pod.yaml"
    path.write_text("imagePullPolicy: Always\nimagePullSecrets: [{name: regcred}]\nserviceAccountName: lb\n"
                    "priorityClassName: ''\nresources: {requests: {cpu: 10m}}\ntolerations: []\n"
                    "nodeSelector: {edge: 'true'}\n")
    pod = AgentPod.load(path)
    assert pod == AgentPod(imagePullPolicy="Always", imagePullSecrets=("regcred",), serviceAccountName="lb",
                           priorityClassName="", resources={"requests": {"cpu": "10m"}}, tolerations=[],
                           nodeSelector={"edge": "true"})
    assert AgentPod.from_mapping(None) == AgentPod()


@pytest.mark.parametrize(("data", "message"), [
    ([], "agent-pod.yaml: must be a mapping; got list"),
    ({"tolerationz": []}, "unknown keys tolerationz; known keys are imagePullPolicy, imagePullSecrets"),
    ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy: must be one of Always, IfNotPresent, Never; got 'Sometimes'"),
    ({"tolerations": {"operator": "Exists"}}, "tolerations: must be a list of tolerations; got {'operator': 'Exists'}"),
    ({"tolerations": ["Exists"]}, "tolerations: every toleration must be a mapping"),
    ({"nodeSelector": ["linux"]}, "nodeSelector: must be a mapping of label to value"),
    ({"imagePullSecrets": [{"secret": "x"}]}, "imagePullSecrets: must be Secret names"),
    ({"serviceAccountName": True}, "serviceAccountName: must be a string; got True"),
    ({"cgroupHostRoot": "sys/fs/cgroup"}, "cgroupHostRoot: must be an absolute path; got 'sys/fs/cgroup'"),
])
def test_agent_pod_refuses_bad_settings_naming_them(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AgentPod.from_mapping(data, where="agent-pod.yaml")


def test_agent_pod_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the agent pod settings"):
        AgentPod.load(tmp_path / "missing.yaml")


def test_a_removed_node_selector_key_is_drift_and_the_patch_removes_it() -> None:
    live = agent_daemonset(pod=AgentPod(nodeSelector={"kubernetes.io/os": "linux", "edge": "true"}))
    wanted = agent_daemonset()
    assert daemonset_drifted(live, wanted)
    assert not daemonset_drifted(wanted, wanted)
    patch = daemonset_patch(live, wanted)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"edge": None, "kubernetes.io/os": "linux"}


def test_empty_values_are_left_out_and_a_field_the_values_empty_is_removed() -> None:
    """The API server drops empty fields, so the wanted DaemonSet has none (else: drift forever); a field the
    values emptied is drift, and the patch sets it to null."""
    empty = AgentPod(tolerations=[], nodeSelector={}, priorityClassName="", resources={})
    wanted = agent_daemonset(pod=empty)
    pod = wanted["spec"]["template"]["spec"]
    assert not {"tolerations", "nodeSelector", "priorityClassName", "imagePullSecrets"} & set(pod)
    assert "resources" not in pod["containers"][0]
    live = agent_daemonset(pod=AgentPod(imagePullSecrets=("regcred",)))
    assert daemonset_drifted(live, wanted)
    patched = daemonset_patch(live, wanted)["spec"]["template"]["spec"]
    assert {k: patched[k] for k in ("tolerations", "nodeSelector", "priorityClassName", "imagePullSecrets")} == \
        dict.fromkeys(("tolerations", "nodeSelector", "priorityClassName", "imagePullSecrets"))
    assert "resources" not in patched["containers"][0]      # the containers list is replaced whole
    # Only the resources differ: still drift.
    assert daemonset_drifted(agent_daemonset(), agent_daemonset(pod=AgentPod(resources={})))


def test_status_while_the_spec_is_not_applied_yet() -> None:
    """Between a spec change and its reconciliation the status never says Ready on the old configuration."""
    old = {"enabled": True, "version": 1, "settings": {"bpfLBMode": "SNAT"}}
    new = {"enabled": True, "version": 1, "settings": {"bpfLBMode": "DSR"}}
    applied = agent_config_data(validate_spec(old).settings)
    reports = {"node1": {"node": "node1", "state": "Ready", "bpfLBMode": "SNAT", "tunnelMode": "Disabled",
                         "configGeneration": applied["configGeneration"],
                         "updated": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}}
    assert compute_status(old, applied, ["node1"], reports, time.time())["conditions"][0]["status"] == "True"
    status = compute_status(new, applied, ["node1"], reports, time.time())
    ready, progressing, degraded = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "Reconciling")
    assert (progressing["status"], progressing["reason"]) == ("True", "Reconciling")
    assert degraded["status"] == "False"
    assert status["message"].startswith("Progressing: configuration ")
