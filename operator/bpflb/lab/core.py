"""The Lab: a Kubernetes-like cluster of network namespaces on this machine, its workload and agents,
and the Python API the CLI and the tests drive it through.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import bpflb
from bpflb.lab import cluster, netns, probe, topology
from bpflb.lab.check import CheckReport, evaluate, plan
from bpflb.lab.cluster import ClusterDir, KubeObject
from bpflb.lab.errors import LabError, LabUnsupported
from bpflb.lab.probe import HttpProbe, Probe, ProbeResult, UdpProbe
from bpflb.lab.state import DEFAULT_PIN_BASE, DEFAULT_STATE_ROOT, LabPaths, LabState, PodRecord
from bpflb.model.types import Mode

T = TypeVar("T")

DEFAULT_NAME = "bpflb"
ENV_AGENT_CMD = "BPFLB_LAB_AGENT_CMD"
DEFAULT_AGENT_CMD = ("{python} -m bpflb agent --node-name {node} --source-dir {source_dir} "
                     "--pin-root {pin_root} --device {device}")
SUPPORTED_MODES = ("SNAT", "DSR", "Hybrid")
ALGORITHMS = ("Random", "Maglev")
SUPPORTED_TUNNELS = ("Disabled", "VXLAN")
TUNNELS = ("Disabled", "VXLAN")
ECHO_START_TIMEOUT = 15.0
BPFFS = Path("/sys/fs/bpf")


def canonical_mode(text: str) -> str:
    """SNAT / DSR / Hybrid in their ModuleConfig spelling, whatever the case given."""
    for mode in Mode:
        if mode.label.lower() == text.lower():
            return mode.label
    raise LabError(f"--mode {text}: must be one of SNAT, DSR, Hybrid")


ACCELERATIONS = ("Disabled", "Native", "BestEffort")


def canonical_acceleration(text: str) -> str:
    for acceleration in ACCELERATIONS:
        if acceleration.lower() == text.lower():
            return acceleration
    raise LabError(f"--acceleration {text}: must be one of {', '.join(ACCELERATIONS)}")


def canonical_algorithm(text: str) -> str:
    """Random / Maglev in their ConfigMap spelling (lbAlgorithm), whatever the case given."""
    for algorithm in ALGORITHMS:
        if algorithm.lower() == text.lower():
            return algorithm
    raise LabError(f"--algorithm {text}: must be one of {', '.join(ALGORITHMS)}")


def canonical_tunnel(text: str) -> str:
    for tunnel in TUNNELS:
        if tunnel.lower() == text.lower():
            return tunnel
    raise LabError(f"--tunnel {text}: must be one of {', '.join(TUNNELS)}")


def default_manifests() -> str:
    """The default workload shipped with the package (manifests/default.yaml)."""
    return resources.files("bpflb.lab").joinpath("manifests/default.yaml").read_text()


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"    ({path} is missing)"
    return "\n".join(f"    {line}" for line in text) if text else f"    ({path} is empty)"


def bpffs_mounted(path: Path = BPFFS) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(path), "bpf"] for line in f)


def _pid_alive(pid: int | None, inode: int | None = None) -> bool:
    """pid runs (not a zombie), and, when inode is given, in that network namespace."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        if inode is not None:
            return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{inode}]"
    except (OSError, IndexError):
        return False
    return True


@dataclass
class DownReport:
    """What `down` removed."""

    namespaces: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)   # directories


