"""The lab as the cluster's API server and endpoint controller: validates Pods and Services, allocates
clusterIPs, nodePorts and LoadBalancer addresses, generates EndpointSlices from Pods, and writes everything
the agents read as one YAML file per object (atomically) into the cluster directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import yaml

from bpflb.model.settings import CiliumSettings, agent_config_data
from bpflb.sources.base import AGENT_CONFIG_NAME, AGENT_CONFIG_NAMESPACE
from bpflb_lab.lab import topology
from bpflb_lab.lab.errors import LabError
from bpflb_lab.lab.state import atomic_write

KubeObject = dict[str, Any]

NODEPORT_RANGE = range(30000, 32768)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "bpflb-lab"
SUPPORTED_KINDS = ("Pod", "Service", "EndpointSlice")
HEADLESS_LABEL = "service.kubernetes.io/headless"


# ---------------------------------------------------------------------------------------------- parsing

def load_documents(text: str, origin: str) -> list[KubeObject]:
    """Parse multi-document YAML (a `kind: List` is flattened); empty documents are skipped."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise LabError(f"{origin}: not valid YAML: {exc}") from exc
    out: list[KubeObject] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise LabError(f"{origin}: document {i + 1} is not a mapping")
        if doc.get("kind") == "List":
            out.extend(item for item in doc.get("items") or [] if isinstance(item, dict))
        else:
            out.append(doc)
    check_documents(out, origin)
    return out


