"""The kernel's datapath: bpf_lb.o (and bpf_xdp.o, bpf_sock.o) loaded through libbpf with maps pinned under
the pin root, tc programs on the external device (and the VXLAN device), the XDP fast path, the node's
overlay in netlink, the neighbour hygiene of the node's bridges (datapath.neighbours) and of its peer nodes
(datapath.nodeneigh), the socket LB on the node's cgroup and the pod-facing path on its pods' veths. What
`bpflb agent` runs."""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Network
from pathlib import Path

from bpflb.datapath.base import MapFill, MapsDatapath, NodeProgram, ProgramReport
from bpflb.datapath.cgroup import attach_cgroup, default_cgroup_root, detach_cgroup
from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.conntrack import Collector, GcReport, open_dsr_gate
from bpflb.datapath.eastwest import EastWestMaps
from bpflb.datapath.fill import kernel_fill
from bpflb.datapath.lbmaps import LBMaps
from bpflb.datapath.libbpf import BpfError
from bpflb.datapath.loader import (
    MAP_TYPES,
    BpfObject,
    Map,
    load_lb,
    load_sock,
    load_xdp,
    remove_pins,
    tc_attach,
    tc_detach,
    xdp_attach,
    xdp_detach,
)
from bpflb.datapath.neighbours import NeighbourHygiene
from bpflb.datapath.nodeneigh import DEFAULT_REFRESH, NodeNeighbours
from bpflb.datapath.overlay import VXLAN_DEV, Overlay
from bpflb.datapath.pods import LinkWatch, pod_devices, veth_devices
from bpflb.model.cluster import Tunnel
from bpflb.model.types import Mode

log = logging.getLogger("bpflb.agent")


