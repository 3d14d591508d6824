"""The objects the operator keeps in shape: the agents' ConfigMap and DaemonSet (bpflb-agent in bpflb's
namespace: kube-system, or the Helm release's),
the agents' pod settings the Helm chart hands the operator (AgentPod, read from --agent-pod-config), and
the subset comparison that decides whether a live object still matches what the operator wants."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bpflb.kubeapi import KubeObject
from bpflb.model.types import NAT_PORT_RANGE_DEFAULT, parse_port_range
from bpflb.sources.base import AGENT_CONFIG_NAME, AGENT_CONFIG_NAMESPACE

NAMESPACE = AGENT_CONFIG_NAMESPACE
DAEMONSET_NAME = "bpflb-agent"
DEFAULT_IMAGE = "ghcr.io/bpflb/bpflb:0.1.0"
PIN_ROOT = "/sys/fs/bpf/bpflb"
CGROUP_ROOT = "/run/bpflb/cgroupv2"         # where the agent's container sees the host's cgroup v2 root
SELECTOR = {"app.kubernetes.io/name": "bpflb", "app.kubernetes.io/component": "agent"}
MANAGED = {"app.kubernetes.io/managed-by": "bpflb-operator"}
# What the agent needs and nothing more: load BPF objects and maps (BPF), attach them to a device with tc
# and use the networking helpers (NET_ADMIN), and the verifier's pointer rules for tc programs (PERFMON); the
# ARP requests that verify the peer nodes' neighbour entries leave through a packet socket (NET_RAW).
CAPABILITIES = ("BPF", "NET_ADMIN", "PERFMON", "NET_RAW")
METRICS_PORT = 9962           # the agents' metrics and probes (Cilium's agent metrics port), on the node


@dataclass(frozen=True)
class AgentPod:
    """How the agents' pods are scheduled and sized, and the agent's command-line settings: the Helm chart's
    agent values (image pull policy and secrets, service account, resources, tolerations, nodeSelector,
    priorityClassName, natPortRange, nodeNeighRefresh), which the chart
    writes into the operator's ConfigMap and the operator reads with --agent-pod-config. The defaults are
    what the operator uses without a chart."""

    imagePullPolicy: str = "IfNotPresent"
    imagePullSecrets: tuple[str, ...] = ()
    serviceAccountName: str = "bpflb-agent"
    priorityClassName: str = "system-node-critical"
    resources: dict[str, Any] = field(default_factory=lambda: {"requests": {"cpu": "50m", "memory": "64Mi"}})
    tolerations: list[dict[str, Any]] = field(default_factory=lambda: [{"operator": "Exists"}])
    nodeSelector: dict[str, str] = field(default_factory=lambda: {"kubernetes.io/os": "linux"})
    natPortRange: str = "{}-{}".format(*NAT_PORT_RANGE_DEFAULT)   # the agent's --nat-port-range (SNAT ports)
    nodeNeighRefresh: float = 0.5      # the agent's --node-neigh-refresh (seconds; 0: off)
    # The host's cgroup v2 root (Cilium's cgroup.hostRoot): the socket LB attaches there, so that every pod's
    # and the node's own processes are load-balanced at the socket. /sys/fs/cgroup on a pure cgroup v2 host.
    cgroupHostRoot: str = "/sys/fs/cgroup"
    metricsPort: int = METRICS_PORT

    @classmethod
    def from_mapping(cls, data: Any, where: str = "agent pod settings") -> AgentPod:
        """Build from the chart's YAML; raise ValueError naming the key, what it must be and what it is."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must be a mapping; got {type(data).__name__}")  # noqa: TRY004 - bad config
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; known keys are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        out: dict[str, Any] = {}

        def expect(key: str, kind: type | tuple[type, ...], what: str) -> Any:
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{where}: {key}: must be {what}; got {value!r}")  # noqa: TRY004 - bad config
            return value

        for key in ("imagePullPolicy", "serviceAccountName", "priorityClassName", "cgroupHostRoot"):
            if key in data:
                out[key] = expect(key, str, "a string")
        if "natPortRange" in data:
            try:
                parse_port_range(expect("natPortRange", str, "a port range MIN-MAX"))
            except ValueError as exc:
                raise ValueError(f"{where}: natPortRange: {exc}") from None
            out["natPortRange"] = data["natPortRange"]
        if "nodeNeighRefresh" in data:
            refresh = expect("nodeNeighRefresh", (int, float), "seconds from 0 (off) to 3600")
            if not 0 <= refresh <= 3600:
                raise ValueError(f"{where}: nodeNeighRefresh: must be seconds from 0 (off) to 3600; got {refresh!r}")
            out["nodeNeighRefresh"] = float(refresh)
        if not out.get("cgroupHostRoot", "/").startswith("/"):
            raise ValueError(f"{where}: cgroupHostRoot: must be an absolute path; got {out['cgroupHostRoot']!r}")
        if out.get("imagePullPolicy", "IfNotPresent") not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"{where}: imagePullPolicy: must be one of Always, IfNotPresent, Never; "
                             f"got {out['imagePullPolicy']!r}")
        if "imagePullSecrets" in data:
            secrets = expect("imagePullSecrets", list, "a list of Secret names")
            names = [s.get("name") if isinstance(s, dict) else s for s in secrets]
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{where}: imagePullSecrets: must be Secret names (or {{name: ...}}); got {secrets!r}")
            out["imagePullSecrets"] = tuple(names)
        if "resources" in data:
            out["resources"] = copy.deepcopy(expect("resources", dict, "a mapping (requests, limits)"))
        if "tolerations" in data:
            tolerations = expect("tolerations", list, "a list of tolerations")
            if not all(isinstance(t, dict) for t in tolerations):
                raise ValueError(f"{where}: tolerations: every toleration must be a mapping; got {tolerations!r}")
            out["tolerations"] = copy.deepcopy(tolerations)
        if "nodeSelector" in data:
            selector = expect("nodeSelector", dict, "a mapping of label to value")
            out["nodeSelector"] = {str(k): str(v) for k, v in selector.items()}
        if "metricsPort" in data:
            port = expect("metricsPort", int, "a port number 1-65535")
            if not 0 < port < 65536:
                raise ValueError(f"{where}: metricsPort: must be a port number 1-65535; got {port!r}")
            out["metricsPort"] = port
        return cls(**out)

    @classmethod
    def load(cls, path: str | Path) -> AgentPod:
        """Read the chart's agent pod settings file (YAML)."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read the agent pod settings {path}: {exc}") from None
        return cls.from_mapping(data, where=str(path))


def agent_configmap(data: dict[str, str], namespace: str = NAMESPACE) -> KubeObject:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": AGENT_CONFIG_NAME, "namespace": namespace, "labels": {**SELECTOR, **MANAGED}},
        "data": dict(data),
    }


def bpffs_init_container(image: str, pull_policy: str) -> KubeObject:
    """Mounts bpffs on the host before the agent starts, whatever the host had mounted (as Cilium does): its
    /sys/fs/bpf is the host's, with Bidirectional propagation, so the mount lands in the host's namespace and
    every later pod of the agent sees it (HostToContainer); the agent itself never mounts one. Bidirectional
    propagation needs a privileged container; it runs `bpflb mount-bpffs`, which does nothing when a bpffs is
    already mounted there."""
    return {
        "name": "mount-bpffs",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": ["bpflb", "mount-bpffs", "/sys/fs/bpf"],
        "securityContext": {"privileged": True, "runAsUser": 0},
        "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}],
    }


def agent_daemonset(image: str = DEFAULT_IMAGE, pod: AgentPod | None = None, namespace: str = NAMESPACE) -> KubeObject:
    """The agents' DaemonSet. Its pod template carries nothing of the configuration: agents read the
    ConfigMap through the API, so a mode change reprograms them without restarting a pod."""
    pod = pod or AgentPod()
    spec: dict[str, Any] = {
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "serviceAccountName": pod.serviceAccountName,
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": "agent",
            "image": image,
            "imagePullPolicy": pod.imagePullPolicy,
            "command": ["bpflb", "agent", "--kube", "--node-name", "$(NODE_NAME)",
                        "--pin-root", PIN_ROOT, "--cgroup-root", CGROUP_ROOT, "--nat-port-range", pod.natPortRange,
                        f"--node-neigh-refresh={pod.nodeNeighRefresh:g}", f"--metrics-listen=0.0.0.0:{pod.metricsPort}"],
            # The agent finds its ConfigMap and writes its report in its own namespace (POD_NAMESPACE).
            "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            # Root with three capabilities, not privileged: the image's default user is unprivileged
            # (the operator's), so the agent says it runs as uid 0.
            "securityContext": {
                "privileged": False,
                "runAsUser": 0,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"], "add": list(CAPABILITIES)},
            },
            "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf",
                              "mountPropagation": "HostToContainer"},
                             {"name": "cgroup", "mountPath": CGROUP_ROOT, "readOnly": True}],
            **agent_probes(pod.metricsPort),
        }],
        "initContainers": [bpffs_init_container(image, pod.imagePullPolicy)],
        # The host's bpffs: pinned maps outlive the pod, so a restarted agent keeps every
        # frontend and every open flow.
        "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
                    # The host's cgroup v2 root, outside the pod's cgroup namespace (the socket LB's attach
                    # point; attaching needs only a descriptor of the directory: read-only).
                    {"name": "cgroup", "hostPath": {"path": pod.cgroupHostRoot, "type": "Directory"}}],
    }
    # The optional fields appear only when set: the API server drops empty ones, and an empty value the
    # live object cannot hold would read as drift forever. daemonset_drifted/daemonset_patch remove them.
    optional: dict[str, Any] = {
        "priorityClassName": pod.priorityClassName,
        "tolerations": copy.deepcopy(pod.tolerations),
        "nodeSelector": dict(pod.nodeSelector),
        "imagePullSecrets": [{"name": name} for name in pod.imagePullSecrets],
    }
    spec.update({k: v for k, v in optional.items() if v})
    if pod.resources:
        spec["containers"][0]["resources"] = copy.deepcopy(pod.resources)
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET_NAME, "namespace": namespace, "labels": {**SELECTOR, **MANAGED}},
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": dict(SELECTOR)}, "spec": spec},
        },
    }


def agent_probes(port: int) -> dict[str, Any]:
    """The agent container's metrics port and probes (bpflb.metrics): live while its loop turns, ready once
    its first full sync is done. hostNetwork: the port is the node's."""
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "metrics", "scheme": "HTTP"}, "periodSeconds": period,
                "timeoutSeconds": 5, "failureThreshold": failures, "successThreshold": 1}

    return {
        "ports": [{"name": "metrics", "containerPort": port, "hostPort": port, "protocol": "TCP"}],
        "livenessProbe": probe("/healthz", 10, 6),
        "readinessProbe": probe("/readyz", 5, 3),
    }