def check_documents(docs: list[KubeObject], origin: str) -> None:
    """Every document is a Pod, a Service or an EndpointSlice with a name."""
    for i, doc in enumerate(docs):
        kind = doc.get("kind")
        if kind not in SUPPORTED_KINDS:
            raise LabError(f"{origin}: document {i + 1}: kind {kind!r} is not supported by the lab "
                           f"(supported: {', '.join(SUPPORTED_KINDS)})")
        name = (doc.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise LabError(f"{origin}: document {i + 1} ({kind}): metadata.name is required")


def object_key(obj: Mapping[str, Any]) -> str:
    """'namespace/name' of a namespaced object (namespace defaults to 'default')."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def describe(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')} {object_key(obj)}"


# ---------------------------------------------------------------------------------------------- pods

@dataclass(frozen=True)
class PodPorts:
    tcp: tuple[int, ...]
    udp: tuple[int, ...]


DEFAULT_POD_PORTS = PodPorts(tcp=(8080,), udp=(8081,))


def validate_pod(pod: KubeObject, nodes: int) -> tuple[KubeObject, int, PodPorts]:
    """Normalise a Pod manifest; return it with the node index it runs on and the ports its echo serves."""
    pod = copy.deepcopy(pod)
    where = describe(pod)
    meta = pod.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    if "/" in meta["name"] or "_" in meta["name"]:
        raise LabError(f"{where}: metadata.name must not contain '/' or '_'")
    meta.setdefault("labels", {})
    if not isinstance(meta["labels"], dict):
        raise LabError(f"{where}: metadata.labels must be a mapping")
    spec = pod.setdefault("spec", {})
    if spec.get("hostNetwork"):
        raise LabError(f"{where}: spec.hostNetwork pods are not supported by the lab")
    node = spec.get("nodeName")
    k = topology.node_index(node) if isinstance(node, str) else None
    if k is None or k > nodes:
        raise LabError(f"{where}: spec.nodeName must name a lab node (node1..node{nodes}); got {node!r}")
    tcp: list[int] = []
    udp: list[int] = []
    for ci, container in enumerate(spec.setdefault("containers", []) or []):
        for pi, port in enumerate(container.get("ports") or []):
            field = f"spec.containers[{ci}].ports[{pi}]"
            number = port.get("containerPort")
            if not isinstance(number, int) or not 0 < number < 65536:
                raise LabError(f"{where}: {field}.containerPort must be 1-65535; got {number!r}")
            proto = port.setdefault("protocol", "TCP")
            if proto not in ("TCP", "UDP"):
                raise LabError(f"{where}: {field}.protocol {proto!r}: the echo server speaks TCP and UDP only")
            (tcp if proto == "TCP" else udp).append(number)
    ports = PodPorts(tuple(sorted(set(tcp))), tuple(sorted(set(udp)))) if tcp or udp else DEFAULT_POD_PORTS
    return pod, k, ports


def pod_with_status(pod: KubeObject, pod_ip: str, host_ip: str) -> KubeObject:
    """The pod as the API server would show it once running (user-given conditions are kept)."""
    pod = copy.deepcopy(pod)
    status = pod.setdefault("status", {})
    status.setdefault("phase", "Running")
    status["podIP"] = pod_ip
    status["podIPs"] = [{"ip": pod_ip}]
    status["hostIP"] = host_ip
    conditions = status.setdefault("conditions", [])
    if not any(c.get("type") == "Ready" for c in conditions):
        conditions.append({"type": "Ready", "status": "True"})
    return pod


def _pod_ready(pod: KubeObject) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return True


# ---------------------------------------------------------------------------------------------- services

def validate_service(svc: KubeObject, others: Iterable[KubeObject], previous: KubeObject | None) -> KubeObject:
    """Normalise a Service like the API server: defaults, nodePort and LoadBalancer address allocation.

    others are the other Services (for allocation conflicts); previous is the Service being replaced,
    whose allocations are kept when the new manifest does not name them.
    """
    svc = copy.deepcopy(svc)
    where = describe(svc)
    svc.setdefault("apiVersion", "v1")
    meta = svc.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    spec = svc.setdefault("spec", {})
    svc_type = spec.setdefault("type", "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise LabError(f"{where}: spec.type {svc_type!r} is not a Service type")
    external = svc_type in ("NodePort", "LoadBalancer")
    if external:
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if spec.get("externalTrafficPolicy") not in (None, "Cluster", "Local"):
        raise LabError(f"{where}: spec.externalTrafficPolicy must be Cluster or Local")
    if spec.get("internalTrafficPolicy") not in (None, "Cluster", "Local"):
        raise LabError(f"{where}: spec.internalTrafficPolicy must be Cluster or Local")
    if svc_type != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
        _allocate_cluster_ip(svc, where, others, previous)

    used_ports: dict[tuple[int, str], str] = {}
    used_ips: set[IPv4Address] = set()
    for other in others:
        for p in (other.get("spec") or {}).get("ports") or []:
            if p.get("nodePort"):
                used_ports[(p["nodePort"], p.get("protocol", "TCP"))] = object_key(other)
        hc = (other.get("spec") or {}).get("healthCheckNodePort")
        if hc:
            used_ports[(hc, "TCP")] = object_key(other)
        used_ips |= _lb_ips(other)

    prev_ports = {(p.get("name", ""), p.get("protocol", "TCP"), p.get("port")): p.get("nodePort")
                  for p in ((previous or {}).get("spec") or {}).get("ports") or []}
    ports = spec.get("ports") or []
    if not isinstance(ports, list) or (not ports and svc_type != "ExternalName"):
        raise LabError(f"{where}: spec.ports must be a non-empty list")
    names = [p.get("name", "") for p in ports]
    if len(ports) > 1 and (not all(names) or len(set(names)) != len(names)):
        raise LabError(f"{where}: with several ports every spec.ports entry needs a unique name")
    mine: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        field = f"spec.ports[{i}]"
        proto = port.setdefault("protocol", "TCP")
        if proto not in ("TCP", "UDP"):
            raise LabError(f"{where}: {field}.protocol {proto!r} is not supported; expected TCP or UDP")
        if not isinstance(port.get("port"), int) or not 0 < port["port"] < 65536:
            raise LabError(f"{where}: {field}.port must be 1-65535; got {port.get('port')!r}")
        port.setdefault("targetPort", port["port"])
        if not external:
            continue
        if svc_type == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is False \
                and not port.get("nodePort"):
            continue
        node_port = port.get("nodePort") or prev_ports.get((port.get("name", ""), proto, port["port"]))
        if node_port is not None:
            if not isinstance(node_port, int) or node_port not in NODEPORT_RANGE:
                raise LabError(f"{where}: {field}.nodePort must be in 30000-32767; got {node_port!r}")
            if (node_port, proto) in used_ports:
                raise LabError(f"{where}: {field}.nodePort {node_port}/{proto} is already allocated to "
                               f"Service {used_ports[(node_port, proto)]}")
        else:
            node_port = next((n for n in NODEPORT_RANGE if (n, proto) not in used_ports
                              and (n, proto) not in mine), None)
            if node_port is None:
                raise LabError(f"{where}: no free nodePort left")
        port["nodePort"] = node_port
        mine.add((node_port, proto))
        used_ports[(node_port, proto)] = object_key(svc)

    for i, addr in enumerate(spec.get("externalIPs") or []):
        try:
            ip_address(addr)
        except ValueError as exc:
            raise LabError(f"{where}: spec.externalIPs[{i}]: {exc}") from exc

    _health_check_node_port(svc, where, used_ports, previous)
    if svc_type == "LoadBalancer":
        status = svc.setdefault("status", {}).setdefault("loadBalancer", {})
        if not status.get("ingress"):
            kept = sorted(_lb_ips(previous)) if previous else []
            if kept and kept[0] not in used_ips:
                status["ingress"] = [{"ip": str(kept[0])}]
            else:
                hosts = (topology.LB_NET.network_address + n for n in range(topology.LB_POOL_FIRST, 255))
                free = next((a for a in hosts if a not in used_ips), None)
                if free is None:
                    raise LabError(f"{where}: the lab's LoadBalancer pool {topology.LB_NET} is exhausted")
                status["ingress"] = [{"ip": str(free)}]
        for i, ing in enumerate(status["ingress"]):
            try:
                addr = ip_address(ing.get("ip", ""))
            except ValueError as exc:
                raise LabError(f"{where}: status.loadBalancer.ingress[{i}].ip: {exc}") from exc
            if addr in used_ips:
                raise LabError(f"{where}: LoadBalancer address {addr} is already used by another Service")
    return svc


def _health_check_node_port(svc: KubeObject, where: str, used_ports: dict[tuple[int, str], str],
                            previous: KubeObject | None) -> None:
    """Like the API server: an eTP Local LoadBalancer Service gets a healthCheckNodePort (the one given, else
    the one it had, else the first free port of the NodePort range, TCP); any other Service has none."""
    spec = svc["spec"]
    if spec.get("type") != "LoadBalancer" or spec.get("externalTrafficPolicy") != "Local":
        if spec.get("healthCheckNodePort") is not None:
            raise LabError(f"{where}: spec.healthCheckNodePort is only for type LoadBalancer with "
                           "externalTrafficPolicy Local")
        return
    port = spec.get("healthCheckNodePort") or ((previous or {}).get("spec") or {}).get("healthCheckNodePort")
    if port is not None:
        if not isinstance(port, int) or port not in NODEPORT_RANGE:
            raise LabError(f"{where}: spec.healthCheckNodePort must be in 30000-32767; got {port!r}")
        if (port, "TCP") in used_ports and used_ports[(port, "TCP")] != object_key(svc):
            raise LabError(f"{where}: spec.healthCheckNodePort {port} is already allocated to Service "
                           f"{used_ports[(port, 'TCP')]}")
    else:
        port = next((n for n in NODEPORT_RANGE if (n, "TCP") not in used_ports), None)
        if port is None:
            raise LabError(f"{where}: no free port left for spec.healthCheckNodePort")
    spec["healthCheckNodePort"] = port
    used_ports[(port, "TCP")] = object_key(svc)


def validate_endpoint_slice(obj: KubeObject) -> KubeObject:
    """A user's EndpointSlice (for a Service without a selector), checked as the API server would."""
    obj = copy.deepcopy(obj)
    where = describe(obj)
    obj.setdefault("apiVersion", "discovery.k8s.io/v1")
    meta = obj.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    labels = meta.setdefault("labels", {})
    if not isinstance(labels, dict) or not isinstance(labels.get(SERVICE_NAME_LABEL), str):
        raise LabError(f"{where}: metadata.labels[{SERVICE_NAME_LABEL!r}] must name the Service it belongs to")
    if labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
        raise LabError(f"{where}: {MANAGED_BY_LABEL}={MANAGED_BY} marks the lab's own slices; leave it out")
    if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
        raise LabError(f"{where}: addressType must be IPv4, IPv6 or FQDN; got {obj.get('addressType')!r}")
    for i, ep in enumerate(obj.get("endpoints") or []):
        addresses = ep.get("addresses") if isinstance(ep, dict) else None
        if not isinstance(addresses, list) or not addresses:
            raise LabError(f"{where}: endpoints[{i}].addresses must be a non-empty list")
        for j, addr in enumerate(addresses):
            try:
                ip_address(addr)
            except ValueError as exc:
                raise LabError(f"{where}: endpoints[{i}].addresses[{j}]: {exc}") from exc
    for i, port in enumerate(obj.get("ports") or []):
        if not isinstance(port, dict) or not isinstance(port.get("port"), int):
            raise LabError(f"{where}: ports[{i}].port must be a number")
        port.setdefault("protocol", "TCP")
    return obj


def _allocate_cluster_ip(svc: KubeObject, where: str, others: Iterable[KubeObject],
                         previous: KubeObject | None) -> None:
    """spec.clusterIP and spec.clusterIPs as the API server sets them: the one asked for (in the lab's Service
    network, free) or "None" (headless), else the previous one, else a free address of the Service network
    (the first free one from a hash of the Service's name: the same Service gets the same address)."""
    spec = svc["spec"]
    taken = {str((o.get("spec") or {}).get("clusterIP")): object_key(o) for o in others}
    asked = spec.get("clusterIP") or (spec.get("clusterIPs") or [None])[0]
    if asked is None and previous is not None:
        asked = (previous.get("spec") or {}).get("clusterIP")
    if asked == "None":
        spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
        return
    net = topology.SERVICE_NET
    if asked is not None:
        try:
            addr = IPv4Address(asked)
        except ValueError as exc:
            raise LabError(f"{where}: spec.clusterIP: {exc}") from exc
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise LabError(f"{where}: spec.clusterIP {addr} is not in the lab's Service network {net}")
        if str(addr) in taken:
            raise LabError(f"{where}: spec.clusterIP {addr} is already allocated to Service {taken[str(addr)]}")
    else:
        size = net.num_addresses - 2
        start = int.from_bytes(hashlib.sha256(object_key(svc).encode()).digest()[:4], "big") % size
        free = next((a for a in (net.network_address + 1 + (start + i) % size for i in range(size))
                     if str(a) not in taken), None)
        if free is None:
            raise LabError(f"{where}: the lab's Service network {net} is exhausted")
        addr = free
    spec["clusterIP"], spec["clusterIPs"] = str(addr), [str(addr)]


def _lb_ips(svc: KubeObject | None) -> set[IPv4Address]:
    out: set[IPv4Address] = set()
    for ing in (((svc or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        try:
            addr = ip_address(ing.get("ip", ""))
        except ValueError:
            continue
        if isinstance(addr, IPv4Address):
            out.add(addr)
    return out


# ---------------------------------------------------------------------------------------------- slices

def _resolve_target_port(port: Mapping[str, Any], pod: KubeObject) -> int | None:
    """The pod port a Service port sends to: a number as is, a name looked up in the pod's containers."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for cport in container.get("ports") or []:
            if cport.get("name") == target and cport.get("protocol", "TCP") == port.get("protocol", "TCP"):
                number = cport.get("containerPort")
                return number if isinstance(number, int) else None
    return None  # like Kubernetes: this pod is not an endpoint of that port


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def endpoint_slices(svc: KubeObject, pods: Iterable[KubeObject]) -> list[KubeObject]:
    """EndpointSlices for svc from the running pods its selector matches, as the Kubernetes controller
    would build them: one slice per distinct set of resolved ports; an empty placeholder slice when no
    pod matches; none for Services without a selector (their slices are the user's)."""
    spec = svc.get("spec") or {}
    selector = spec.get("selector")
    if not selector or spec.get("type") == "ExternalName":
        return []
    ns, name = object_key(svc).split("/", 1)
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[str, tuple[list[KubeObject], list[KubeObject]]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if meta.get("namespace", "default") != ns or not status.get("podIP"):
            continue
        if not _selects(selector, meta.get("labels") or {}):
            continue
        ports = []
        for sp in spec.get("ports") or []:
            number = _resolve_target_port(sp, pod)
            if number is None:
                continue
            entry: KubeObject = {"name": sp.get("name", ""), "port": number, "protocol": sp.get("protocol", "TCP")}
            if sp.get("appProtocol"):
                entry["appProtocol"] = sp["appProtocol"]
            ports.append(entry)
        terminating = bool(meta.get("deletionTimestamp"))
        serving = _pod_ready(pod)
        endpoint = {
            "addresses": [status["podIP"]],
            "conditions": {"ready": publish_not_ready or (serving and not terminating),
                           "serving": serving, "terminating": terminating},
            "nodeName": (pod.get("spec") or {}).get("nodeName"),
            "targetRef": {"kind": "Pod", "namespace": ns, "name": meta["name"]},
        }
        groups.setdefault(json.dumps(ports, sort_keys=True), (ports, []))[1].append(endpoint)
    if not groups:
        groups[json.dumps([])] = ([], [])
    # As Kubernetes' controller: the Service's labels are copied, and a headless Service's slices say so.
    labels = {**((svc.get("metadata") or {}).get("labels") or {}), SERVICE_NAME_LABEL: name,
              MANAGED_BY_LABEL: MANAGED_BY}
    if spec.get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    slices = []
    for digest_src, (ports, endpoints) in sorted(groups.items()):
        suffix = hashlib.sha1(f"{ns}/{name}/{digest_src}".encode()).hexdigest()[:5]
        slices.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{suffix}", "namespace": ns, "labels": labels},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        })
    return slices


# ---------------------------------------------------------------------------------------------- fixed objects

def node_object(k: int) -> KubeObject:
    name = topology.node_name(k)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": str(topology.pod_cidr(k)), "podCIDRs": [str(topology.pod_cidr(k))]},
        "status": {"addresses": [{"type": "InternalIP", "address": str(topology.node_ip(k))},
                                 {"type": "Hostname", "address": name}]},
    }


def lab_settings(mode: str, algorithm: str | None = None, tunnel: str = "Disabled",
                 acceleration: str = "Disabled", extra: Mapping[str, Any] | None = None) -> CiliumSettings:
    """The lab's module settings, through the one schema: the nodes share one L2 segment, so with tunnelMode
    Disabled the agents install native routes to each other's pod CIDRs (createNodeRoutes), as Deckhouse
    would; per-Service algorithm annotations are on (extraLoadBalancerAlgorithmsEnabled)."""
    values: dict[str, Any] = {"bpfLBMode": mode, "tunnelMode": tunnel, "createNodeRoutes": True,
                              "xdpAcceleration": acceleration, "extraLoadBalancerAlgorithmsEnabled": True}
    if algorithm is not None:
        values["lbAlgorithm"] = algorithm
    return CiliumSettings.model_validate({**values, **(extra or {})})


def agent_config(mode: str, algorithm: str | None = None, tunnel: str = "Disabled",
                 acceleration: str = "Disabled", extra: Mapping[str, Any] | None = None) -> KubeObject:
    """The agents' configuration ConfigMap, as the operator would write it for the lab's settings."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": AGENT_CONFIG_NAME, "namespace": AGENT_CONFIG_NAMESPACE},
        "data": agent_config_data(lab_settings(mode, algorithm, tunnel, acceleration, extra)),
    }


# ---------------------------------------------------------------------------------------------- the directory

class ClusterDir:
    """The directory of Kubernetes objects agents read: one `<kind>-<namespace>-<name>.yaml` per object.

    Files are replaced atomically (temporary files start with '.' and end in '.tmp').
    """

    def publish(self) -> list[str]:
        """Nothing to publish: the agents read this directory themselves (the API-backed one publishes)."""
        return []

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def filename(obj: Mapping[str, Any]) -> str:
        """<kind>-<namespace>-<name>.yaml; EndpointSlices in JSON (.json), which every reader parses many times
        faster: a Service may have tens of thousands of endpoints."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace")
        parts = [str(obj["kind"]).lower(), *([ns] if ns else []), meta["name"]]
        return "-".join(parts) + (".json" if obj["kind"] == "EndpointSlice" else ".yaml")

    def write(self, obj: Mapping[str, Any]) -> None:
        name = self.filename(obj)
        text = json.dumps(dict(obj)) if name.endswith(".json") else yaml.safe_dump(dict(obj), sort_keys=False)
        atomic_write(self.path / name, text)

    def remove(self, obj: Mapping[str, Any]) -> None:
        (self.path / self.filename(obj)).unlink(missing_ok=True)

    def objects(self, kind: str | None = None) -> list[KubeObject]:
        out = []
        for file in sorted([*self.path.glob("*.yaml"), *self.path.glob("*.json")]):
            try:
                text = file.read_text()
                obj = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if isinstance(obj, dict) and (kind is None or obj.get("kind") == kind):
                out.append(obj)
        return out

    def replace_slices(self, svc_key: str, slices: list[KubeObject]) -> None:
        """Make the slices of one Service exactly `slices` (stale ones are removed after the new are written)."""
        ns, name = svc_key.split("/", 1)
        keep = {self.filename(s) for s in slices}
        for s in slices:
            self.write(s)
        for old in self.objects("EndpointSlice"):
            meta = old.get("metadata") or {}
            if meta.get("namespace", "default") == ns and \
                    (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) == name and \
                    (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY and \
                    self.filename(old) not in keep:
                self.remove(old)