class Lab:
    """One lab, identified by its name (the prefix of its namespaces).

    agent_cmd is the agent command template (a string split like a shell would, or a list of tokens) with
    placeholders {python} {node} {source_dir} {pin_root} {device} {lab} {netns} {mode} {log}; default:
    $BPFLB_LAB_AGENT_CMD, else DEFAULT_AGENT_CMD. log receives progress lines.
    """

    def __init__(self, name: str = DEFAULT_NAME, *, state_root: Path | None = None, pin_base: Path | None = None,
                 agent_cmd: str | Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> None:
        topology.validate_lab_name(name)
        self.name = name
        self.paths = LabPaths((state_root or DEFAULT_STATE_ROOT) / name)
        self.pin_root = (pin_base or DEFAULT_PIN_BASE) / name
        self.cluster = ClusterDir(self.paths.cluster)
        self._agent_cmd = agent_cmd
        self._log = log or (lambda line: None)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------------------------------ life cycle

    def exists(self) -> bool:
        """Anything of this lab is there: its state directory or any of its namespaces."""
        return self.paths.root.exists() or bool(topology.lab_namespaces(self.name))

    def up(self, *, nodes: int = 3, mode: str = "SNAT", tunnel: str = "Disabled", agents: bool = True,
           workload: bool = True, recreate: bool = False, agent_timeout: float = 60.0,
           keep_on_failure: bool = False, algorithm: str = "Random", kube: bool = False,
           acceleration: str = "Disabled") -> None:
        """Create the namespaces, the cluster objects, the default workload (workload=True) and start the
        agents (agents=True), waiting until each has written <pin-root>/ready. algorithm is the cluster-wide
        lbAlgorithm the agents' ConfigMap carries (Random or Maglev).

        Raises LabUnsupported for modes/tunnels this release lacks, LabError when the lab exists (unless
        recreate) or anything fails; on failure what was created is removed unless keep_on_failure.
        """
        mode, tunnel = canonical_mode(mode), canonical_tunnel(tunnel)
        algorithm = canonical_algorithm(algorithm)
        acceleration = canonical_acceleration(acceleration)
        if mode not in SUPPORTED_MODES:
            raise LabUnsupported(f"--mode {mode}: not implemented yet (this release supports "
                                 f"{', '.join(SUPPORTED_MODES)})")
        if tunnel not in SUPPORTED_TUNNELS:
            raise LabUnsupported(f"--tunnel {tunnel}: not implemented yet (this release supports "
                                 f"{', '.join(SUPPORTED_TUNNELS)})")
        if not 1 <= nodes <= topology.MAX_NODES:
            raise LabError(f"--nodes {nodes}: must be 1-{topology.MAX_NODES}")
        if self.exists():
            if not recreate:
                raise LabError(f"lab {self.name} already exists; use --recreate, or `bpflb lab down "
                               f"--name {self.name}` first")
            self._log(f"lab {self.name} exists: taking it down first")
            self.down()
        start = time.monotonic()
        try:
            self._up(nodes, mode, tunnel, agents, workload, agent_timeout, algorithm, kube,
                     acceleration=acceleration)
        except BaseException:
            if not keep_on_failure:
                self._log(f"bring-up of lab {self.name} failed: removing what was created")
                with contextlib.suppress(Exception):
                    self.down()
            raise
        self._log(f"lab {self.name} is up ({time.monotonic() - start:.1f}s): mode {mode}, {nodes} nodes, "
                  f"state in {self.paths.root}")

    def _up(self, nodes: int, mode: str, tunnel: str, agents: bool, workload: bool, agent_timeout: float,
            algorithm: str = "Random", kube: bool = False, acceleration: str = "Disabled") -> None:
        for d in (self.paths.cluster, self.paths.logs, self.paths.run):
            d.mkdir(parents=True, exist_ok=True)
        state = LabState(name=self.name, nodes=nodes, mode=mode, tunnel=tunnel, agents=agents,
                         created=time.time(), agent_cmd=self._agent_template(kube) if agents else None,
                         algorithm=algorithm, kube=kube, acceleration=acceleration)
        state.save(self.paths)
        hosts = topology.base_hosts(self.name, nodes)
        self._log(f"creating namespaces {', '.join(h.netns for h in hosts)}")
        topology.create_base(self.name, nodes, native_routes=tunnel == "Disabled")
        crossing = "native routing" if tunnel == "Disabled" else "VXLAN overlay (built by the agents)"
        self._log(f"fabric {topology.FABRIC_NET}: client {topology.CLIENT_IP}, nodes "
                  f"{topology.node_ip(1)}..{topology.node_ip(nodes)}; pod CIDRs 10.244.K.0/24, {crossing}")
        for k in range(1, nodes + 1):
            self.cluster.write(cluster.node_object(k))
        self.cluster.write(cluster.agent_config(mode, algorithm, tunnel, acceleration))
        if acceleration != "Disabled":
            topology.prepare_for_xdp(self.name, nodes)
        if kube:
            from bpflb.lab import kube as kube_lab

            kube_lab.start_control_plane(self, state)
        if workload:
            docs = cluster.load_documents(default_manifests(), "default workload")
            for doc in docs:  # fewer than 3 nodes: put the pods on the last node
                spec = doc.get("spec") or {}
                index = topology.node_index(str(spec.get("nodeName", "")))
                if doc["kind"] == "Pod" and index is not None and index > nodes:
                    spec["nodeName"] = topology.node_name(nodes)
            with self.paths.locked():
                for line in self._apply(state, docs):
                    self._log(line)
        if agents:
            self._start_agents(state)
            self._wait_agents(state, agent_timeout)
        state.phase = "up"
        state.save(self.paths)

    def set_mode(self, mode: str, timeout: float = 10.0) -> float:
        """Switch bpfLBMode on the running lab the way the operator will: rewrite the agents' ConfigMap,
        then wait until every node's datapath (its pinned lb_config map) runs the new mode for new flows.
        Returns the seconds it took; flows already open keep the mode they started with."""
        mode = canonical_mode(mode)
        if mode not in SUPPORTED_MODES:
            raise LabUnsupported(f"mode {mode}: not implemented yet (this release supports "
                                 f"{', '.join(SUPPORTED_MODES)})")
        state = self.state()
        start = time.monotonic()
        with self.paths.locked():
            self.cluster.write(cluster.agent_config(mode, state.algorithm, state.tunnel, state.acceleration))
            if state.kube:          # the operator's way: the ModuleConfig, through the API
                from bpflb.lab import kube as kube_lab

                kube_lab.set_mode(self, mode)
            state.mode = mode
            state.save(self.paths)
        if not state.agents:
            return 0.0
        from bpflb.inspect import collect

        waiting = {topology.node_name(k) for k in range(1, state.nodes + 1)}
        while waiting:
            for node in sorted(waiting):
                with contextlib.suppress(Exception):
                    if collect(self.pin_root / node)["mode"] == mode:
                        waiting.discard(node)
                        self._log(f"{node}: datapath runs {mode} for new flows "
                                  f"({time.monotonic() - start:.1f}s)")
            if waiting and time.monotonic() - start > timeout:
                raise LabError(f"{', '.join(sorted(waiting))} still not on {mode} after {timeout:.0f}s; "
                               f"see {self.paths.logs}")
            if waiting:
                time.sleep(0.05)
        return time.monotonic() - start

    def down(self) -> DownReport:
        """Remove everything of this lab: processes in its namespaces, the namespaces, the state directory
        and the pin root. Works after a crash (everything is found by name) and when nothing exists."""
        report = DownReport()
        names = topology.lab_namespaces(self.name)
        inodes = [i for i in (netns.netns_inode(n) for n in names) if i is not None]
        pids = netns.pids_in_netns(inodes)
        if pids:
            self._log(f"stopping {len(pids)} process(es) in the lab's namespaces")
        survivors = netns.kill_pids(pids)
        report.killed = sorted(set(pids) - set(survivors))
        for child in self._children.values():
            with contextlib.suppress(Exception):
                child.poll()
        self._children.clear()
        if names:
            self._log(f"deleting namespaces {', '.join(names)}")
        stuck = netns.delete_netns(names)
        report.namespaces = [n for n in names if n not in stuck]
        for d in (self.paths.root, self.pin_root):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
                report.removed.append(str(d))
        problems = []
        if survivors:
            problems.append(f"processes {survivors} did not stop")
        if stuck:
            problems.append(f"namespaces {stuck} could not be deleted")
        left = [str(d) for d in (self.paths.root, self.pin_root) if d.exists()]
        if left:
            problems.append(f"could not remove {', '.join(left)}")
        if problems:
            raise LabError(f"lab {self.name}: down incomplete: {'; '.join(problems)}")
        return report

    # ------------------------------------------------------------------------------------------ state and hosts

    def state(self) -> LabState:
        """The lab's recorded state; LabError explains a missing or broken lab."""
        if not self.paths.state_file.exists():
            left = topology.lab_namespaces(self.name)
            if left:
                raise LabError(f"lab {self.name} is broken: namespaces {', '.join(left)} exist but there is no "
                               f"state; run `bpflb lab down --name {self.name}`")
            raise LabError(f"lab {self.name} does not exist (start it with `bpflb lab up --name {self.name}`)")
        return LabState.load(self.paths)

    def hosts(self, state: LabState | None = None) -> list[topology.Host]:
        state = state or self.state()
        hosts = topology.base_hosts(self.name, state.nodes)
        if state.kube:
            from bpflb.lab import kube as kube_lab

            hosts.append(topology.Host(kube_lab.HOST, "control-plane", topology.ns_name(self.name, kube_lab.HOST),
                                       str(kube_lab.API_IP), topology.DEVICE))
        hosts += [topology.Host(p.name, "pod", p.netns, p.ip, topology.DEVICE, p.node)
                  for p in sorted(state.pods.values(), key=lambda p: p.key)]
        return hosts

    def netns(self, host: str) -> str:
        """The namespace of a host: fabric, client, nodeK, a pod name (or namespace/name), or a namespace name."""
        if host in ("fabric", "client", "control-plane") or topology.node_index(host):
            ns = topology.ns_name(self.name, host)
        elif topology.lab_netns_regex(self.name).match(host):
            ns = host
        else:
            pods = self.state().pods
            matches = [p for p in pods.values() if p.key == host or p.name == host]
            if len(matches) > 1:
                raise LabError(f"host {host!r} is ambiguous: {', '.join(p.key for p in matches)}")
            if not matches:
                raise LabError(f"lab {self.name} has no host {host!r} (fabric, client, node1.., or a pod: "
                               f"{', '.join(sorted(p.name for p in pods.values())) or 'none'})")
            ns = matches[0].netns
        if not netns.netns_exists(ns):
            raise LabError(f"host {host}: namespace {ns} does not exist (is lab {self.name} up?)")
        return ns

    def pods(self) -> list[PodRecord]:
        return sorted(self.state().pods.values(), key=lambda p: p.key)

    def services(self) -> list[KubeObject]:
        return sorted(self.cluster.objects("Service"), key=cluster.object_key)

    def endpoint_slices(self) -> list[KubeObject]:
        return self.cluster.objects("EndpointSlice")

    def node_ip(self, k: int) -> str:
        return str(topology.node_ip(k))

    def pod_ip(self, name: str) -> str:
        return self._pod(self.state(), name).ip

    def status(self) -> dict[str, Any]:
        """A JSON-able description: settings, hosts, agents, pods and Services with their endpoints."""
        state = self.state()
        inodes = {}
        hosts = []
        for h in self.hosts(state):
            inode = netns.netns_inode(h.netns)
            inodes[h.netns] = inode
            hosts.append({**h.to_dict(), "exists": inode is not None})
        agents = []
        for node, pid in sorted(state.agent_pids.items()):
            ns = topology.ns_name(self.name, node)
            agents.append({"node": node, "pid": pid, "alive": _pid_alive(pid, inodes.get(ns)),
                           "ready": os.path.lexists(self.pin_root / node / "ready"),
                           "log": str(self.paths.agent_log(node)), "pin_root": str(self.pin_root / node)})
        pods = [{"name": p.name, "namespace": p.namespace, "node": p.node, "ip": p.ip, "netns": p.netns,
                 "labels": (p.manifest.get("metadata") or {}).get("labels") or {},
                 "echo_pid": p.echo_pid, "alive": _pid_alive(p.echo_pid, inodes.get(p.netns)),
                 "tcp_ports": p.tcp_ports, "udp_ports": p.udp_ports, "log": str(self.paths.pod_log(p.key))}
                for p in sorted(state.pods.values(), key=lambda p: p.key)]
        slices = self.endpoint_slices()
        services = []
        for svc in self.services():
            meta, spec = svc["metadata"], svc.get("spec") or {}
            mine = [s for s in slices if s["metadata"].get("namespace") == meta.get("namespace") and
                    (s["metadata"].get("labels") or {}).get(cluster.SERVICE_NAME_LABEL) == meta["name"]]
            endpoints = [{"pod": (e.get("targetRef") or {}).get("name"), "address": e["addresses"][0],
                          "node": e.get("nodeName"), **(e.get("conditions") or {})}
                         for s in mine for e in s.get("endpoints") or []]
            services.append({
                "name": f"{meta.get('namespace', 'default')}/{meta['name']}", "type": spec.get("type"),
                "externalTrafficPolicy": spec.get("externalTrafficPolicy"),
                "ports": [{k: p[k] for k in ("name", "protocol", "port", "targetPort", "nodePort") if k in p}
                          for p in spec.get("ports") or []],
                "loadBalancerIPs": [i.get("ip") for i in ((svc.get("status") or {}).get("loadBalancer") or {})
                                    .get("ingress") or []],
                "externalIPs": spec.get("externalIPs") or [],
                "endpoints": endpoints,
            })
        return {"name": self.name, "mode": state.mode, "tunnel": state.tunnel, "nodes": state.nodes,
                "phase": state.phase, "agents_enabled": state.agents, "state_dir": str(self.paths.root),
                "cluster_dir": str(self.paths.cluster), "pin_root": str(self.pin_root),
                "hosts": hosts, "agents": agents, "pods": pods, "services": services,
                **({"kube": self._kube_status()} if state.kube else {})}

    def _kube_status(self) -> dict[str, str]:
        from bpflb.lab import kube as kube_lab

        return kube_lab.status(self)

    # ------------------------------------------------------------------------------------------ workload

    def apply(self, source: str | Path | Iterable[KubeObject]) -> list[str]:
        """Apply Pods and Services (a YAML file path, YAML text, or parsed objects); return kubectl-like
        lines ("pod/echo-c created (node1, 10.244.1.10)"). EndpointSlices are regenerated."""
        if isinstance(source, Path):
            try:
                docs = cluster.load_documents(source.read_text(), str(source))
            except OSError as exc:
                raise LabError(f"cannot read {source}: {exc.strerror}") from exc
        elif isinstance(source, str):
            docs = cluster.load_documents(source, "manifest")
        else:
            docs = [dict(d) for d in source]
            cluster.check_documents(docs, "objects")
        with self.paths.locked():
            state = self.state()
            return self._apply(state, docs)

    def delete(self, kind: str, name: str, namespace: str = "default") -> str:
        """Delete a Pod (its namespace and echo server go) or a Service (and its slices)."""
        key = f"{namespace}/{name}"
        with self.paths.locked():
            state = self.state()
            if kind.lower() == "pod":
                rec = state.pods.pop(key, None)
                if rec is None:
                    raise LabError(f"pod {key} does not exist")
                self._remove_pod_runtime(rec)
                state.save(self.paths)
                self._sync_slices(state, self._services_by_key())
                return f"pod/{name} deleted"
            if kind.lower() == "service":
                services = self._services_by_key()
                svc = services.pop(key, None)
                if svc is None:
                    raise LabError(f"service {key} does not exist")
                self.cluster.replace_slices(key, [])
                self.cluster.remove(svc)
                self._publish(state)
                return f"service/{name} deleted"
        raise LabError(f"cannot delete kind {kind!r}: pod or service")

    def replace_pod(self, name: str) -> None:
        """A new pod in the place of an old one, as when a pod is deleted and its address given to the next
        pod on its node: same name, node and address, a new network namespace and veth (so a new MAC), and
        no gratuitous ARP.  The cluster objects do not change.  Returns once the new echo server listens."""
        with self.paths.locked():
            state = self.state()
            rec = self._pod(state, name)
            k = topology.node_index(rec.node)
            if k is None:
                raise LabError(f"pod {rec.key} is on {rec.node!r}, not a lab node")
            self._remove_pod_runtime(rec)
            topology.create_pod(self.name, k, rec.netns, rec.veth, IPv4Address(rec.ip),
                                mtu=topology.POD_MTU.get(state.tunnel, 1500),
                                full_checksums=state.acceleration != "Disabled")
            proc = self._start_echo(rec)
            state.save(self.paths)
            self._wait_echo([(rec, proc)])
        self._log(f"pod/{rec.name} replaced ({rec.node}, {rec.ip}, new MAC)")

    def add_route(self, host: str, dst: str, via: str) -> None:
        """A route on a lab host, e.g. the client to a pod CIDR via a node (as a cloud router routes pod
        CIDRs to their nodes).  Lab namespaces only: host names resolve to this lab's namespaces."""
        self.exec(host, ["ip", "route", "replace", dst, "via", via], check=True)

    def delete_route(self, host: str, dst: str) -> None:
        self.exec(host, ["ip", "route", "del", dst], check=False)

    def _services_by_key(self) -> dict[str, KubeObject]:
        return {cluster.object_key(s): s for s in self.services()}

    def _apply(self, state: LabState, docs: list[KubeObject]) -> list[str]:
        # Validate everything before changing anything.
        services = self._services_by_key()
        svc_lines = []
        for doc in (d for d in docs if d["kind"] == "Service"):
            key = cluster.object_key(doc)
            previous = services.get(key)
            others = [s for k, s in services.items() if k != key]
            services[key] = cluster.validate_service(doc, others, previous)
            node_ports = ", ".join(f"{p['nodePort']}/{p['protocol']}" for p in services[key]["spec"]["ports"]
                                   if p.get("nodePort"))
            lb = [i["ip"] for i in ((services[key].get("status") or {}).get("loadBalancer") or {})
                  .get("ingress") or []]
            extra = "; ".join(x for x in (f"nodePort {node_ports}" if node_ports else "",
                                          f"LoadBalancer {', '.join(lb)}" if lb else "") if x)
            verb = "configured" if previous else "created"
            svc_lines.append(f"service/{key.split('/', 1)[1]} {verb}" + (f" ({extra})" if extra else ""))
        pods = []
        for doc in (d for d in docs if d["kind"] == "Pod"):
            manifest, k, ports = cluster.validate_pod(doc, state.nodes)
            pods.append((cluster.object_key(manifest), manifest, k, ports))
        keys = [p[0] for p in pods]
        if len(set(keys)) != len(keys):
            raise LabError("the same Pod appears twice")

        lines = []
        started: list[tuple[PodRecord, subprocess.Popen[bytes]]] = []
        try:
            for key, manifest, k, ports in pods:
                node = topology.node_name(k)
                old = state.pods.get(key)
                if old and old.node == node and (old.tcp_ports, old.udp_ports) == (list(ports.tcp), list(ports.udp)):
                    old.manifest = cluster.pod_with_status(manifest, old.ip, str(topology.node_ip(k)))
                    lines.append(f"pod/{old.name} configured")
                    continue
                if old:
                    self._remove_pod_runtime(old)
                    del state.pods[key]
                used = {p.ip for p in state.pods.values() if p.node == node}
                addr = next(str(topology.pod_ip(k, i)) for i in range(256) if str(topology.pod_ip(k, i)) not in used)
                ns_, name = key.split("/", 1)
                rec = PodRecord(key=key, manifest=cluster.pod_with_status(manifest, addr, str(topology.node_ip(k))),
                                node=node, ip=addr, netns=topology.pod_ns_name(self.name, ns_, name),
                                veth=topology.pod_veth(ns_, name), tcp_ports=list(ports.tcp),
                                udp_ports=list(ports.udp))
                state.pods[key] = rec
                state.save(self.paths)  # recorded before it exists: a crash leaves nothing unnamed
                topology.create_pod(self.name, k, rec.netns, rec.veth, IPv4Address(addr),
                                    mtu=topology.POD_MTU.get(state.tunnel, 1500),
                                    full_checksums=state.acceleration != "Disabled")
                started.append((rec, self._start_echo(rec)))
                lines.append(f"pod/{name} {'configured' if old else 'created'} ({node}, {addr})")
            self._wait_echo(started)
        finally:
            state.save(self.paths)
        self._sync_slices(state, services)
        return lines + svc_lines

    def _sync_slices(self, state: LabState, services: dict[str, KubeObject]) -> None:
        """Regenerate every Service's EndpointSlices from the pods; then write the Services themselves."""
        pods = [p.manifest for p in state.pods.values()]
        current = self._services_by_key()
        for key, svc in sorted(services.items()):
            self.cluster.replace_slices(key, cluster.endpoint_slices(svc, pods))
        for key, svc in sorted(services.items()):
            if current.get(key) != svc:
                self.cluster.write(svc)
        self._publish(state)

    def _publish(self, state: LabState) -> None:
        """With --kube, mirror the cluster objects into the emulated API (the agents read them there)."""
        if state.kube:
            from bpflb.lab import kube as kube_lab

            kube_lab.publish(self)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        src = str(Path(bpflb.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(netns.nsenter_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=self._child_env())
        self._children[proc.pid] = proc
        return proc

    def _start_echo(self, rec: PodRecord) -> subprocess.Popen[bytes]:
        ready = self.paths.pod_ready(rec.key)
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "bpflb.lab.echo", "--name", rec.name, "--ready-file", str(ready)]
        argv += [a for p in rec.tcp_ports for a in ("--http-port", str(p))]
        argv += [a for p in rec.udp_ports for a in ("--udp-port", str(p))]
        proc = self._spawn(rec.netns, argv, self.paths.pod_log(rec.key))
        rec.echo_pid = proc.pid
        return proc

    def _wait_echo(self, started: list[tuple[PodRecord, subprocess.Popen[bytes]]]) -> None:
        deadline = time.monotonic() + ECHO_START_TIMEOUT
        waiting = list(started)
        while waiting:
            for rec, proc in list(waiting):
                if self.paths.pod_ready(rec.key).exists():
                    waiting.remove((rec, proc))
                elif proc.poll() is not None:
                    log = self.paths.pod_log(rec.key)
                    raise LabError(f"echo server of pod {rec.key} exited with code {proc.returncode}; "
                                   f"last lines of {log}:\n{log_tail(log)}")
            if waiting and time.monotonic() > deadline:
                raise LabError(f"echo servers of {', '.join(r.key for r, _ in waiting)} did not start within "
                               f"{ECHO_START_TIMEOUT:.0f}s")
            if waiting:
                time.sleep(0.02)

    def _remove_pod_runtime(self, rec: PodRecord) -> None:
        """Stop everything in the pod's namespace and delete it (and its veth, right away)."""
        inode = netns.netns_inode(rec.netns)
        if inode is not None:
            netns.kill_pids(netns.pids_in_netns([inode]))
        node_ns = topology.ns_name(self.name, rec.node)
        if netns.netns_exists(node_ns):
            with contextlib.suppress(LabError):
                netns.ip_batch(node_ns, [f"link del {rec.veth}"])
        netns.delete_netns([rec.netns])
        self.paths.pod_ready(rec.key).unlink(missing_ok=True)

    @staticmethod
    def _pod(state: LabState, name: str) -> PodRecord:
        for rec in state.pods.values():
            if rec.key == name or rec.name == name:
                return rec
        raise LabError(f"lab {state.name} has no pod {name!r}")

    # ------------------------------------------------------------------------------------------ agents

    def _agent_template(self, kube: bool = False) -> list[str]:
        if kube and self._agent_cmd is None:
            from bpflb.lab.kube import KUBE_AGENT_CMD

            return shlex.split(KUBE_AGENT_CMD)
        template = self._agent_cmd if self._agent_cmd is not None else \
            os.environ.get(ENV_AGENT_CMD) or DEFAULT_AGENT_CMD
        return shlex.split(template) if isinstance(template, str) else list(template)

    def agent_argv(self, state: LabState, node: str) -> list[str]:
        """The agent command of one node, placeholders filled in (not yet wrapped in nsenter)."""
        values = {"python": sys.executable, "node": node, "source_dir": str(self.paths.cluster),
                  "pin_root": str(self.pin_root / node), "device": topology.DEVICE, "lab": self.name,
                  "netns": topology.ns_name(self.name, node), "mode": state.mode,
                  "log": str(self.paths.agent_log(node)), "kubeconfig": str(self.paths.root / "kubeconfig")}
        try:
            return [token.format(**values) for token in (state.agent_cmd or self._agent_template())]
        except (KeyError, IndexError, ValueError) as exc:
            raise LabError(f"agent command template: bad placeholder {exc} (known: "
                           f"{', '.join('{' + k + '}' for k in values)}; write {{{{ }}}} for literal braces)") from exc

    def _start_agents(self, state: LabState) -> None:
        if self.pin_root.is_relative_to(BPFFS) and not bpffs_mounted():
            netns.run(["mount", "-t", "bpf", "bpf", str(BPFFS)])
            self._log(f"mounted bpffs at {BPFFS}")
        if self.pin_root.exists():
            shutil.rmtree(self.pin_root)
        self.pin_root.mkdir(parents=True)
        for k in range(1, state.nodes + 1):
            node = topology.node_name(k)
            argv = self.agent_argv(state, node)
            proc = self._spawn(topology.ns_name(self.name, node), argv, self.paths.agent_log(node))
            state.agent_pids[node] = proc.pid
            self._log(f"agent {node}: pid {proc.pid}, log {self.paths.agent_log(node)}")
        state.save(self.paths)

    def _wait_agents(self, state: LabState, timeout: float) -> None:
        start = time.monotonic()
        waiting = dict(sorted(state.agent_pids.items()))
        self._log(f"waiting up to {timeout:.0f}s for {len(waiting)} agent(s) to write <pin-root>/ready")
        last_note = start
        while waiting:
            for node, pid in list(waiting.items()):
                log = self.paths.agent_log(node)
                if os.path.lexists(self.pin_root / node / "ready"):
                    del waiting[node]
                    self._log(f"agent {node} ready ({time.monotonic() - start:.1f}s)")
                    continue
                proc = self._children.get(pid)
                code = proc.poll() if proc else (None if _pid_alive(pid) else "?")
                if code is not None:
                    raise LabError(f"agent on {node} exited (code {code}) before it was ready; "
                                   f"last lines of {log}:\n{log_tail(log)}")
            now = time.monotonic()
            if waiting and now - start > timeout:
                tails = "\n".join(f"  {n}: {self.paths.agent_log(n)}\n{log_tail(self.paths.agent_log(n), 10)}"
                                  for n in waiting)
                raise LabError(f"agents {', '.join(waiting)} not ready after {timeout:.0f}s:\n{tails}")
            if waiting and now - last_note >= 5:
                self._log(f"still waiting for {', '.join(waiting)} ({now - start:.0f}s/{timeout:.0f}s)")
                last_note = now
            if waiting:
                time.sleep(0.05)

    def restart_agent(self, node: str, timeout: float = 30.0) -> None:
        """Stop a node's agent (SIGTERM: programs stay attached, maps stay pinned) and start it again;
        returns once the new one has synced (it re-attaches its programs on the pinned maps)."""
        state = self.state()
        old = state.agent_pids.get(node)
        if old is None:
            raise LabError(f"lab {self.name} runs no agent on {node}")
        proc = self._children.get(old)
        try:
            os.kill(old, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.wait(timeout=10)
        else:
            deadline = time.monotonic() + 10
            while _pid_alive(old) and time.monotonic() < deadline:
                time.sleep(0.05)
        marker = self.pin_root / node / "ready"
        if os.path.lexists(marker):
            marker.unlink()     # the old agent's; wait for the new one's
        new = self._spawn(topology.ns_name(self.name, node), self.agent_argv(state, node),
                          self.paths.agent_log(node))
        state.agent_pids[node] = new.pid
        state.save(self.paths)
        self._log(f"agent {node}: restarted as pid {new.pid}")
        deadline = time.monotonic() + timeout
        while not os.path.lexists(self.pin_root / node / "ready"):
            if new.poll() is not None:
                raise LabError(f"agent on {node} exited (code {new.returncode}) after restart; last lines of "
                               f"{self.paths.agent_log(node)}:\n{log_tail(self.paths.agent_log(node))}")
            if time.monotonic() > deadline:
                raise LabError(f"agent on {node} not ready {timeout:.0f}s after restart")
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------ traffic

    def exec(self, host: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = None,
             check: bool = False, stdin: IO[Any] | int | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside a host's namespace (nsenter; /sys and bpffs stay the root namespace's)."""
        return subprocess.run(netns.nsenter_argv(self.netns(host), argv), capture_output=capture, text=True,
                              timeout=timeout, check=check, stdin=stdin)

    def run_in(self, host: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """fn(*args) in a forked child inside the host's namespace; its result pickled back."""
        return netns.run_in_netns(self.netns(host), fn, *args, timeout=timeout)

    def probe(self, host: str, probes: Sequence[Probe], *, parallel: int = 32) -> list[ProbeResult]:
        """Run probes from host (one process for all of them, up to `parallel` at once)."""
        if not probes:
            return []
        longest = max(p.timeout for p in probes) * max(
            len(p.paths) if isinstance(p, HttpProbe) else len(p.messages) for p in probes) + 1
        rounds = -(-len(probes) // max(1, parallel))
        return self.run_in(host, probe.run_probes, list(probes), parallel, timeout=longest * rounds + 10)

    def http_get(self, host: str, url: str, timeout: float = 1.0) -> tuple[str | None, str | None]:
        """GET url from host on a new connection: (body, None), or (None, error) e.g. "connection refused"."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if not parts.hostname:
            raise LabError(f"URL {url!r} has no host")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        [result] = self.probe(host, [HttpProbe(parts.hostname, parts.port or 80, (path,), timeout)])
        return (result.replies[0], None) if result.ok else (None, result.error)

    def http_session(self, host: str, addr: str, port: int, paths: Sequence[str],
                     timeout: float = 1.0) -> ProbeResult:
        """Several GETs on one kept-alive TCP connection (replies in order; result.local is the source)."""
        [result] = self.probe(host, [HttpProbe(addr, port, tuple(paths), timeout)])
        return result

    def udp_request(self, host: str, addr: str, port: int, message: str = "hostname",
                    timeout: float = 1.0) -> tuple[str | None, str | None]:
        """One datagram from host, one reply: (reply, None) or (None, error)."""
        [result] = self.probe(host, [UdpProbe(addr, port, (message,), timeout)])
        return (result.replies[0], None) if result.ok else (None, result.error)

    def connections(self, host: str, addr: str, port: int, count: int, *, proto: str = "TCP",
                    request: str | None = None, timeout: float = 1.0, parallel: int = 1) -> list[ProbeResult]:
        """count new connections (TCP: GET request, default /hostname; UDP: a new socket sending request,
        default "hostname") from host, all from one process; results in order."""
        probes: list[Probe]
        if proto.upper() == "TCP":
            probes = [HttpProbe(addr, port, (request or "/hostname",), timeout) for _ in range(count)]
        else:
            probes = [UdpProbe(addr, port, (request or "hostname",), timeout) for _ in range(count)]
        return self.probe(host, probes, parallel=parallel)

    def ping(self, host: str, addr: str, timeout: float = 1.0) -> float | None:
        """ICMP echo from host to addr: round-trip seconds, or None."""
        return self.run_in(host, probe.ping, addr, timeout, timeout=timeout + 10)

    def check(self, timeout: float = 1.0) -> CheckReport:
        """Probe every NodePort / LoadBalancer / externalIP frontend from the client against the expected
        behaviour of the lab's mode."""
        state = self.state()
        start = time.monotonic()
        scenarios = plan(self.services(), self.endpoint_slices(), state.nodes, Mode.parse(state.mode), timeout)
        probes = [p for sc in scenarios for p in sc.probes]
        results = self.probe("client", probes, parallel=64)
        return CheckReport(self.name, state.mode, evaluate(scenarios, results), time.monotonic() - start)
