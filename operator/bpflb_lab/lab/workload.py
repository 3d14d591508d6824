"""The lab's workload: applying Pods and Services (validated as the API server would), deleting them, the
pods' namespaces and echo servers, and the EndpointSlices regenerated from the pods (the lab is the endpoint
controller); with --kube everything is then published into the emulated API."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterable
from importlib import resources
from ipaddress import IPv4Address
from pathlib import Path

from bpflb_lab.lab import cluster, netns, topology
from bpflb_lab.lab.cluster import ClusterDir, KubeObject
from bpflb_lab.lab.errors import LabError
from bpflb_lab.lab.parts import LabParts
from bpflb_lab.lab.state import LabState, PodRecord


def default_manifests() -> str:
    """The default workload shipped with the package (manifests/default.yaml)."""
    return resources.files("bpflb_lab.lab").joinpath("manifests/default.yaml").read_text()


class Workloads(LabParts):
    """Pods and Services of a lab (mixed into lab.core.Lab)."""

    def pods(self) -> list[PodRecord]:
        return sorted(self.state().pods.values(), key=lambda p: p.key)

    def services(self) -> list[KubeObject]:
        return sorted(self.cluster.objects("Service"), key=cluster.object_key)

    def endpoint_slices(self) -> list[KubeObject]:
        return self.cluster.objects("EndpointSlice")

    def pod_ip(self, name: str) -> str:
        return self._pod(self.state(), name).ip

    def apply(self, source: str | Path | Iterable[KubeObject]) -> list[str]:
        """Apply Pods, Services and EndpointSlices (a YAML file path, YAML text, or parsed objects); return
        kubectl-like lines ("pod/echo-c created (node1, 10.244.1.10)"). The lab's EndpointSlices are regenerated
        from the Pods; an EndpointSlice applied is the user's (a selector-less Service's endpoints, any number
        of them, with no Pods behind)."""
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
        """Delete a Pod (its namespace and echo server go), a Service (and its slices) or an EndpointSlice of
        the user's."""
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
                for eps in self.endpoint_slices():       # the user's slices of a selector-less Service too
                    meta = eps.get("metadata") or {}
                    if meta.get("namespace", "default") == namespace and \
                            (meta.get("labels") or {}).get(cluster.SERVICE_NAME_LABEL) == name:
                        self.cluster.remove(eps)
                self.cluster.remove(svc)
                self._publish(state)
                return f"service/{name} deleted"
            if kind.lower() == "endpointslice":
                mine = [o for o in self.endpoint_slices() if cluster.object_key(o) == key]
                if not mine:
                    raise LabError(f"endpointslice {key} does not exist")
                if ((mine[0].get("metadata") or {}).get("labels") or {}).get(cluster.MANAGED_BY_LABEL) == \
                        cluster.MANAGED_BY:
                    raise LabError(f"endpointslice {key} is the lab's own (its Service's selector makes it)")
                self.cluster.remove(mine[0])
                self._publish(state)
                return f"endpointslice.discovery.k8s.io/{name} deleted"
        raise LabError(f"cannot delete kind {kind!r}: pod, service or endpointslice")

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
        user_slices = [cluster.validate_endpoint_slice(d) for d in docs if d["kind"] == "EndpointSlice"]
        managed = {cluster.object_key(o) for o in self.endpoint_slices()
                   if ((o.get("metadata") or {}).get("labels") or {}).get(cluster.MANAGED_BY_LABEL) == cluster.MANAGED_BY}
        for one in user_slices:
            if cluster.object_key(one) in managed:
                raise LabError(f"{cluster.describe(one)}: the lab's own slice of that name exists; choose another name")

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
                addr = self._pod_address(manifest, k, used)
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
        slice_lines = []
        known = {cluster.object_key(o) for o in self.endpoint_slices()}
        for one in user_slices:
            self.cluster.write(one)
            verb = "configured" if cluster.object_key(one) in known else "created"
            slice_lines.append(f"endpointslice.discovery.k8s.io/{one['metadata']['name']} {verb}")
        self._sync_slices(state, services)
        return lines + svc_lines + slice_lines

    @staticmethod
    def _pod_address(manifest: KubeObject, k: int, used: set[str]) -> str:
        """The pod's address: the one its manifest's status.podIP asks for (the lab's way to place a pod, e.g.
        the client pod), else the node's first free one."""
        asked = (manifest.get("status") or {}).get("podIP")
        if asked is None:
            return next(str(topology.pod_ip(k, i)) for i in range(256) if str(topology.pod_ip(k, i)) not in used)
        where = f"{cluster.describe(manifest)}: status.podIP {asked!r}"
        try:
            addr = IPv4Address(asked)
        except ValueError as exc:
            raise LabError(f"{where}: {exc}") from exc
        cidr = topology.pod_cidr(k)
        if addr not in cidr or int(addr) - int(cidr.network_address) < topology.POD_FIRST or addr == cidr.broadcast_address:
            raise LabError(f"{where}: must be in {cidr}, from .{topology.POD_FIRST} on")
        if str(addr) in used:
            raise LabError(f"{where}: already used by another pod of node{k}")
        return str(addr)

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
        self.cluster_store(state).publish()

    def cluster_store(self, state: LabState) -> ClusterDir:
        """Where the agents read the cluster: the files (ClusterDir), or the emulated API (kube.ApiCluster)."""
        if state.kube:
            from bpflb_lab.lab.kube import ApiCluster

            return ApiCluster(self.paths.cluster, self.name)
        return self.cluster

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
