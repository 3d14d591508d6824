"""What a GitOps tool sees after the operator has run: the chart's objects, applied to the emulated API as
Argo CD would, then the operator started the way the chart's Deployment starts it. Nothing it writes is
drift: the ModuleConfig's spec, labels and annotations stay as applied (the operator adds only its status and
kopf's bpflb.deckhouse.io/ annotations), and the webhook configuration differs only in the caBundle the
example Application ignores. That caBundle is the one the webhook serves with: an HTTPS AdmissionReview
verified against it, under the Service's DNS name, is answered."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bpflb.control.manifests import AgentPod
from bpflb.kubeapi import KubeClient
from tests.chart.helpers import ROOT, documents, find
from tests.control.helpers import DS_PATH, MC_PATH, RunningOperator, add_nodes, free_port, wait_for

VWC_PATH = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/bpflb-webhook"
SERVER_OWNED = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def application_values() -> dict[str, Any]:
    app = yaml.safe_load((ROOT / "examples" / "argocd" / "application.yaml").read_text())
    values: dict[str, Any] = app["spec"]["source"]["helm"]["valuesObject"]
    return values


def without_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for key in SERVER_OWNED:
        obj.get("metadata", {}).pop(key, None)
    return obj


def ignore_ca_bundle(vwc: dict[str, Any]) -> dict[str, Any]:
    """The example Application's ignoreDifferences: .webhooks[]?.clientConfig.caBundle."""
    vwc = copy.deepcopy(vwc)
    for hook in vwc.get("webhooks") or []:
        hook.get("clientConfig", {}).pop("caBundle", None)
    return vwc


class _ServiceConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1, verifying the certificate for the host name given (the Service's DNS name)."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def review(port: int, cabundle: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it: TLS verified with the published caBundle, for the
    Service's name (bpflb-operator.kube-system.svc)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as ca:
        ca.write(base64.b64decode(cabundle))
        ca.flush()
        context = ssl.create_default_context(cafile=ca.name)
    obj = {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig", "metadata": {"name": "cni-cilium"},
           "spec": spec}
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": {"group": "deckhouse.io", "version": "v1alpha1", "kind": "ModuleConfig"},
        "resource": {"group": "deckhouse.io", "version": "v1alpha1", "resource": "moduleconfigs"},
        "name": "cni-cilium", "operation": "UPDATE", "userInfo": {"username": "admin"},
        "object": obj, "oldObject": obj, "dryRun": False}}
    conn = _ServiceConnection("bpflb-operator.kube-system.svc", port, context=context, timeout=10)
    try:
        conn.request("POST", "/validate-cni-cilium", json.dumps(body), {"Content-Type": "application/json"})
        answer: dict[str, Any] = json.loads(conn.getresponse().read())["response"]
    finally:
        conn.close()
    return answer


def test_nothing_the_operator_writes_is_drift(client: KubeClient, start_operator: Callable[..., RunningOperator],
                                              tmp_path: Path) -> None:
    docs = documents(application_values())
    rendered_vwc = find(docs, "ValidatingWebhookConfiguration", "bpflb-webhook")
    rendered_mc = find(docs, "ModuleConfig", "cni-cilium")
    agent_pod = AgentPod.from_mapping(yaml.safe_load(find(docs, "ConfigMap", "bpflb-operator")["data"]["agent-pod.yaml"]))
    add_nodes(client)
    client.create("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", copy.deepcopy(rendered_vwc))
    client.create(MC_PATH, copy.deepcopy(rendered_mc))

    port = free_port()
    start_operator(webhook_listen=f"127.0.0.1:{port}", webhook_host="bpflb-operator.kube-system.svc",
                   webhook_configuration="bpflb-webhook", agent_pod=agent_pod)
    live_vwc = wait_for("the published caBundle", lambda: (
        (v := client.get(VWC_PATH)) and v["webhooks"][0]["clientConfig"].get("caBundle") and v))
    wait_for("the status", lambda: (client.get(f"{MC_PATH}/cni-cilium") or {}).get("status"))
    wait_for("the agents' DaemonSet", lambda: client.get(DS_PATH))

    # The webhook configuration: the chart's, plus the caBundle and nothing else.
    assert ignore_ca_bundle(without_server_fields(live_vwc)) == rendered_vwc
    # The ModuleConfig: spec and labels as applied; only kopf's annotations added.
    live_mc = without_server_fields(client.get(f"{MC_PATH}/cni-cilium") or {})
    assert live_mc["spec"] == rendered_mc["spec"]
    assert live_mc["metadata"]["labels"] == rendered_mc["metadata"]["labels"]
    added = set(live_mc["metadata"].get("annotations", {})) - set(rendered_mc["metadata"]["annotations"])
    assert all(a.startswith("bpflb.deckhouse.io/") for a in added), added
    assert {k: v for k, v in live_mc["metadata"]["annotations"].items() if k not in added} == \
        rendered_mc["metadata"]["annotations"]
    # What the operator creates is its own: no Helm/Argo CD instance label, so no tool adopts or prunes it.
    ds = client.get(DS_PATH) or {}
    assert "app.kubernetes.io/instance" not in ds["metadata"]["labels"]
    assert ds["spec"]["template"]["spec"]["tolerations"] == agent_pod.tolerations

    # The published bundle is the one the webhook serves with.
    bundle = live_vwc["webhooks"][0]["clientConfig"]["caBundle"]
    answer = review(port, bundle, {"enabled": True, "version": 1, "settings": {"bpfLBMode": "dsr"}})
    assert answer["allowed"] is False
    assert 'spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"' in answer["status"]["message"]
    assert review(port, bundle, rendered_mc["spec"])["allowed"] is True


def test_a_removed_ca_bundle_is_put_back(client: KubeClient, start_operator: Callable[..., RunningOperator]) -> None:
    """Somebody (a `kubectl replace`, a sync without RespectIgnoreDifferences) removes the caBundle: the
    operator puts it back, and a restarted operator publishes its new one."""
    rendered_vwc = find(documents(), "ValidatingWebhookConfiguration", "bpflb-webhook")
    client.create("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", copy.deepcopy(rendered_vwc))

    def bundle() -> str | None:
        ca: str | None = ((client.get(VWC_PATH) or {}).get("webhooks") or [{}])[0].get("clientConfig", {}).get("caBundle")
        return ca

    first = start_operator(webhook_listen=f"127.0.0.1:{free_port()}", webhook_host="bpflb-operator.kube-system.svc",
                           webhook_configuration="bpflb-webhook")
    published = wait_for("the caBundle", bundle)
    from bpflb.control import webhook

    hooks = copy.deepcopy((client.get(VWC_PATH) or {})["webhooks"])
    del hooks[0]["clientConfig"]["caBundle"]
    client.merge_patch(VWC_PATH, {"webhooks": hooks})
    assert bundle() is None
    assert webhook.publish_ca_bundle(client, "bpflb-webhook", base64.b64decode(published)) == 1
    assert bundle() == published
    assert webhook.publish_ca_bundle(client, "bpflb-webhook", base64.b64decode(published)) == 0
    first.stop()
    start_operator(webhook_listen=f"127.0.0.1:{free_port()}", webhook_host="bpflb-operator.kube-system.svc",
                   webhook_configuration="bpflb-webhook")
    wait_for("a new caBundle after the restart", lambda: bundle() not in (None, published))
