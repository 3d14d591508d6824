"""The operator against the emulated API: ModuleConfig -> the agents' ConfigMap and DaemonSet; mode changes
in place; enabled: false removes the agents; status follows the node reports; restarts are idempotent;
an invalid configuration never replaces the last valid one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bpflb.control.manifests import CAPABILITIES
from bpflb.control.report import now_rfc3339
from bpflb.kubeapi import KubeClient
from bpflb_lab.apiserver import EmulatedAPI
from tests.control.helpers import (
    CM_PATH,
    DS_PATH,
    MC_PATH,
    RunningOperator,
    add_nodes,
    existing,
    module_config,
    wait_for,
)


def report(client: KubeClient, node: str, generation: str, mode: str, state: str = "Ready") -> None:
    """Write a node report the way an agent does."""
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"bpflb-node-{node}", "namespace": "kube-system",
                         "labels": {"app.kubernetes.io/name": "bpflb",
                                    "app.kubernetes.io/component": "node-report"}},
            "data": {"node": node, "state": state, "bpfLBMode": mode, "tunnelMode": "Disabled",
                     "configGeneration": generation, "frontends": "3", "problems": "0", "message": "",
                     "updated": now_rfc3339()}}
    path = f"/api/v1/namespaces/kube-system/configmaps/bpflb-node-{node}"
    if client.get(path) is None:
        client.create("/api/v1/namespaces/kube-system/configmaps", body)
    else:
        client.merge_patch(path, {"data": body["data"]})


def mc_status(client: KubeClient) -> dict[str, Any]:
    return (client.get(f"{MC_PATH}/cni-cilium") or {}).get("status") or {}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def events(client: KubeClient) -> list[str]:
    return [f"{e['type']} {e['reason']}: {e['message']}" for e in client.list("/api/v1/events")[0]]


def test_module_config_creates_the_daemonset_and_the_agents_configuration(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("DSR", lbAlgorithm="Maglev"))
    start_operator(image="registry.example/bpflb:1.2")
    cm = wait_for("the agents' ConfigMap", lambda: client.get(CM_PATH))
    assert cm["data"]["bpfLBMode"] == "DSR"
    assert cm["data"]["tunnelMode"] == "Disabled"
    assert cm["data"]["lbAlgorithm"] == "Maglev"
    assert cm["data"]["uninstall"] == "false"
    assert cm["data"]["svcSourceRangeCheck"] == "false"
    assert len(cm["data"]["configGeneration"]) == 12

    ds = wait_for("the DaemonSet", lambda: client.get(DS_PATH))
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    [container] = pod["containers"]
    assert container["image"] == "registry.example/bpflb:1.2"
    assert container["command"][:3] == ["bpflb", "agent", "--kube"]
    caps = container["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": list(CAPABILITIES)}
    assert container["securityContext"]["privileged"] is False
    assert {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"} \
        in container["volumeMounts"]
    assert {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}} in pod["volumes"]
    # bpffs is mounted on the host, before the agent starts, by a privileged init container (Bidirectional)
    [init] = pod["initContainers"]
    assert init["command"] == ["bpflb", "mount-bpffs", "/sys/fs/bpf"] and init["image"] == container["image"]
    assert init["securityContext"]["privileged"] is True
    assert init["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}]
    assert "--mount-bpffs" not in container["command"]          # the agent never mounts one itself
    wait_for("the Event", lambda: any("created DaemonSet kube-system/bpflb-agent" in e for e in events(client)))
    # kopf's timers would have put a finalizer on the ModuleConfig; the status loop does not.
    assert not (client.get(f"{MC_PATH}/cni-cilium") or {})["metadata"].get("finalizers")


def test_a_mode_change_updates_the_configuration_and_leaves_the_pod_template_alone(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("SNAT"))
    start_operator()
    wait_for("the DaemonSet", lambda: client.get(DS_PATH))
    before = client.get(DS_PATH)
    first = wait_for("the ConfigMap", lambda: client.get(CM_PATH))["data"]["configGeneration"]

    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"bpfLBMode": "Hybrid"}}})
    cm = wait_for("bpfLBMode Hybrid in the ConfigMap",
                  lambda: (c := client.get(CM_PATH)) and c["data"]["bpfLBMode"] == "Hybrid" and c)
    assert cm["data"]["configGeneration"] != first
    after = client.get(DS_PATH)
    assert after is not None and before is not None
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]   # not even patched
    # The Events are posted after the handler's writes, so the ConfigMap can be seen first.
    wait_for("the ConfigUpdated Event", lambda: any("bpfLBMode SNAT -> Hybrid" in e for e in events(client)))
    # svcSourceRangeCheck is accepted and reaches the agents the same way (they enforce the ranges).
    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"svcSourceRangeCheck": True}}})
    wait_for("svcSourceRangeCheck true in the ConfigMap",
             lambda: (c := client.get(CM_PATH)) and c["data"]["svcSourceRangeCheck"] == "true")
    assert not any("Degraded" in e or "Invalid" in e for e in events(client))


def test_status_follows_the_node_reports(client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("DSR"))
    start_operator()
    generation = wait_for("the ConfigMap", lambda: client.get(CM_PATH))["data"]["configGeneration"]
    status = wait_for("a status", lambda: (s := mc_status(client)) and s.get("nodes", {}).get("total") == 3 and s)
    assert status["nodes"]["ready"] == "0/3"
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Progressing")["status"] == "True"

    report(client, "node1", generation, "DSR")
    report(client, "node2", generation, "DSR")
    status = wait_for("2/3 nodes", lambda: (s := mc_status(client)) and s["nodes"]["ready"] == "2/3" and s)
    assert "node3" in condition(status, "Progressing")["message"]

    report(client, "node3", generation, "DSR")
    status = wait_for("Ready", lambda: (s := mc_status(client)) and condition(s, "Ready").get("status") == "True"
                      and s)
    assert status["bpfLBMode"] == "DSR" and status["tunnelMode"] == "Disabled"
    assert status["nodes"] == {"total": 3, "current": 3, "ready": "3/3", "byMode": [{"mode": "DSR", "nodes": 3}]}
    assert condition(status, "Progressing")["status"] == "False"
    assert condition(status, "Degraded") | {"lastTransitionTime": ...} == {
        "type": "Degraded", "status": "False", "reason": "AsExpected", "message": "no problem found",
        "observedGeneration": 1, "lastTransitionTime": ...}
    assert status["message"] == "Ready: 3/3 nodes run DSR, tunnel Disabled"

    # A node whose datapath keeps another mode makes the module Degraded, with the node named.
    report(client, "node2", generation, "SNAT")
    status = wait_for("Degraded", lambda: (s := mc_status(client)) and
                      condition(s, "Degraded").get("status") == "True" and s)
    assert condition(status, "Degraded")["reason"] == "ModeNotSupported"
    assert "node2 runs SNAT instead of DSR" in condition(status, "Degraded")["message"]
    assert status["bpfLBMode"] == "DSR,SNAT"
    wait_for("a Degraded Event", lambda: any(e.startswith("Warning ModeNotSupported") for e in events(client)))

    # A new Node that has not reported yet: not ready any more.
    report(client, "node2", generation, "DSR")
    add_nodes(client, ("node4",))
    wait_for("3/4 nodes", lambda: mc_status(client).get("nodes", {}).get("ready") == "3/4")


def test_an_invalid_configuration_keeps_the_last_valid_one_and_reports_degraded(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("DSR"))
    operator = start_operator()
    valid = wait_for("the ConfigMap", lambda: client.get(CM_PATH))
    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"bpfLBMode": "dsr", "bogus": 1}}})
    status = wait_for("Degraded", lambda: (s := mc_status(client)) and
                      condition(s, "Degraded").get("reason") == "InvalidConfiguration" and s)
    message = condition(status, "Degraded")["message"]
    assert 'spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"' in message
    assert "spec.settings.bogus: unknown setting" in message
    assert "the last valid configuration (bpfLBMode DSR, tunnelMode Disabled) stays in force" in message
    assert status["message"].startswith("Degraded: ")
    wait_for("the Warning Event", lambda: any(e.startswith("Warning InvalidConfiguration: not applied")
                                              for e in events(client)))
    operator.wait_rounds("a re-assert round with the invalid spec", reasserts=1)   # it still does not apply it
    assert existing(client, CM_PATH)["data"] == valid["data"]

    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"bpfLBMode": "SNAT", "bogus": None}}})
    wait_for("the fixed configuration", lambda: existing(client, CM_PATH)["data"]["bpfLBMode"] == "SNAT")
    wait_for("Degraded cleared", lambda: condition(mc_status(client), "Degraded").get("status") == "False")


def test_enabled_false_tells_the_agents_to_uninstall_then_removes_them(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client, ("node1", "node2"))
    client.create(MC_PATH, module_config("SNAT"))
    start_operator()
    generation = wait_for("the ConfigMap", lambda: client.get(CM_PATH))["data"]["configGeneration"]
    wait_for("the DaemonSet", lambda: client.get(DS_PATH))
    report(client, "node1", generation, "SNAT")
    report(client, "node2", generation, "SNAT")

    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"enabled": False}})
    wait_for("uninstall=true", lambda: existing(client, CM_PATH)["data"]["uninstall"] == "true")
    wait_for("Uninstalling", lambda: condition(mc_status(client), "Progressing").get("reason") == "Uninstalling")
    assert client.get(DS_PATH) is not None, "the DaemonSet went before the agents removed their datapath"
    report(client, "node1", "", "", state="Uninstalled")
    report(client, "node2", "", "", state="Uninstalled")
    wait_for("the DaemonSet deleted", lambda: client.get(DS_PATH) is None, timeout=15)
    status = wait_for("Disabled", lambda: (s := mc_status(client)) and
                      condition(s, "Ready").get("reason") == "Disabled" and s)
    assert condition(status, "Progressing")["status"] == "False"
    # The Events are posted after the handler's writes (the status among them).
    wait_for("the Event", lambda: any("deleted DaemonSet kube-system/bpflb-agent: every agent removed its datapath"
                                      in e for e in events(client)))

    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"enabled": True}})
    wait_for("the DaemonSet again", lambda: client.get(DS_PATH))
    assert existing(client, CM_PATH)["data"]["uninstall"] == "false"


def test_a_restarted_operator_creates_no_duplicates_and_restores_drift(
        api: EmulatedAPI, client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("DSR"))
    first = start_operator()
    wait_for("the DaemonSet", lambda: client.get(DS_PATH))
    cm_version = existing(client, CM_PATH)["metadata"]["resourceVersion"]
    ds_version = existing(client, DS_PATH)["metadata"]["resourceVersion"]
    first.stop()

    second = start_operator()
    second.wait_rounds("the resume handler and a re-assert round", reasserts=1)
    assert len(api.objects("apps/v1", "daemonsets")) == 1
    assert len([c for c in api.objects("v1", "configmaps") if c["metadata"]["name"] == "bpflb-agent"]) == 1
    assert existing(client, CM_PATH)["metadata"]["resourceVersion"] == cm_version      # nothing rewritten
    assert existing(client, DS_PATH)["metadata"]["resourceVersion"] == ds_version

    # Somebody edits the DaemonSet: the operator puts it back.
    client.merge_patch(DS_PATH, {"spec": {"template": {"spec": {"hostNetwork": False}}}})
    wait_for("the DaemonSet restored", lambda: existing(client, DS_PATH)["spec"]["template"]["spec"]["hostNetwork"],
             timeout=10)


def test_other_module_configs_are_ignored(client: KubeClient,
                                          start_operator: Callable[..., RunningOperator]) -> None:
    client.create(MC_PATH, {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig",
                            "metadata": {"name": "prometheus"},
                            "spec": {"version": 2, "settings": {"bpfLBMode": "nonsense"}}})
    start_operator().wait_rounds("status rounds with the other ModuleConfig listed", rounds=3)
    assert client.get(CM_PATH) is None and client.get(DS_PATH) is None
    mc = client.get(f"{MC_PATH}/prometheus") or {}
    assert "status" not in mc and not mc["metadata"].get("annotations")


def test_the_agents_pod_settings_reach_the_daemonset_and_a_removed_node_label_goes(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    """--agent-pod-config (the chart's values) shapes the DaemonSet; an operator restarted with other
    settings (the chart's checksum restarts it) rolls them out, a nodeSelector key it no longer has included."""
    from bpflb.control.manifests import AgentPod

    add_nodes(client)
    client.create(MC_PATH, module_config("SNAT"))
    first = start_operator(agent_pod=AgentPod(nodeSelector={"kubernetes.io/os": "linux", "edge": "true"},
                                              tolerations=[], priorityClassName="", imagePullSecrets=("regcred",)))
    ds = wait_for("the DaemonSet", lambda: client.get(DS_PATH))
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "edge": "true"}
    assert "tolerations" not in spec and "priorityClassName" not in spec
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    first.stop()
    start_operator(agent_pod=AgentPod())
    wait_for("the DaemonSet rolled to the new settings", lambda: (
        (spec := existing(client, DS_PATH)["spec"]["template"]["spec"])["nodeSelector"] == {"kubernetes.io/os": "linux"}
        and spec["tolerations"] == [{"operator": "Exists"}] and "imagePullSecrets" not in spec
        and spec["priorityClassName"] == "system-node-critical"))


def test_a_report_under_another_nodes_name_is_ignored(
        client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    """data.node must match the ConfigMap's name (the chart's admission policy enforces it; the operator
    checks it too): a report claiming node2 from bpflb-node-node1 does not make node2 ready."""
    add_nodes(client, ("node1", "node2"))
    client.create(MC_PATH, module_config("DSR"))
    operator = start_operator()
    generation = wait_for("the ConfigMap", lambda: client.get(CM_PATH))["data"]["configGeneration"]
    report(client, "node1", generation, "DSR")
    body = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "bpflb-node-impostor", "namespace": "kube-system",
                         "labels": {"app.kubernetes.io/name": "bpflb", "app.kubernetes.io/component": "node-report"}},
            "data": {"node": "node2", "state": "Ready", "bpfLBMode": "DSR", "tunnelMode": "Disabled",
                     "configGeneration": generation, "updated": now_rfc3339()}}
    client.create("/api/v1/namespaces/kube-system/configmaps", body)
    wait_for("node1 counted", lambda: mc_status(client).get("nodes", {}).get("current") == 1)
    operator.wait_rounds("status rounds with the impostor's report", rounds=3)
    assert mc_status(client)["nodes"]["ready"] == "1/2"
    report(client, "node2", generation, "DSR")
    wait_for("both ready", lambda: mc_status(client).get("nodes", {}).get("ready") == "2/2")


def test_the_liveness_endpoint_answers(start_operator: Callable[..., RunningOperator]) -> None:
    """--health-listen: kopf's liveness endpoint, which the chart's livenessProbe GETs."""
    import urllib.request

    from tests.control.helpers import free_port

    port = free_port()
    start_operator(health_listen=f"127.0.0.1:{port}")

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    wait_for("GET /healthz to answer 200", answers)
