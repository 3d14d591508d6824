"""The node agent: loads the datapath, attaches it to the external device, and keeps its maps
equal to what the cluster's Services, EndpointSlices and Nodes say (source → model → datapath)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.conntrack import Collector, Schedule, describe
from bpflb.datapath.lbmaps import LBMaps, NodeConfig, SyncReport
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
from bpflb.datapath.overlay import VXLAN_DEV, Overlay
from bpflb.model.cluster import (
    Tunnel,
    cluster_prefixes,
    dsr_frontends,
    local_backends,
    node_addresses,
    nodes_info,
    parse_acceleration,
    parse_network_settings,
)
from bpflb.model.translate import translate
from bpflb.model.types import NAT_PORT_RANGE_DEFAULT, Algorithm, DesiredState, Frontend, L4Addr, Mode
from bpflb.sources.base import Source

# The agent configuration's instruction to remove the datapath (written by the operator on enabled: false).
UNINSTALL_KEY = "uninstall"

log = logging.getLogger("bpflb.agent")

# Modes the datapath implements; others would be refused (the previous mode is kept).
SUPPORTED_MODES = frozenset({Mode.SNAT, Mode.DSR, Mode.HYBRID})


@dataclass
class AgentOptions:
    node_name: str
    pin_root: Path
    device: str | None = None          # external device; default: the one holding the node's InternalIP
    resync_interval: float = 30.0      # full resync even without a change signal
    nat_port_range: tuple[int, int] = NAT_PORT_RANGE_DEFAULT   # SNAT source ports (--nat-port-range)


def device_for_address(addr: IPv4Address) -> str | None:
    """The interface (in this network namespace) that holds addr."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_ADDRESS") == str(addr):
                idx = msg["index"]
                links = ipr.get_links(idx)
                return str(links[0].get_attr("IFLA_IFNAME")) if links else None
    return None


def _describe(fe: Frontend) -> str:
    names = ", ".join(b.name for b in fe.backends) or ("reject: no endpoints" if fe.no_endpoints
                                                        else "drop: no local endpoint")
    policy = " (eTP Local)" if fe.local_only else ""
    selection = ""
    if fe.algorithm == Algorithm.MAGLEV or fe.affinity_timeout:
        selection = " " + ", ".join(filter(None, ["Maglev" if fe.algorithm == Algorithm.MAGLEV else "",
                                                  f"affinity {fe.affinity_timeout}s" if fe.affinity_timeout else ""]))
    draining = f"; draining [{', '.join(b.name for b in fe.draining)}]" if fe.draining else ""
    return f"{fe.kind.value} {fe.l4} of Service {fe.service}{policy}{selection} -> [{names}]{draining}"


