"""The Lab: a Kubernetes-like cluster of network namespaces on this machine (each node's processes and pods
in a cgroup of the node's own), its workload and agents, and the Python API the CLI and the tests drive it
through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args

from bpflb.model.settings import AccelerationName, AlgorithmName, ModeName, TunnelName
from bpflb.model.types import Mode
from bpflb_lab.lab import cgroups, cluster, netns, topology
from bpflb_lab.lab.cluster import ClusterDir
from bpflb_lab.lab.errors import LabError, LabUnsupported
from bpflb_lab.lab.state import DEFAULT_PIN_BASE, DEFAULT_STATE_ROOT, LabPaths, LabState
from bpflb_lab.lab.supervise import DEFAULT_AGENT_CMD, ENV_AGENT_CMD, Supervision, _pid_alive, bpffs_mounted
from bpflb_lab.lab.traffic import Traffic
from bpflb_lab.lab.workload import Workloads, default_manifests

T = TypeVar("T")
__all__ = ["DEFAULT_AGENT_CMD", "DEFAULT_NAME", "ENV_AGENT_CMD", "DownReport", "Lab", "bpffs_mounted",
           "default_manifests"]

DEFAULT_NAME = "bpflb"
SUPPORTED_MODES: tuple[str, ...] = get_args(ModeName)          # the one schema's choices
ALGORITHMS: tuple[str, ...] = get_args(AlgorithmName)
SUPPORTED_TUNNELS: tuple[str, ...] = get_args(TunnelName)
TUNNELS = SUPPORTED_TUNNELS
ECHO_START_TIMEOUT = 15.0
BPFFS = Path("/sys/fs/bpf")


def canonical_mode(text: str) -> str:
    """SNAT / DSR / Hybrid in their ModuleConfig spelling, whatever the case given."""
    for mode in Mode:
        if mode.label.lower() == text.lower():
            return mode.label
    raise LabError(f"--mode {text}: must be one of SNAT, DSR, Hybrid")


ACCELERATIONS: tuple[str, ...] = get_args(AccelerationName)


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


@dataclass
class DownReport:
    """What `down` removed."""

    namespaces: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)   # directories


class Lab(Workloads, Supervision, Traffic):
    """One lab, identified by its name (the prefix of its namespaces).

    agent_cmd is the agent command template (a string split like a shell would, or a list of tokens) with
    placeholders {python} {node} {source_dir} {pin_root} {device} {lab} {netns} {mode} {log} {cgroup_root};
    default:
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
        made = cgroups.create(self.name, [topology.node_name(k) for k in range(1, nodes + 1)])
        self._log(f"cgroups {made[0].parent}/node1..node{nodes}: each node's agent, pods and `lab exec` "
                  "processes (its socket LB's attach point)")
        crossing = "native routing" if tunnel == "Disabled" else "VXLAN overlay (built by the agents)"
        self._log(f"fabric {topology.FABRIC_NET}: client {topology.CLIENT_IP}, nodes "
                  f"{topology.node_ip(1)}..{topology.node_ip(nodes)}; pod CIDRs 10.244.K.0/24, {crossing}")
        for k in range(1, nodes + 1):
            self.cluster.write(cluster.node_object(k))
        self.cluster.write(cluster.agent_config(mode, algorithm, tunnel, acceleration, state.settings))
        if acceleration != "Disabled":
            topology.prepare_for_xdp(self.name, nodes)
        if kube:
            from bpflb_lab.lab import kube as kube_lab

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
            self.cluster.write(cluster.agent_config(mode, state.algorithm, state.tunnel, state.acceleration,
                                                    state.settings))
            if state.kube:          # the operator's way: the ModuleConfig, through the API
                from bpflb_lab.lab import kube as kube_lab

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

    # Settings `lab up` and `lab mode` own: not for set_settings.
    OWN_SETTINGS = ("bpfLBMode", "tunnelMode", "lbAlgorithm", "xdpAcceleration")

    def set_settings(self, **settings: Any) -> list[str]:
        """Change other cni-cilium settings of the running lab (svcSourceRangeCheck=True, ...) the way the
        operator does: validated by the one schema, written to the agents' ConfigMap (with --kube: patched into
        the ModuleConfig). The agents apply them at their next sync; returns "key=value" lines."""
        from pydantic import ValidationError

        state = self.state()
        own = [k for k in settings if k in self.OWN_SETTINGS]
        if own:
            raise LabError(f"{', '.join(own)}: set with `bpflb lab up` or `bpflb lab mode`, not `lab set`")
        merged = {**state.settings, **settings}
        try:
            cluster.lab_settings(state.mode, state.algorithm, state.tunnel, state.acceleration, merged)
        except ValidationError as exc:
            raise LabError("; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())) \
                from None
        with self.paths.locked():
            self.cluster.write(cluster.agent_config(state.mode, state.algorithm, state.tunnel, state.acceleration,
                                                    merged))
            if state.kube:
                from bpflb_lab.lab import kube as kube_lab

                kube_lab.set_settings(self, settings)
            state.settings = merged
            state.save(self.paths)
        return [f"{k}={v}" for k, v in settings.items()]

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
        top = cgroups.lab_cgroup(self.name) if cgroups.available() else None
        had_cgroups = top is not None and top.exists()
        cgroups_left = cgroups.remove(self.name)
        if had_cgroups and not cgroups_left:
            report.removed.append(str(top))
        for d in (self.paths.root, self.pin_root):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
                report.removed.append(str(d))
            with contextlib.suppress(OSError):      # the labs' common parent, once no lab is left in it
                d.parent.rmdir()
        problems = []
        if survivors:
            problems.append(f"processes {survivors} did not stop")
        if stuck:
            problems.append(f"namespaces {stuck} could not be deleted")
        if cgroups_left:
            problems.append(f"cgroups {cgroups_left} could not be removed")
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
            from bpflb_lab.lab import kube as kube_lab

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

    def cgroup(self, host: str) -> Path | None:
        """The cgroup a host's processes run in: its node's for a node or a pod, None for the others."""
        if topology.node_index(host):
            return cgroups.node_cgroup(self.name, host)
        if host in ("fabric", "client", "control-plane") or topology.lab_netns_regex(self.name).match(host):
            return None
        pods = [p for p in self.state().pods.values() if p.key == host or p.name == host]
        return cgroups.node_cgroup(self.name, pods[0].node) if len(pods) == 1 else None

    def node_ip(self, k: int) -> str:
        return str(topology.node_ip(k))

    def add_route(self, host: str, dst: str, via: str) -> None:
        """A route on a lab host, e.g. the client to a pod CIDR via a node (as a cloud router routes pod
        CIDRs to their nodes).  Lab namespaces only: host names resolve to this lab's namespaces."""
        netns.ip_batch(self.netns(host), [f"route replace {dst} via {via}"])

    def delete_route(self, host: str, dst: str) -> None:
        """Remove a route add_route made; one already gone is no error."""
        with contextlib.suppress(LabError):
            netns.ip_batch(self.netns(host), [f"route del {dst}"])

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
                "clusterIP": spec.get("clusterIP"), "clusterIPs": spec.get("clusterIPs") or [],
                "internalTrafficPolicy": spec.get("internalTrafficPolicy"),
                "ports": [{k: p[k] for k in ("name", "protocol", "port", "targetPort", "nodePort") if k in p}
                          for p in spec.get("ports") or []],
                "loadBalancerIPs": [i.get("ip") for i in ((svc.get("status") or {}).get("loadBalancer") or {})
                                    .get("ingress") or []],
                "externalIPs": spec.get("externalIPs") or [],
                **({"healthCheckNodePort": spec["healthCheckNodePort"]} if spec.get("healthCheckNodePort") else {}),
                "endpoints": endpoints,
            })
        return {"name": self.name, "mode": state.mode, "tunnel": state.tunnel, "nodes": state.nodes,
                "phase": state.phase, "agents_enabled": state.agents, "state_dir": str(self.paths.root),
                "cluster_dir": str(self.paths.cluster), "pin_root": str(self.pin_root),
                "hosts": hosts, "agents": agents, "pods": pods, "services": services,
                **({"kube": self._kube_status()} if state.kube else {})}

    def _kube_status(self) -> dict[str, str]:
        from bpflb_lab.lab import kube as kube_lab

        return kube_lab.status(self)