# Pod-template fields the operator owns whole: when the wanted DaemonSet leaves one out, the live one must
# not have it either.
OWNED_POD_FIELDS = ("priorityClassName", "tolerations", "nodeSelector", "imagePullSecrets")


def _pod_spec(ds: KubeObject) -> dict[str, Any]:
    spec: dict[str, Any] = ((ds.get("spec") or {}).get("template") or {}).get("spec") or {}
    return spec


def daemonset_drifted(live: KubeObject, wanted: KubeObject) -> bool:
    """True when the live DaemonSet lacks something wanted, or holds an owned field (or nodeSelector key, or
    container resources) that the wanted one no longer has."""
    if not contains(live, wanted):
        return True
    live_pod, wanted_pod = _pod_spec(live), _pod_spec(wanted)
    if any(live_pod.get(f) and f not in wanted_pod for f in OWNED_POD_FIELDS):
        return True
    if not set(live_pod.get("nodeSelector") or {}) <= set(wanted_pod.get("nodeSelector") or {}):
        return True
    live_containers = live_pod.get("containers") or []
    return any(c.get("resources") and not w.get("resources")
               for c, w in zip(live_containers, wanted_pod["containers"], strict=False))


def daemonset_patch(live: KubeObject, wanted: KubeObject) -> KubeObject:
    """The merge patch that puts a drifted DaemonSet back: labels and spec as wanted, owned fields the wanted
    one leaves out set to null, and so are nodeSelector keys it no longer has (a merge patch replaces lists,
    the containers included, whole, but merges mappings key by key)."""
    spec = copy.deepcopy(wanted["spec"])
    live_pod, pod = _pod_spec(live), spec["template"]["spec"]
    for name in OWNED_POD_FIELDS:
        if name not in pod and live_pod.get(name):
            pod[name] = None
    if pod.get("nodeSelector"):
        pod["nodeSelector"] = {**{k: None for k in live_pod.get("nodeSelector") or {}
                                  if k not in pod["nodeSelector"]}, **pod["nodeSelector"]}
    return {"metadata": {"labels": wanted["metadata"]["labels"]}, "spec": spec}


def contains(live: Any, wanted: Any) -> bool:
    """True when live holds everything wanted holds (mappings: a subset, recursively; lists: the same length
    and element by element; scalars: equal). Fields the API server adds (defaults, status) do not count."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and \
            all(contains(a, b) for a, b in zip(live, wanted, strict=True))
    return bool(live == wanted)