class Agent:
    """One node's agent: owns the loaded object, the attachment and the map programming."""

    def __init__(self, opts: AgentOptions, source: Source,
                 on_sync: Callable[[Agent, SyncReport | None], None] | None = None) -> None:
        self.opts = opts
        self.source = source
        self.on_sync = on_sync             # called after every sync attempt of run() (node reports)
        self.uninstalled = False           # the configuration said uninstall, and it was done
        self.last_error: str | None = None  # why the last sync attempt failed, None after a good one
        self.obj: BpfObject | None = None
        self.maps: LBMaps | None = None
        self.cluster_maps: ClusterMaps | None = None
        self.overlay: Overlay | None = None
        self.tunnel_ifindex = 0
        self.xdp_obj: BpfObject | None = None
        self.acceleration: str | None = None      # what this process last applied
        self.ifindex = 0
        self.state: DesiredState | None = None
        self.mode: Mode | None = None
        self._problems_seen: set[str] = set()
        self._stop = threading.Event()
        self.gc_schedule = Schedule()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def ready_marker(self) -> Path:
        """Exists once this process has done its first sync (a symlink: bpffs holds no regular files)."""
        return self.opts.pin_root / "ready"

    def start(self) -> None:
        """Load the object (reusing pinned maps) and attach it; idempotent across restarts."""
        self.obj = load_lb(self.opts.pin_root)
        if self.ready_marker.is_symlink():
            self.ready_marker.unlink()
        self.maps = LBMaps(self.obj)
        self.cluster_maps = ClusterMaps(self.obj)
        self.mode = self.maps.mode()
        log.info("loaded %s with maps pinned under %s", self.obj.path, self.opts.pin_root)

    def attach(self, device: str) -> None:
        assert self.obj is not None
        self.ifindex = socket.if_nametoindex(device)
        tc_attach(self.obj.prog_fd("lb_ingress"), self.ifindex, ingress=True)
        tc_attach(self.obj.prog_fd("lb_egress"), self.ifindex, ingress=False)
        self.overlay = Overlay(device)
        log.info("attached lb_ingress and lb_egress to %s (ifindex %d) with tc clsact", device, self.ifindex)

    def stop(self) -> None:
        self._stop.set()

    def uninstall(self, device: str | None) -> None:
        """Detach the programs and remove the pinned maps (the operator's 'uninstall' instruction)."""
        if device:
            idx = socket.if_nametoindex(device)
            if xdp_detach(idx):
                log.info("detached the XDP program from %s", device)
            for ingress in (True, False):
                if tc_detach(idx, ingress=ingress):
                    log.info("detached %s program from %s", "ingress" if ingress else "egress", device)
        for action in Overlay(device or "eth0").remove():
            log.info("%s", action)
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        remove_pins(self.opts.pin_root)
        log.info("removed pinned maps under %s", self.opts.pin_root)

    # -- reconcile ---------------------------------------------------------------------------
    def sync_once(self) -> SyncReport | None:
        """Read the source, translate, program the maps. None when the node is not known yet, or when the
        configuration says uninstall (then the datapath is removed; it is loaded again once it no longer does)."""
        snap = self.source.snapshot()
        for text in snap.problems:
            self._problem(text)
        state = translate(snap, self.opts.node_name)
        for problem in state.problems:
            self._problem(str(problem))
        if not state.node_addrs:
            log.warning("Node %s has no IPv4 address in the source yet; not programming", self.opts.node_name)
            return None
        if str((snap.config or {}).get(UNINSTALL_KEY, "")).lower() == "true":
            self._obey_uninstall(state.node_addrs[0])
            return None
        if self.uninstalled:
            log.info("the agent configuration no longer says uninstall: loading the datapath again")
            self.start()
            self.uninstalled = False
        assert self.maps is not None
        if self.ifindex == 0:
            device = self.opts.device or device_for_address(state.node_addrs[0])
            if device is None:
                log.error("no device holds %s (Node %s InternalIP); pass --device", state.node_addrs[0],
                          self.opts.node_name)
                return None
            self.attach(device)
        mode = state.settings.mode
        if mode not in SUPPORTED_MODES:
            keep = self.mode if self.mode in SUPPORTED_MODES else Mode.SNAT
            self._problem(f"bpfLBMode {mode.label} is not implemented by this datapath yet; keeping {keep.label}")
            mode = keep
        # The pod network across nodes (VXLAN device and routes, or native routes) comes first, then
        # the cluster-wide facts: this node must accept DSR requests for every frontend, and know
        # every tunnel endpoint, before any node (itself included) starts sending them.
        network, net_problems = parse_network_settings(snap.config)
        for problem in net_problems:
            self._problem(str(problem))
        nodes = nodes_info(snap)
        me = next((n for n in nodes if n.name == self.opts.node_name), None)
        if me is not None and self.overlay is not None:
            actions = self.overlay.apply(network, me, [n for n in nodes if n.name != me.name])
            for action in actions:
                log.info("network (tunnelMode %s): %s", network.tunnel.label, action)
            # The device's ifindex only changes when the overlay does: no netlink round trip per sync.
            if actions or bool(self.tunnel_ifindex) != (network.tunnel is Tunnel.VXLAN):
                self._attach_tunnel(network.tunnel)
        assert self.cluster_maps is not None
        cluster_changes = self.cluster_maps.sync(dsr_frontends(state, node_addresses(snap)), local_backends(state),
                                                 cluster_prefixes(snap), nodes)
        if cluster_changes:
            log.info("cluster view: %d DSR frontends, %d local backend endpoints, %d cluster prefixes "
                     "(%d keys changed)", len(self.cluster_maps.dsr_frontends.keys),
                     len(self.cluster_maps.local_backends.keys), len(self.cluster_maps.cidrs.keys), cluster_changes)
        acceleration, accel_problems = parse_acceleration(snap.config)
        for problem in accel_problems:
            self._problem(str(problem))
        self._apply_acceleration(acceleration)
        report = SyncReport()
        lo, hi = self.opts.nat_port_range
        report.config_changed = self.maps.set_config(NodeConfig(
            mode=mode, snat_addr=state.node_addrs[0], ext_ifindex=self.ifindex,
            tunnel_mode=int(network.tunnel), tunnel_vni=network.vni, nat_port_min=lo, nat_port_max=hi))
        if report.config_changed:
            log.info("datapath mode is %s for new flows, tunnelMode %s (SNAT source %s, ports %d-%d: %d per "
                     "backend tuple)", mode.label, network.tunnel.label, state.node_addrs[0], lo, hi, hi - lo + 1)
        self.mode = mode
        self._log_frontend_changes(self.state, state)
        sync = self.maps.sync(state)
        sync.config_changed = report.config_changed
        self.state = state
        return sync

    def collect_conntrack(self) -> None:
        """Run the conntrack GC (ended flows out; handshake-incomplete ones early under pressure) and say
        when it is due next."""
        maps = self.maps
        if maps is None:
            return
        gc = Collector(maps.ct_fwd, maps.ct_rev, maps.config)
        try:
            report = gc.collect()
        except (OSError, LookupError) as exc:
            log.warning("conntrack GC failed (retrying later): %s", exc)
            self.gc_schedule.due = time.monotonic() + Schedule.ACTIVE_S
            return
        for line in describe(report):
            log.info("%s", line)
        self.gc_schedule.after(report, gc.capacity, maps.stats())

    def _gc_loop(self) -> None:
        """The conntrack GC's own thread: a collection of full maps takes a second or more, and syncs must
        not wait for it (the two touch different maps)."""
        while not self._stop.wait(0.5):
            maps = self.maps
            if self.state is None or maps is None:
                continue
            try:
                if time.monotonic() >= self.gc_schedule.due or self.gc_schedule.pressing(maps.stats()):
                    self.collect_conntrack()
            except Exception:
                log.exception("conntrack GC failed; retrying later")
                self.gc_schedule.due = time.monotonic() + Schedule.ACTIVE_S

    def _obey_uninstall(self, node_addr: IPv4Address) -> None:
        """Detach the programs and remove the pinned maps once, as the agent configuration says."""
        if self.uninstalled:
            return
        device = socket.if_indextoname(self.ifindex) if self.ifindex else \
            (self.opts.device or device_for_address(node_addr))
        log.info("the agent configuration says %s=true: detaching the programs from %s and removing the "
                 "pinned maps", UNINSTALL_KEY, device or "(no device found)")
        self.uninstall(device)
        self.maps = None
        self.cluster_maps = None
        self.ifindex = 0
        self.state = None
        self.mode = None
        self.uninstalled = True

    def _apply_acceleration(self, acceleration: str) -> None:
        """xdpAcceleration: put the XDP fast path in front of tc (sharing the pinned maps), or take it away."""
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
                self.xdp_obj = load_xdp(self.opts.pin_root)
            got = xdp_attach(self.xdp_obj.prog_fd("xdp_lb_prog"), self.ifindex, acceleration)
        except OSError as exc:
            self._problem(f"xdpAcceleration {acceleration}: cannot attach XDP to ifindex {self.ifindex}: {exc}; "
                          "tc keeps handling all traffic")
            return
        log.info("xdpAcceleration %s: XDP program attached in %s mode; remote-backend flows and SNAT "
                 "replies are forwarded at XDP, everything else by tc", acceleration, got)
        self.acceleration = acceleration

    def _attach_tunnel(self, tunnel: Tunnel) -> None:
        """Requests and replies that crossed the overlay arrive on the VXLAN device: the same ingress
        program handles them there (DSR options, SNAT replies)."""
        assert self.obj is not None and self.overlay is not None
        idx = self.overlay.vxlan_ifindex() if tunnel is Tunnel.VXLAN else None
        if idx and idx != self.tunnel_ifindex:
            tc_attach(self.obj.prog_fd("lb_ingress"), idx, ingress=True)
            log.info("attached lb_ingress to %s (ifindex %d)", VXLAN_DEV, idx)
        self.tunnel_ifindex = idx or 0

    def _log_frontend_changes(self, old: DesiredState | None, new: DesiredState) -> None:
        before: dict[L4Addr, Frontend] = old.frontends if old else {}
        for key, fe in new.frontends.items():
            if before.get(key) != fe:
                verb = "serving" if old is None else "updated" if key in before else "added"
                log.info("%s %s", verb, _describe(fe))
        for key, fe in before.items():
            if key not in new.frontends:
                log.info("removed %s %s of Service %s", fe.kind.value, fe.l4, fe.service)

    def _problem(self, text: str) -> None:
        if text not in self._problems_seen:
            self._problems_seen.add(text)
            log.warning("skipped: %s", text)

    def run(self) -> None:
        """Sync, then re-sync whenever the source changes, until stopped; the conntrack GC runs alongside."""
        self.start()
        threading.Thread(target=self._gc_loop, name="conntrack-gc", daemon=True).start()
        last_full = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                report = self.sync_once()
                self.last_error = None
            except Exception as exc:
                log.exception("sync failed; the datapath keeps its current state, retrying")
                report = None
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)
            if self.on_sync is not None:
                try:
                    self.on_sync(self, report)
                except Exception:
                    log.exception("the after-sync hook failed (the datapath is not affected)")
            if report is not None:
                if not report.changed and self.opts.pin_root.exists() and last_full == 0.0:
                    log.info("sync: the pinned maps already hold this state; nothing written")
                if report.changed:
                    log.info("sync: %d frontends added, %d removed; %d slots written, %d removed; "
                             "%d backends written, %d removed (%.1f ms)",
                             report.frontends_added, report.frontends_removed, report.slots_written,
                             report.slots_removed, report.backends_written, report.backends_removed,
                             (time.monotonic() - started) * 1000)
                if report.maglev_blocks_written or report.maglev_blocks_removed or report.maglev_config_changed:
                    log.info("sync: Maglev %d tables built, %d blocks written, %d removed",
                             report.maglev_tables_built, report.maglev_blocks_written, report.maglev_blocks_removed)
                if not self.ready_marker.is_symlink():
                    os.symlink(str(os.getpid()), self.ready_marker)
                    log.info("ready: first sync done (%s)", self.ready_marker)
                last_full = time.monotonic()
            while not self._stop.is_set():
                if self.source.wait_for_change(0.5):
                    break
                if time.monotonic() - last_full > self.opts.resync_interval:
                    break


def install_signal_handlers(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT end the loop; programs stay attached and maps stay pinned."""
    def handler(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping (datapath stays in place)", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