class KernelDatapath(MapsDatapath):
    """One node's real datapath, its maps pinned under pin_root so they outlive the agent."""

    def __init__(self, pin_root: Path, cgroup_root: Path | None = None, mount_bpffs: bool = False,
                 node_neigh_refresh: float = DEFAULT_REFRESH) -> None:
        super().__init__()
        self.pin_root = pin_root
        self.cgroup_root = cgroup_root              # None: this mount namespace's cgroup v2 root
        self.mount_bpffs = mount_bpffs
        self.obj: BpfObject | None = None
        self.xdp_obj: BpfObject | None = None
        self.sock_obj: BpfObject | None = None
        self.overlay: Overlay | None = None
        self.tunnel_ifindex = 0
        self.acceleration: str | None = None      # what this process last applied
        self.neighbours: NeighbourHygiene | None = None   # running while this process has the programs attached
        self.node_neighbours = NodeNeighbours(node_neigh_refresh)   # peer nodes' entries verified (0: off)
        self._node_neighbours_said = False
        self.sock_cgroup: Path | None = None      # where this process attached the socket LB
        self.pod_path: dict[int, str] = {}        # pod veths this process gave the pod-facing path
        self.pod_cidrs: tuple[IPv4Network, ...] = ()
        self.watch: LinkWatch | None = None

    @property
    def links_dir(self) -> Path:
        """The socket LB's pinned cgroup links: they outlive the agent, as the maps do."""
        return self.pin_root / "links"

    def load(self) -> Mode | None:
        self.obj = load_lb(self.pin_root, mount_bpffs=self.mount_bpffs)
        self.maps = LBMaps(self.obj)
        open_dsr_gate(self.maps.dsr_mapped)     # a previous agent's datapath may have remapped DSR flows
        self.cluster = ClusterMaps(self.obj)
        self.east_west = EastWestMaps(self.obj)
        log.info("loaded %s with maps pinned under %s", self.obj.path, self.pin_root)
        return self.maps.mode()

    def attach(self, device: str) -> None:
        assert self.obj is not None, "attach() before load()"
        self.ifindex = socket.if_nametoindex(device)
        tc_attach(self.obj.prog_fd("lb_ingress"), self.ifindex, ingress=True)
        tc_attach(self.obj.prog_fd("lb_egress"), self.ifindex, ingress=False)
        self.overlay = Overlay(device)
        self.device = device
        if self.watch is None:          # before the first scan: no veth wired meanwhile is missed
            self.watch = LinkWatch()
        log.info("attached lb_ingress and lb_egress to %s (ifindex %d) with tc clsact", device, self.ifindex)
        if self.neighbours is None:
            self.neighbours = NeighbourHygiene()
            self.neighbours.start()
            log.info("watching the node's bridges: a MAC that leaves one has its IPv4 neighbour entries forgotten "
                     "(a replaced pod keeping its address is resolved again, without waiting for ARP timers)")
        if self.node_neighbours.refresher is None:
            self.node_neighbours.start()
        if self.node_neighbours.refresher is not None and not self._node_neighbours_said:
            self._node_neighbours_said = True
            log.info("verifying the on-link peer nodes' neighbour entries every %gs (a unicast ARP request to the MAC "
                     "each holds, a broadcast one when it is not confirmed): a node re-created with a new MAC is "
                     "reached again without waiting for ARP timers", self.node_neighbours.interval)

    def close(self) -> None:
        self.node_neighbours.stop()
        if self.neighbours is not None:
            self.neighbours.stop()
            self.neighbours = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def program(self, want: NodeProgram) -> ProgramReport:
        report = super().program(want)
        self.node_neighbours.set_peers(n.addr for n in want.nodes if want.me is None or n.name != want.me.name)
        # The new programs are attached (tc by attach(), XDP and the socket LB by this sync): the maps of a
        # previous version being taken over get the entries its programs made meanwhile, and are unpinned.
        for obj in (self.obj, self.xdp_obj, self.sock_obj):
            if obj is not None and obj.migrations:
                obj.finish_migrations()
        return report

    def _network(self, want: NodeProgram) -> list[str]:
        if want.me is None or self.overlay is None:
            return []
        actions = self.overlay.apply(want.network, want.me, [n for n in want.nodes if n.name != want.me.name])
        # The device's ifindex only changes when the overlay does: no netlink round trip per sync.
        if actions or bool(self.tunnel_ifindex) != (want.network.tunnel is Tunnel.VXLAN):
            self._attach_tunnel(want.network.tunnel)
        return actions

    def _attach_tunnel(self, tunnel: Tunnel) -> None:
        """Requests and replies that crossed the overlay arrive on the VXLAN device: the same ingress
        program handles them there (DSR options, SNAT replies).  The node's own connections to other nodes'
        pods leave through it: lb_overlay_egress moves them off ports SNAT'd flows hold."""
        assert self.obj is not None and self.overlay is not None
        idx = self.overlay.vxlan_ifindex() if tunnel is Tunnel.VXLAN else None
        if idx and idx != self.tunnel_ifindex:
            tc_attach(self.obj.prog_fd("lb_ingress"), idx, ingress=True)
            tc_attach(self.obj.prog_fd("lb_overlay_egress"), idx, ingress=False)
            log.info("attached lb_ingress and lb_overlay_egress to %s (ifindex %d)", VXLAN_DEV, idx)
        self.tunnel_ifindex = idx or 0

    def _accelerate(self, acceleration: str, report: ProgramReport) -> None:
        if acceleration == self.acceleration:
            return
        if acceleration == "Disabled":
            if xdp_detach(self.ifindex):
                log.info("xdpAcceleration Disabled: detached the XDP program; tc handles everything")
            if self.xdp_obj is not None:
                self.xdp_obj.close()
                self.xdp_obj = None
            self.acceleration = acceleration
            return
        try:
            if self.xdp_obj is None:
                self.xdp_obj = load_xdp(self.pin_root)
            report.acceleration = xdp_attach(self.xdp_obj.prog_fd("xdp_lb_prog"), self.ifindex, acceleration)
            self.xdp_obj.finish_migrations()
        except OSError as exc:
            report.problems.append(f"xdpAcceleration {acceleration}: cannot attach XDP to ifindex {self.ifindex}: "
                                   f"{exc}; tc keeps handling all traffic")
            return
        log.info("xdpAcceleration %s: XDP program attached in %s mode; remote-backend flows and SNAT "
                 "replies are forwarded at XDP, everything else by tc", acceleration, report.acceleration)
        self.acceleration = acceleration

    def node_neighbour_counts(self) -> dict[str, int]:
        return self.node_neighbours.counts()

    def collect_conntrack(self) -> GcReport | None:
        maps = self.maps
        if maps is None:
            return None
        return Collector(maps.ct_fwd, maps.ct_rev, maps.config, maps.dsr_mapped).collect()

    def open_maps(self) -> list[Map]:
        """Every map of the loaded object that bpflb knows (MAP_TYPES): those its programs write too."""
        if self.obj is None:
            return []
        obj = self.obj
        return [obj.map(name) for name in sorted(MAP_TYPES) if obj.has_map(name)]

    def _fill(self, m: Map) -> MapFill | None:
        return kernel_fill(m)

    # -- in-cluster traffic: the socket LB on the node's cgroup, the pod-facing path on its pods' veths ---

    def _in_cluster(self, want: NodeProgram, report: ProgramReport) -> None:
        self._socket_lb(want.socket_lb, report)
        self.pod_cidrs = want.me.pod_cidrs if want.me else ()
        report.in_cluster_actions += self._attach_pods()

    def _socket_lb(self, on: bool, report: ProgramReport) -> None:
        if not on:
            if self.sock_cgroup is not None or self.links_dir.exists():
                where = self.sock_cgroup or "of an earlier agent"
                if detach_cgroup(self.links_dir):
                    report.in_cluster_actions.append(
                        f"socketLB false: the socket LB is detached from cgroup {where}; connections to Services "
                        "leave as addressed (the pods' veths, or kube-proxy's rules, translate them)")
                self.sock_cgroup = None
            if self.sock_obj is not None:
                self.sock_obj.close()
                self.sock_obj = None
            return
        if self.sock_cgroup is not None:
            return
        cgroup = self.cgroup_root or default_cgroup_root()
        if cgroup is None:
            report.problems.append("socket LB: no cgroup v2 hierarchy is mounted (pass --cgroup-root); in-cluster "
                                   "connections of pods go through the pod-facing path only, the node's own are "
                                   "not translated")
            return
        try:
            if self.sock_obj is None:
                self.sock_obj = load_sock(self.pin_root)
            attach_cgroup(self.sock_obj, cgroup, pin_dir=self.links_dir).close()   # pinned: stays attached
        except (BpfError, OSError) as exc:
            report.problems.append(f"socket LB: cannot attach to cgroup {cgroup}: {exc}; in-cluster connections "
                                   "of pods go through the pod-facing path only")
            return
        self.sock_cgroup = cgroup
        report.in_cluster_actions.append(
            f"socket LB attached to cgroup {cgroup} (connect4, sendmsg4, recvmsg4, getpeername4; links pinned "
            f"in {self.links_dir})")

    def _attach_pods(self) -> list[str]:
        """lb_pod_ingress and lb_pod_egress on every pod veth that lacks them (this process's programs)."""
        assert self.obj is not None
        found = pod_devices(self.pod_cidrs, exclude={self.ifindex, self.tunnel_ifindex})
        added: list[str] = []
        for idx, name in found.items():
            if self.pod_path.get(idx) == name:
                continue
            try:
                tc_attach(self.obj.prog_fd("lb_pod_ingress"), idx, ingress=True)
                tc_attach(self.obj.prog_fd("lb_pod_egress"), idx, ingress=False)
            except BpfError as exc:          # the pod went away meanwhile: its device with it
                log.debug("pod path: %s (ifindex %d) not attached: %s", name, idx, exc)
                continue
            self.pod_path[idx] = name
            added.append(name)
        for idx in [i for i in self.pod_path if i not in found]:
            del self.pod_path[idx]
        if not added:
            return []
        return [(f"pod path (lb_pod_ingress, lb_pod_egress) attached to {len(added)} pod veth(s): "
                f"{', '.join(added)}; {len(self.pod_path)} in all")]

    def refresh_pods(self) -> list[str]:
        if self.obj is None or self.watch is None or not self.watch.changed():
            return []
        return self._attach_pods()

    def uninstall(self, device: str | None) -> None:
        self.close()
        if detach_cgroup(self.links_dir):
            log.info("detached the socket LB from its cgroup")
        for idx, name in veth_devices(exclude={device} if device else set()).items():   # every pod's, past ones too
            if tc_detach(idx, ingress=True) | tc_detach(idx, ingress=False):
                log.info("detached the pod path from %s", name)
        self.sock_cgroup, self.pod_path = None, {}
        if device:
            idx = socket.if_nametoindex(device)
            if xdp_detach(idx):
                log.info("detached the XDP program from %s", device)
            for ingress in (True, False):
                if tc_detach(idx, ingress=ingress):
                    log.info("detached %s program from %s", "ingress" if ingress else "egress", device)
        for action in Overlay(device or "eth0").remove():
            log.info("%s", action)
        for obj in (self.sock_obj, self.xdp_obj, self.obj):
            if obj is not None:
                obj.close()
        self.obj = self.xdp_obj = self.sock_obj = None
        self.maps = self.cluster = self.east_west = None
        self.device, self.ifindex, self.tunnel_ifindex, self.acceleration = None, 0, 0, None
        remove_pins(self.pin_root)
        log.info("removed pinned maps under %s", self.pin_root)
