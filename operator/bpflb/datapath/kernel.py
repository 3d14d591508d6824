"""The kernel's datapath: bpf_lb.o (and bpf_xdp.o) loaded through libbpf with maps pinned under the pin
root, tc programs on the external device (and the VXLAN device), the XDP fast path, the node's overlay in
netlink, the neighbour hygiene of the node's bridges (datapath.neighbours). What `bpflb agent` runs."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from bpflb.datapath.base import MapsDatapath, NodeProgram, ProgramReport
from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.lbmaps import LBMaps
from bpflb.datapath.loader import (
    BpfObject,
    load_lb,
    load_xdp,
    remove_pins,
    tc_attach,
    tc_detach,
    xdp_attach,
    xdp_detach,
)
from bpflb.datapath.neighbours import NeighbourHygiene
from bpflb.datapath.overlay import VXLAN_DEV, Overlay
from bpflb.model.cluster import Tunnel
from bpflb.model.types import Mode

log = logging.getLogger("bpflb.agent")


class KernelDatapath(MapsDatapath):
    """One node's real datapath, its maps pinned under pin_root so they outlive the agent."""

    def __init__(self, pin_root: Path) -> None:
        super().__init__()
        self.pin_root = pin_root
        self.obj: BpfObject | None = None
        self.xdp_obj: BpfObject | None = None
        self.overlay: Overlay | None = None
        self.tunnel_ifindex = 0
        self.acceleration: str | None = None      # what this process last applied
        self.neighbours: NeighbourHygiene | None = None   # running while this process has the programs attached

    def load(self) -> Mode | None:
        self.obj = load_lb(self.pin_root)
        self.maps = LBMaps(self.obj)
        self.cluster = ClusterMaps(self.obj)
        log.info("loaded %s with maps pinned under %s", self.obj.path, self.pin_root)
        return self.maps.mode()

    def attach(self, device: str) -> None:
        assert self.obj is not None, "attach() before load()"
        self.ifindex = socket.if_nametoindex(device)
        tc_attach(self.obj.prog_fd("lb_ingress"), self.ifindex, ingress=True)
        tc_attach(self.obj.prog_fd("lb_egress"), self.ifindex, ingress=False)
        self.overlay = Overlay(device)
        self.device = device
        log.info("attached lb_ingress and lb_egress to %s (ifindex %d) with tc clsact", device, self.ifindex)
        if self.neighbours is None:
            self.neighbours = NeighbourHygiene()
            self.neighbours.start()
            log.info("watching the node's bridges: a MAC that leaves one has its IPv4 neighbour entries forgotten "
                     "(a replaced pod keeping its address is resolved again, without waiting for ARP timers)")

    def close(self) -> None:
        if self.neighbours is not None:
            self.neighbours.stop()
            self.neighbours = None

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
        program handles them there (DSR options, SNAT replies)."""
        assert self.obj is not None and self.overlay is not None
        idx = self.overlay.vxlan_ifindex() if tunnel is Tunnel.VXLAN else None
        if idx and idx != self.tunnel_ifindex:
            tc_attach(self.obj.prog_fd("lb_ingress"), idx, ingress=True)
            log.info("attached lb_ingress to %s (ifindex %d)", VXLAN_DEV, idx)
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
        except OSError as exc:
            report.problems.append(f"xdpAcceleration {acceleration}: cannot attach XDP to ifindex {self.ifindex}: "
                                   f"{exc}; tc keeps handling all traffic")
            return
        log.info("xdpAcceleration %s: XDP program attached in %s mode; remote-backend flows and SNAT "
                 "replies are forwarded at XDP, everything else by tc", acceleration, report.acceleration)
        self.acceleration = acceleration

    def uninstall(self, device: str | None) -> None:
        self.close()
        if device:
            idx = socket.if_nametoindex(device)
            if xdp_detach(idx):
                log.info("detached the XDP program from %s", device)
            for ingress in (True, False):
                if tc_detach(idx, ingress=ingress):
                    log.info("detached %s program from %s", "ingress" if ingress else "egress", device)
        for action in Overlay(device or "eth0").remove():
            log.info("%s", action)
        for obj in (self.xdp_obj, self.obj):
            if obj is not None:
                obj.close()
        self.obj = self.xdp_obj = None
        self.maps = self.cluster = None
        self.device, self.ifindex, self.tunnel_ifindex, self.acceleration = None, 0, 0, None
        remove_pins(self.pin_root)
        log.info("removed pinned maps under %s", self.pin_root)
