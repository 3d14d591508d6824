"""The Helm chart, through Helm's own library (helm-python-sdk: Helm v4's Go SDK, no helm binary): lint is
clean; every rendered manifest, in every values variant, validates against Kubernetes' schemas of several
versions; the DaemonSet the operator makes from the chart's values validates the same way; the CRD is the
repository's crds/moduleconfig.yaml; values.schema.json takes good values and refuses bad ones, saying why;
the template checks fail with what to do."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from bpflb.control.manifests import DEFAULT_IMAGE, AgentPod, agent_daemonset, contains
from bpflb.model.settings import MAGLEV_TABLE_SIZES, SETTING_NAMES, CiliumSettings, _choices, validate_spec
from tests.chart.helpers import (
    CHART,
    CRD,
    NAMESPACE,
    ROOT,
    chart,
    crd_schema,
    documents,
    find,
    render,
    validation_errors,
)

CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "image": {"repository": "registry.example:5000/net/bpflb", "digest": "sha256:" + "ab" * 32,
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "512Mi"}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}],
        "nodeSelector": {"node-role.example/edge": "true"},
        "priorityClassName": "",
        "cgroup": {"hostRoot": "/sys/fs/cgroup/unified"},
        "operator": {"podAnnotations": {"prometheus.io/scrape": "false"}, "podLabels": {"team": "net"},
                     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                         "nodeSelectorTerms": [{"matchExpressions": [
                             {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}]}}},
                     "debug": True, "healthPort": 9900},
        "serviceAccounts": {"agent": {"create": True, "name": "bpflb-agent", "annotations": {"a": "b"}},
                            "operator": {"create": True, "name": "bpflb-operator", "annotations": {"c": "d"}}},
        "webhook": {"failurePolicy": "Fail", "timeoutSeconds": 5, "port": 10443},
        "moduleConfig": {"create": True, "enabled": True, "settings": {
            "bpfLBMode": "DSR", "tunnelMode": "VXLAN", "lbAlgorithm": "Maglev", "maglevTableSize": 65521,
            "xdpAcceleration": "BestEffort", "svcSourceRangeCheck": False, "createNodeRoutes": True,
            "debugLogging": True, "extraLoadBalancerAlgorithmsEnabled": True, "socketLB": False}},
    },
    "own-certificate": {"webhook": {"tls": {"existingSecret": "bpflb-webhook-tls", "caBundle": CA}}},
    "cert-manager": {"webhook": {"tls": {"existingSecret": "bpflb-webhook-tls"},
                                 "annotations": {"cert-manager.io/inject-ca-from": "kube-system/bpflb-webhook"}}},
    "no-webhook": {"webhook": {"enabled": False}, "moduleConfig": {"create": True, "enabled": False}},
    "replicas": {"operator": {"replicas": 3, "metricsPort": 19963}, "metrics": {"port": 19962},
                 "webhook": {"tls": {"existingSecret": "bpflb-webhook-tls", "caBundle": CA}}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                                  "labels": {"release": "prometheus"}}}},
    "own-rbac": {"rbac": {"create": False},
                 "serviceAccounts": {"agent": {"create": False, "name": "lb-agent"},
                                     "operator": {"create": False, "name": "lb-operator"}}},
}


def test_lint_is_clean() -> None:
    """`helm lint --strict`: no warning, no error (the only message is Helm's 'icon is recommended')."""
    for version in ("v1.30.0", "v1.35.0"):
        report = helm.lint(CHART, {}, strict=True, namespace=NAMESPACE, kube_version=version)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [] and report["errors"] == [], report
    report = helm.lint(CHART, VARIANTS["everything"], strict=True, namespace=NAMESPACE)
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_manifest_validates(variant: str, kube_version: str) -> None:
    docs = documents(VARIANTS[variant])
    assert docs
    errors: list[str] = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue                              # no schema of Kubernetes' own: test_the_service_monitors
        if doc["apiVersion"].startswith("deckhouse.io/"):
            errors += [f"ModuleConfig: {e.message}" for e in
                       jsonschema.Draft7Validator(crd_schema()).iter_errors(doc)]
            validate_spec(doc["spec"])            # the operator's (and the webhook's) own check
        else:
            errors += validation_errors(doc, kube_version)
    assert errors == []


def test_the_crd_is_validated_too(kube_version: str) -> None:
    [crd] = chart().crds
    assert validation_errors(yaml.safe_load(crd["data"]), kube_version) == []


def test_the_chart_crd_is_the_repository_crd() -> None:
    """One source of truth: charts/bpflb/crds/moduleconfig.yaml links to crds/moduleconfig.yaml, and what Helm
    loads (and what `helm package` puts in the archive) is that file, byte for byte."""
    link = CHART / "crds" / "moduleconfig.yaml"
    assert link.is_symlink() and link.resolve() == CRD.resolve()
    [crd] = chart().crds
    assert crd["name"] == "crds/moduleconfig.yaml"
    assert crd["data"] == CRD.read_text()


def test_the_packaged_chart_carries_the_crd(tmp_path: Any) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        [crd] = packaged.crds
        assert crd["data"] == CRD.read_text()


def test_make_chart_lints_and_packages_the_chart(tmp_path: Path) -> None:
    """`make chart` (the docs' packaging step), run: its recipe is scripts/chart.py, which lints the chart and
    writes an archive carrying the CRD (here into tmp_path instead of dist/)."""
    [recipe] = re.findall(r"^chart:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe.split()[-3:] == ["scripts/chart.py", "--out", "dist"], recipe
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [archive] = tmp_path.glob("bpflb-*.tgz")
    assert f"chart: {archive}" in done.stdout
    with helm.Chart.load(archive) as packaged:
        [crd] = packaged.crds
        assert crd["data"] == CRD.read_text()


@pytest.mark.parametrize("variant", ["defaults", "everything"])
def test_the_daemonset_the_operator_makes_from_the_values_validates(variant: str, kube_version: str) -> None:
    """The operator reads the chart's agent pod settings (ConfigMap bpflb-operator, agent-pod.yaml) and its
    --image argument; the DaemonSet it builds from them is valid Kubernetes and carries them."""
    values = VARIANTS[variant]
    docs = documents(values)
    settings = find(docs, "ConfigMap", "bpflb-operator")["data"]["agent-pod.yaml"]
    pod = AgentPod.from_mapping(yaml.safe_load(settings))
    [container] = find(docs, "Deployment", "bpflb-operator")["spec"]["template"]["spec"]["containers"]
    [image] = [a.removeprefix("--image=") for a in container["command"] if a.startswith("--image=")]
    ds = agent_daemonset(image, pod)
    assert validation_errors(ds, kube_version) == []
    spec = ds["spec"]["template"]["spec"]
    merged = chart().merge_values(values)
    # Empty values are left out (the API server would drop them and the operator would see drift forever).
    assert spec.get("tolerations", []) == merged["tolerations"]
    assert spec.get("nodeSelector", {}) == merged["nodeSelector"]
    assert spec.get("priorityClassName", "") == merged["priorityClassName"]
    assert spec["containers"][0].get("resources", {}) == merged["resources"]
    assert spec["containers"][0]["imagePullPolicy"] == merged["image"]["pullPolicy"]
    assert spec.get("imagePullSecrets", []) == merged["imagePullSecrets"]
    assert spec["serviceAccountName"] == merged["serviceAccounts"]["agent"]["name"]
    assert image == container["image"]
    # The socket LB's cgroup: the host's root, mounted where --cgroup-root says.
    assert {"name": "cgroup", "hostPath": {"path": merged["cgroup"]["hostRoot"], "type": "Directory"}} in spec["volumes"]
    agent = spec["containers"][0]
    mount = next(m for m in agent["volumeMounts"] if m["name"] == "cgroup")
    assert agent["command"][agent["command"].index("--cgroup-root") + 1] == mount["mountPath"]


def test_the_daemonset_without_a_chart_validates(kube_version: str) -> None:
    assert validation_errors(agent_daemonset(), kube_version) == []


def test_the_operator_deployment() -> None:
    """Liveness probe, resources, unprivileged and read-only, one replica replaced with Recreate, the image from
    the values; readiness on the webhook port (listening only once the CA bundle is published)."""
    docs = documents({"image": {"tag": "1.2.3"}})
    deployment = find(docs, "Deployment", "bpflb-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}    # Lease, namespace
    assert "--metrics-listen=0.0.0.0:9963" in container["command"]
    assert {"name": "metrics", "containerPort": 9963, "protocol": "TCP"} in container["ports"]
    assert container["image"] == "ghcr.io/bpflb/bpflb:1.2.3"
    assert "--image=ghcr.io/bpflb/bpflb:1.2.3" in container["command"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and "privileged" not in security
    assert "--webhook-configuration=bpflb-webhook" in container["command"]
    assert "--webhook-host=bpflb-operator.kube-system.svc" in container["command"]
    assert pod["serviceAccountName"] == "bpflb-operator"
    # The operator's command line is one the operator accepts.
    from bpflb.cli import build_parser

    args = build_parser().parse_args(container["command"][1:])
    assert args.webhook_configuration == "bpflb-webhook" and args.health_listen == "0.0.0.0:9876"
    assert args.leader_elect is True and args.metrics_listen == "0.0.0.0:9963"


def test_several_operator_replicas_roll_and_share_the_webhook_certificate() -> None:
    deployment = find(documents(VARIANTS["replicas"]), "Deployment", "bpflb-operator")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--webhook-cert-dir=/etc/bpflb/webhook-tls" in container["command"]
    assert "--metrics-listen=0.0.0.0:19963" in container["command"]


OTHER_NAMESPACE = "bpflb-system"


@pytest.mark.parametrize("variant", ["defaults", "everything", "monitoring"])
def test_the_chart_installs_into_any_namespace(variant: str, kube_version: str) -> None:
    """helm install -n bpflb-system: every object of the release is there (or cluster-scoped), and points
    there; the operator, the agents it makes, their RBAC and admission policies follow; all of it valid."""
    docs = documents(VARIANTS[variant], namespace=OTHER_NAMESPACE)
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration",
                      "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ModuleConfig"}
    for doc in docs:
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["metadata"]
        elif doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-events"):
            assert doc["metadata"]["namespace"] == "default"          # Events of the cluster-scoped ModuleConfig
        else:
            assert doc["metadata"]["namespace"] == OTHER_NAMESPACE, doc["metadata"]
        if not doc["apiVersion"].startswith(("monitoring.coreos.com/", "deckhouse.io/")):
            assert validation_errors(doc, kube_version) == []
    text = "\n".join(yaml.safe_dump(d) for d in docs)
    assert "kube-system" not in text
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert {s["namespace"] for s in binding["subjects"]} == {OTHER_NAMESPACE}
    [container] = find(docs, "Deployment", "bpflb-operator")["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={OTHER_NAMESPACE}" in container["command"]
    if VARIANTS[variant].get("webhook", {}).get("enabled", True):
        [hook] = find(docs, "ValidatingWebhookConfiguration")["webhooks"]
        assert hook["clientConfig"]["service"]["namespace"] == OTHER_NAMESPACE
    # The agents the operator makes there find their ConfigMap and write their reports there.
    from bpflb.cli import build_parser

    namespace = build_parser().parse_args(container["command"][1:]).namespace
    ds = agent_daemonset(DEFAULT_IMAGE, None, namespace)
    assert ds["metadata"]["namespace"] == OTHER_NAMESPACE and validation_errors(ds, kube_version) == []
    [agent] = ds["spec"]["template"]["spec"]["containers"]
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in agent["env"]


def test_the_agents_ports_and_probes() -> None:
    """The DaemonSet the operator makes serves metrics and probes on the values' port: live while the
    agent's loop turns, ready once its first sync is done."""
    docs = documents(VARIANTS["replicas"])
    pod = AgentPod.from_mapping(yaml.safe_load(find(docs, "ConfigMap", "bpflb-operator")["data"]["agent-pod.yaml"]))
    assert pod.metricsPort == 19962
    [agent] = agent_daemonset(DEFAULT_IMAGE, pod)["spec"]["template"]["spec"]["containers"]
    assert "--metrics-listen=0.0.0.0:19962" in agent["command"]
    assert agent["ports"] == [{"name": "metrics", "containerPort": 19962, "hostPort": 19962, "protocol": "TCP"}]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    from bpflb.cli import build_parser

    assert build_parser().parse_args(agent["command"][1:]).metrics_listen == "0.0.0.0:19962"


def test_the_service_monitors(kube_version: str) -> None:
    """Off by default; when on, a headless Service and a ServiceMonitor per component whose selectors find
    the agents' and the operator's pods and whose port is the one they serve metrics on."""
    assert not [d for d in documents() if d["apiVersion"].startswith("monitoring.coreos.com/")]
    docs = documents(VARIANTS["monitoring"], namespace=OTHER_NAMESPACE)
    operator_pod = find(docs, "Deployment", "bpflb-operator")["spec"]["template"]
    agent_pod = agent_daemonset(DEFAULT_IMAGE, None, OTHER_NAMESPACE)["spec"]["template"]
    for component, pod, port in (("agent", agent_pod, 9962), ("operator", operator_pod, 9963)):
        service = find(docs, "Service", f"bpflb-{component}-metrics")
        monitor = find(docs, "ServiceMonitor", f"bpflb-{component}")
        assert validation_errors(service, kube_version) == []
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": port, "protocol": "TCP"}]
        assert port in [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [OTHER_NAMESPACE]}
        assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                                 "honorLabels": True}]
        assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_a_change_of_the_agents_values_restarts_the_operator() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = find(documents(values), "Deployment", "bpflb-operator")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/agent-pod"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"tolerations": []})
    text = render({})["bpflb/templates/operator-configmap.yaml"]
    assert checksum({}) == hashlib.sha256(text.encode()).hexdigest()


def test_the_webhook_without_an_own_certificate_leaves_the_ca_bundle_to_the_operator() -> None:
    docs = documents()
    [hook] = find(docs, "ValidatingWebhookConfiguration", "bpflb-webhook")["webhooks"]
    assert "caBundle" not in hook["clientConfig"]
    assert hook["clientConfig"]["service"] == {"name": "bpflb-operator", "namespace": "kube-system",
                                                "path": "/validate-cni-cilium", "port": 443}
    assert hook["matchConditions"] == [{"name": "cni-cilium-only",
                                        "expression": "object.metadata.name == 'cni-cilium'"}]
    assert hook["failurePolicy"] == "Ignore" and hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    service = find(docs, "Service", "bpflb-operator")
    assert service["spec"]["selector"] == find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    from bpflb.control.operator import WEBHOOK_ID

    assert hook["clientConfig"]["service"]["path"] == f"/{WEBHOOK_ID}"     # kopf serves POST /<handler id>


def test_the_webhook_with_an_own_certificate() -> None:
    docs = documents(VARIANTS["own-certificate"])
    [hook] = find(docs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == CA
    deployment = find(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--webhook-cert-dir=/etc/bpflb/webhook-tls" in container["command"]
    assert not any(a.startswith("--webhook-configuration") for a in container["command"])
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["webhook-tls"]["secret"]["secretName"] == "bpflb-webhook-tls"
    rules = find(docs, "ClusterRole", "bpflb-operator")["rules"]
    assert not any("validatingwebhookconfigurations" in r["resources"] for r in rules)


def test_the_module_config_is_optional_and_comes_after_the_crd_and_the_webhook() -> None:
    assert not [d for d in documents() if d["kind"] == "ModuleConfig"]
    docs = documents({"moduleConfig": {"create": True, "settings": {"bpfLBMode": "SNAT"}}})
    mc = find(docs, "ModuleConfig", "cni-cilium")
    assert mc["spec"] == {"enabled": True, "version": 1, "settings": {"bpfLBMode": "SNAT", "tunnelMode": "Disabled"}}
    waves = {d["kind"]: int(d["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", 0))
             for d in docs}
    crd_wave = int(yaml.safe_load(CRD.read_text())["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
    assert crd_wave < waves["ValidatingWebhookConfiguration"] < waves["ModuleConfig"]
    assert waves["Deployment"] < waves["ModuleConfig"]


def test_the_values_settings_schema_is_the_operators() -> None:
    """values.schema.json's moduleConfig.settings holds the same keys, choices and Maglev sizes as the
    operator's settings model, so what Helm accepts the webhook accepts."""
    schema = chart().schema
    assert schema is not None
    settings = schema["properties"]["moduleConfig"]["properties"]["settings"]
    assert tuple(settings["properties"]) == SETTING_NAMES
    assert settings["additionalProperties"] is False
    for name, prop in settings["properties"].items():
        choices = _choices(name)
        if choices is not None:
            assert tuple(prop["enum"]) == choices, name
        elif name == "maglevTableSize":
            assert tuple(prop["enum"]) == MAGLEV_TABLE_SIZES
        else:
            assert prop["type"] == "boolean", name
    assert CiliumSettings.model_fields["bpfLBMode"].default == "Hybrid"


GOOD_VALUES = [
    {},
    {"image": {"tag": "0.2.0-rc.1"}},
    {"resources": {"requests": {"cpu": 0.5, "memory": "1Gi"}}},
    {"tolerations": []},
    {"nodeSelector": {}},
    {"moduleConfig": {"create": True, "settings": {"bpfLBMode": "Hybrid", "maglevTableSize": 251}}},
    *VARIANTS.values(),
]


@pytest.mark.parametrize("values", GOOD_VALUES, ids=range(len(GOOD_VALUES)))
def test_good_values_pass(values: dict[str, Any]) -> None:
    chart().validate_schema(chart().merge_values(values))
    assert documents(values)


BAD_VALUES = [
    ({"moduleConfig": {"settings": {"bpfLBMode": "dsr"}}}, "at '/moduleConfig/settings/bpfLBMode'", "'SNAT'"),
    ({"moduleConfig": {"settings": {"bpfLbMode": "DSR"}}}, "at '/moduleConfig/settings'",
     "additional properties 'bpfLbMode' not allowed"),
    ({"moduleConfig": {"settings": {"maglevTableSize": 16384}}}, "at '/moduleConfig/settings/maglevTableSize'",
     "16381"),
    ({"moduleConfig": {"settings": {"svcSourceRangeCheck": "true"}}},
     "at '/moduleConfig/settings/svcSourceRangeCheck'", "want boolean"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'", "'IfNotPresent'"),
    ({"image": {"digest": "sha256:123"}}, "at '/image/digest'", "does not match pattern"),
    ({"image": {"repository": "ghcr.io/bpflb/bpflb:0.1.0"}}, "at '/image/repository'", "does not match pattern"),
    ({"resources": {"requests": {"memory": "lots"}}}, "at '/resources/requests/memory'", "'lots' does not match"),
    ({"resources": {"request": {"cpu": "1"}}}, "at '/resources'", "additional properties 'request' not allowed"),
    ({"tolerations": [{"operator": "Maybe"}]}, "at '/tolerations/0/operator'", "'Exists'"),
    ({"tolerations": {"operator": "Exists"}}, "at '/tolerations'", "want array"),
    ({"nodeSelector": {"disk": 1}}, "at '/nodeSelector/disk'", "want string"),
    ({"webhook": {"failurePolicy": "Retry"}}, "at '/webhook/failurePolicy'", "'Ignore'"),
    ({"webhook": {"timeoutSeconds": 60}}, "at '/webhook/timeoutSeconds'", "maximum"),
    ({"webhook": {"port": 443}}, "at '/webhook/port'", "minimum"),
    ({"operator": {"replicas": 0}}, "at '/operator/replicas'", "minimum"),
    ({"operator": {"replica": 2}}, "at '/operator'", "additional properties 'replica' not allowed"),
    ({"metrics": {"port": 0}}, "at '/metrics/port'", "minimum"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "at '/metrics/serviceMonitor/interval'",
     "does not match pattern"),
    ({"serviceAccounts": {"agent": {"create": True, "name": "Bpflb_Agent"}}}, "at '/serviceAccounts/agent/name'",
     "does not match pattern"),
    ({"imagePulSecrets": []}, "at ''", "additional properties 'imagePulSecrets' not allowed"),
]


@pytest.mark.parametrize(("values", "where", "what"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_values_fail_with_their_message(values: dict[str, Any], where: str, what: str) -> None:
    """Helm refuses them before rendering anything; the message names the value and the rule."""
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    assert "values don't meet the specifications of the schema" in message
    assert where in message and what in message, message


TEMPLATE_FAILURES = [
    ({"operator": {"replicas": 2}}, NAMESPACE,
     "operator.replicas > 1 with the webhook needs a certificate all replicas share: set webhook.tls.existingSecret"),
    ({"webhook": {"tls": {"existingSecret": "tls"}}}, NAMESPACE,
     "webhook.tls.existingSecret needs the CA that verifies it"),
    ({"webhook": {"tls": {"caBundle": CA}}}, NAMESPACE,
     "webhook.tls.caBundle is only used with webhook.tls.existingSecret"),
]


@pytest.mark.parametrize(("values", "namespace", "message"), TEMPLATE_FAILURES, ids=["replicas", "ca", "bundle"])
def test_the_template_checks_say_what_to_do(values: dict[str, Any], namespace: str, message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(values, namespace=namespace)
    assert message in str(caught.value)


def test_versions_agree() -> None:
    """The chart's appVersion, the Python package's version and the operator's default image tag."""
    meta = chart().metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meta["appVersion"] == project == DEFAULT_IMAGE.rsplit(":", 1)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


def test_notes_tell_what_to_do_next() -> None:
    notes = render({})["bpflb/templates/NOTES.txt"]
    assert "kind: ModuleConfig" in notes and "kubectl get mc cni-cilium" in notes
    assert "kubectl patch mc cni-cilium" in notes
    notes = render({"moduleConfig": {"create": True}})["bpflb/templates/NOTES.txt"]
    assert "The chart made the cni-cilium ModuleConfig (bpfLBMode Hybrid" in notes


def test_the_agents_pod_settings_the_operator_reads_match_its_defaults() -> None:
    """With default values, the operator builds the same DaemonSet as without a chart."""
    settings = find(documents(), "ConfigMap", "bpflb-operator")["data"]["agent-pod.yaml"]
    pod = AgentPod.from_mapping(yaml.safe_load(settings))
    assert contains(agent_daemonset(DEFAULT_IMAGE, pod), agent_daemonset())
    assert contains(agent_daemonset(), agent_daemonset(DEFAULT_IMAGE, pod))
