"""The objects the operator keeps in shape: the agents' ConfigMap and DaemonSet (kube-system/bpflb-agent),
and the subset comparison that decides whether a live object still matches what the operator wants."""

from __future__ import annotations

from typing import Any

from bpflb.control.kubeapi import KubeObject
from bpflb.sources.base import AGENT_CONFIG_NAME, AGENT_CONFIG_NAMESPACE

NAMESPACE = AGENT_CONFIG_NAMESPACE
DAEMONSET_NAME = "bpflb-agent"
DEFAULT_IMAGE = "ghcr.io/bpflb/bpflb:0.1.0"
PIN_ROOT = "/sys/fs/bpf/bpflb"
SELECTOR = {"app.kubernetes.io/name": "bpflb", "app.kubernetes.io/component": "agent"}
MANAGED = {"app.kubernetes.io/managed-by": "bpflb-operator"}
# What the agent needs and nothing more: load BPF objects and maps (BPF), attach them to a device with tc
# and use the networking helpers (NET_ADMIN), and the verifier's pointer rules for tc programs (PERFMON).
CAPABILITIES = ("BPF", "NET_ADMIN", "PERFMON")


def agent_configmap(data: dict[str, str]) -> KubeObject:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": AGENT_CONFIG_NAME, "namespace": NAMESPACE, "labels": {**SELECTOR, **MANAGED}},
        "data": dict(data),
    }


def agent_daemonset(image: str = DEFAULT_IMAGE) -> KubeObject:
    """The agents' DaemonSet. Its pod template carries nothing of the configuration: agents read the
    ConfigMap through the API, so a mode change reprograms them without restarting a pod."""
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET_NAME, "namespace": NAMESPACE, "labels": {**SELECTOR, **MANAGED}},
        "spec": {
            "selector": {"matchLabels": dict(SELECTOR)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(SELECTOR)},
                "spec": {
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "serviceAccountName": "bpflb-agent",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "agent",
                        "image": image,
                        "command": ["bpflb", "agent", "--kube", "--node-name", "$(NODE_NAME)",
                                    "--pin-root", PIN_ROOT],
                        "env": [{"name": "NODE_NAME",
                                 "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                        "securityContext": {
                            "privileged": False,
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"], "add": list(CAPABILITIES)},
                        },
                        "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf",
                                          "mountPropagation": "HostToContainer"}],
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    }],
                    # The host's bpffs: pinned maps outlive the pod, so a restarted agent keeps every
                    # frontend and every open flow.
                    "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}}],
                },
            },
        },
    }


def contains(live: Any, wanted: Any) -> bool:
    """True when live holds everything wanted holds (mappings: a subset, recursively; lists: the same length
    and element by element; scalars: equal). Fields the API server adds (defaults, status) do not count."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and \
            all(contains(a, b) for a, b in zip(live, wanted, strict=True))
    return bool(live == wanted)
