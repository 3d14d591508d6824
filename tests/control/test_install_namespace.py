"""bpflb installed in a namespace of its own (`helm install -n bpflb-system`): the real operator and a real agent
against the emulated API, each told its namespace only by $POD_NAMESPACE (the chart's downward API), keep
everything there: the agents' ConfigMap and DaemonSet, the operator's Lease, the node report (counted in the
ModuleConfig status); a bad configuration is named where it is; nothing is written to kube-system."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bpflb.control.leader import LEASE_NAME
from bpflb.control.node import kube_parts
from bpflb.kubeapi import KubeClient, anonymous
from bpflb.sources.base import NAMESPACE_ENV, own_namespace
from bpflb_lab.apiserver import EmulatedAPI
from bpflb_lab.scratch import NODE1
from tests.control.helpers import MC_PATH, RunningOperator, agent_on_scratch_node, module_config, wait_for

NS = "bpflb-system"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def node(name: str = "node1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE1}]}}


def mc_status(client: KubeClient) -> dict[str, Any]:
    return (client.get(f"{MC_PATH}/cni-cilium") or {}).get("status") or {}


@pytest.mark.privileged
def test_the_operator_and_an_agent_keep_everything_in_their_own_namespace(
        api: EmulatedAPI, client: KubeClient, start_operator: Callable[..., RunningOperator], pin_root: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bpflb.agent")
    monkeypatch.setenv(NAMESPACE_ENV, NS)
    # helm install --create-namespace: the namespace exists before anything of bpflb runs in it.
    client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    client.create("/api/v1/nodes", node())
    client.create(MC_PATH, module_config("DSR"))
    # The operator's namespace the way `bpflb operator` without --namespace takes it.
    start_operator(namespace=own_namespace())

    cm = wait_for(f"the agents' ConfigMap in {NS}", lambda: client.get(f"/api/v1/namespaces/{NS}/configmaps/bpflb-agent"))
    assert cm["data"]["bpfLBMode"] == "DSR"
    ds = wait_for(f"the DaemonSet in {NS}", lambda: client.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/bpflb-agent"))
    assert ds["metadata"]["namespace"] == NS
    lease = client.get(f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE_NAME}")
    assert lease is not None and lease["spec"]["holderIdentity"]

    # The agent's side, as `bpflb agent --kube` builds it (no --namespace either).
    agent_client = KubeClient(anonymous(api.url))
    source, reporter = kube_parts(agent_client, "node1")
    with agent_on_scratch_node(source, reporter, pin_root, "bpflb-ns"):
        report_path = f"/api/v1/namespaces/{NS}/configmaps/bpflb-node-node1"
        report = wait_for(f"the node report in {NS}", lambda: (c := client.get(report_path)) and
                          c["data"].get("state") == "Ready" and c["data"])
        assert report["bpfLBMode"] == "DSR"
        assert report["configGeneration"] == cm["data"]["configGeneration"]    # it read the operator's ConfigMap
        status = wait_for("the report counted in the ModuleConfig status",
                          lambda: (s := mc_status(client)).get("nodes", {}).get("current") == 1 and s)
        assert status["nodes"]["ready"] == "1/1" and status["bpfLBMode"] == "DSR"

        # A bad value in the agents' ConfigMap is named where that ConfigMap is.
        client.merge_patch(f"/api/v1/namespaces/{NS}/configmaps/bpflb-agent",
                           {"data": {"maglevHashSeed": "many"}})
        said = wait_for("the agent's warning", lambda: [r.getMessage() for r in caplog.records
                                                        if "data.maglevHashSeed" in r.getMessage()])
        assert f"ConfigMap {NS}/bpflb-agent: data.maglevHashSeed" in said[0], said

    written = [(r.method, r.path) for r in api.requests() if r.method in WRITES]
    assert any(f"/namespaces/{NS}/" in path for _method, path in written)
    assert not [w for w in written if "/namespaces/kube-system/" in w[1]], written
