"""The node agent: keeps its node's datapath equal to what the cluster's Services, EndpointSlices, Nodes and
the agents' configuration say (source -> model -> datapath), through the Datapath seam (datapath.base): the
kernel's in production, an in-memory one in the agent's unit tests."""

from __future__ import annotations

import gc
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

from bpflb.allocator import settle_allocator
from bpflb.datapath.base import Datapath, NodeProgram
from bpflb.datapath.conntrack import Schedule, describe
from bpflb.datapath.lbmaps import NodeConfig, SyncReport
from bpflb.healthcheck import PROXY_HEALTH_PORT, HealthServers, ProxyHealth, node_eligible
from bpflb.metrics import AgentMetrics
from bpflb.model.budget import Budget, Refusal
from bpflb.model.cluster import (
    ClusterFacts,
    cluster_prefixes,
    network_settings,
    node_addresses,
    nodes_info,
)
from bpflb.model.settings import UNINSTALL_KEY, decode_agent_config
from bpflb.model.translate import Translator
from bpflb.model.types import (
    NAT_PORT_RANGE_DEFAULT,
    Algorithm,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Problem,
)
from bpflb.sources.base import ListingSource, Snapshot, Source

log = logging.getLogger("bpflb.agent")
LOGGED_CHANGES = 50        # frontend changes logged one by one per sync at INFO (the rest at DEBUG, then a summary)


@dataclass
class AgentOptions:
    node_name: str
    pin_root: Path
    device: str | None = None          # external device; default: the one holding the node's InternalIP
    resync_interval: float = 30.0      # full resync even without a change signal
    cgroup_root: Path | None = None    # the socket LB's cgroup v2 directory; None: this mount namespace's root
    socket_lb: bool = True             # False (--no-socket-lb): never the socket LB on this node, whatever socketLB says
    nat_port_range: tuple[int, int] = NAT_PORT_RANGE_DEFAULT   # SNAT source ports (--nat-port-range)
    # kube-proxy's health servers (bpflb.healthcheck): healthCheckNodePorts on the node's addresses, and the
    # proxy health server at healthz_bind_address ("" for none). Off by default: `bpflb agent` turns them on.
    health_servers: bool = False
    healthz_bind_address: str = f"0.0.0.0:{PROXY_HEALTH_PORT}"
    mount_bpffs: bool = False          # mount bpffs when the pin root is on none (an agent run on the host itself)
    node_neigh_refresh: float = 0.5    # seconds between ARP checks of each on-link peer node (--node-neigh-refresh; 0: off)


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
    policy = "" if not fe.local_only else " (iTP Local)" if fe.kind is FrontendKind.CLUSTER_IP else " (eTP Local)"
    selection = ""
    if fe.algorithm == Algorithm.MAGLEV or fe.affinity_timeout:
        selection = " " + ", ".join(filter(None, ["Maglev" if fe.algorithm == Algorithm.MAGLEV else "",
                                                  f"affinity {fe.affinity_timeout}s" if fe.affinity_timeout else ""]))
    draining = f"; draining [{', '.join(b.name for b in fe.draining)}]" if fe.draining else ""
    return f"{fe.kind.value} {fe.l4} of Service {fe.service}{policy}{selection} -> [{names}]{draining}"


class Agent:
    """One node's agent: decides what the datapath should hold and hands it over, sync after sync."""

    def __init__(self, opts: AgentOptions, source: Source,
                 on_sync: Callable[[Agent, SyncReport | None], None] | None = None,
                 datapath: Datapath | None = None) -> None:
        self.opts = opts
        self.source = source
        self.on_sync = on_sync             # called after every sync attempt of run() (node reports)
        if datapath is None:
            from bpflb.datapath.kernel import KernelDatapath

            datapath = KernelDatapath(opts.pin_root, opts.cgroup_root, mount_bpffs=opts.mount_bpffs,
                                      node_neigh_refresh=opts.node_neigh_refresh)
        self.datapath: Datapath = datapath
        self.uninstalled = False           # the configuration said uninstall, and it was done
        self.last_error: str | None = None  # why the last sync attempt failed, None after a good one
        self.state: DesiredState | None = None
        self.translator = Translator(opts.node_name)     # re-translates only what changed
        self.budget = Budget()                           # which Services fit the maps
        self.cluster_facts = ClusterFacts()              # DSR frontends, local backends
        self.refused: dict[str, Problem] = {}            # Services left out of the datapath, by namespace/name
        self._frozen = -1                                # the state whose heap was last kept from the collector
        self.mode: Mode | None = None
        self.debug_logging = False
        self._problems_seen: set[str] = set()
        self._notes_seen: set[str] = set()
        self._stop = threading.Event()
        # Healthy while every change noticed is synced within twice the resync interval (kube-proxy's rule).
        self.health = ProxyHealth(timeout=2 * opts.resync_interval)
        self.health_servers: HealthServers | None = None
        self.gc_schedule = Schedule()
        # The probes' and metrics' view of the loop (bpflb.metrics): live while it turns, ready once synced.
        self.heartbeat = time.monotonic()
        self.synced = False
        self.metrics: AgentMetrics | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def ready_marker(self) -> Path:
        """Exists once this process has done its first sync (a symlink: bpffs holds no regular files)."""
        return self.opts.pin_root / "ready"

    def start(self) -> None:
        """Load the datapath (reusing pinned maps); idempotent across restarts."""
        self.mode = self.datapath.load()
        if self.ready_marker.is_symlink():
            self.ready_marker.unlink()

    def stop(self) -> None:
        self._stop.set()

    def uninstall(self, device: str | None) -> None:
        """Detach the programs and remove the pinned maps (the operator's 'uninstall' instruction)."""
        self.datapath.uninstall(device)

    # -- reconcile ---------------------------------------------------------------------------
    def sync_once(self, snap: Snapshot | None = None) -> SyncReport | None:
        """Read the source (or take snap), translate, program the datapath. None when the node is not known
        yet, or when the configuration says uninstall (then the datapath is removed; it is loaded again once it
        no longer does).

        The cyclic garbage collector is paused meanwhile: a large cluster's sync makes hundreds of thousands of
        acyclic objects, and full collections over everything the agent holds would double its time."""
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._sync_once(self.source.snapshot() if snap is None else snap)
        finally:
            if paused:
                gc.enable()

    def sync_as_listed(self) -> int:
        """Before the first sync: program the Services as their list comes in (a source that can tell,
        KubeSource.partial_snapshot), so that at list-complete only the last pages and the removal of what a
        previous agent left are still to do. Each partial sync adds and updates, never removes what the
        partial view lacks (the datapath sweeps that at the first complete sync). Returns how many partial syncs
        ran; a failure only ends them (the complete sync that follows does everything)."""
        source = self.source
        if not isinstance(source, ListingSource):
            return 0
        done = added = removed = 0
        paused = gc.isenabled()
        gc.disable()                # the growing state is acyclic: no full collections over it meanwhile
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                snap = source.partial_snapshot(0.5)
                if snap is None:
                    if source.synced:
                        break
                    continue
                t0 = time.monotonic()
                report = self._sync_once(snap)
                done += 1
                if report is not None:
                    added += report.frontends_added
                    removed += report.frontends_removed
                log.debug("partial sync %d: %d Services in %.3fs", done, len(snap.services), time.monotonic() - t0)
        except Exception:
            log.exception("programming the Services as they are listed failed; the first complete sync does it")
        finally:
            source.end_partial()
            # What the partial syncs built lives on and is acyclic; left in the youngest generation, the
            # first collection after this would walk every object of it (a fifth of a second at 10,000).
            if done:
                gc.freeze()
            if paused:
                gc.enable()
            settle_allocator()      # the lists are in: what is still to come are the syncs' own tables
        if done:
            log.info("programmed the Services as they were listed, in %d partial syncs (%d frontends so far: %d "
                     "added, %d removed)", done, len(self.state.frontends) if self.state else 0, added, removed)
        return done

    def _freeze_heap(self) -> None:
        """After a sync that built everything anew (in the loop, once the maps are programmed): what it built
        lives on, and is acyclic. Kept out of the collector's full passes, which would otherwise walk millions
        of objects between two small syncs; the previous such heap is handed back to it first."""
        if self.state is not None and self.state.changes is None and self.state.generation != self._frozen:
            self._frozen = self.state.generation
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def _sync_once(self, snap: Snapshot) -> SyncReport | None:
        for text in snap.problems:
            self._problem(text)
        config, _ = decode_agent_config(snap.config)      # its problems come back in state.problems
        self._set_debug_logging(config.settings.debugLogging)
        state = self.translator.translate(snap)
        for problem in state.problems:
            self._problem(str(problem))
        for note in state.notes:
            self._note(str(note))
        if not state.node_addrs:
            log.warning("Node %s has no IPv4 address in the source yet; not programming", self.opts.node_name)
            return None
        if config.uninstall:
            if snap.partial:
                return None         # the complete sync obeys it
            self._obey_uninstall(state.node_addrs[0])
            return None
        if self.uninstalled:
            log.info("the agent configuration no longer says uninstall: loading the datapath again")
            self.start()
            self.uninstalled = False
        if self.datapath.attached is None:
            device = self.opts.device or device_for_address(state.node_addrs[0])
            if device is None:
                log.error("no device holds %s (Node %s InternalIP); pass --device", state.node_addrs[0],
                          self.opts.node_name)
                return None
            self.datapath.attach(device)
        mode = state.settings.mode
        network = network_settings(config)
        nodes = nodes_info(snap)
        me = next((n for n in nodes if n.name == self.opts.node_name), None)
        all_addrs = node_addresses(snap)
        state, refusals = self.budget.fit(state, all_addrs, self.datapath.capacity())
        dsr, members, local = self.cluster_facts.update(state, all_addrs)
        want = NodeProgram(
            state=state,
            config=NodeConfig(mode=mode, snat_addr=state.node_addrs[0], ext_ifindex=0,
                              tunnel_mode=int(network.tunnel), tunnel_vni=network.vni,
                              nat_port_min=self.opts.nat_port_range[0], nat_port_max=self.opts.nat_port_range[1]),
            dsr_frontends=dsr, dsr_backends=members, local_backends=local, prefixes=frozenset(cluster_prefixes(snap)),
            nodes=tuple(nodes), me=me, network=network, acceleration=config.settings.xdpAcceleration,
            socket_lb=self._socket_lb(config.settings.socketLB), partial=snap.partial)
        done = self.datapath.program(want)
        if not snap.partial:        # who is refused is decided over every Service, at the complete sync
            self._refuse(refusals, done.refused)
        for action in done.network_actions:
            log.info("network (tunnelMode %s): %s", network.tunnel.label, action)
        for action in done.in_cluster_actions:
            log.info("in-cluster: %s", action)
        for text in done.problems:
            self._problem(text)
        if done.cluster_changes:
            log.info("cluster view: %d DSR frontends, %d (frontend, local backend) pairs DSR requests may reach, "
                     "%d local backend endpoints, %d cluster prefixes (%d keys changed)",
                     *done.cluster_sizes, done.cluster_changes)
        if done.sync.config_changed:
            lo, hi = self.opts.nat_port_range
            log.info("datapath mode is %s for new flows, tunnelMode %s (SNAT source %s, ports %d-%d: %d per "
                     "backend tuple)", mode.label, network.tunnel.label, state.node_addrs[0], lo, hi, hi - lo + 1)
        self.mode = mode
        if not snap.partial:        # (sync_as_listed says how many frontends its partial syncs programmed)
            self._log_frontend_changes(self.state, state)
        self.state = state
        if not snap.partial:
            self._serve_health(snap, state)
        return done.sync

    def _refuse(self, refusals: list[Refusal], failed: list[tuple[str, str, str]]) -> None:
        """Services left out of the datapath, each alone: by the budget (they do not fit), or because the kernel
        refused their entries (tried again at the next sync). Logged once each, kept in self.refused for
        the node report and the Services' Events."""
        refused = {r.service: r.problem() for r in refusals}
        for service, map_name, reason in failed:
            if service and service not in refused:
                refused[service] = Problem(f"Service {service}", f"map {map_name}",
                                           f"{reason}; left out and tried again at the next sync, everything "
                                           f"else is programmed")
            elif not service:
                self._problem(f"map {map_name}: {reason}")
        for service, problem in refused.items():
            if self.refused.get(service) != problem:
                log.warning("refused: %s", problem)
        for service in self.refused.keys() - refused.keys():
            log.info("Service %s fits the datapath again: programmed", service)
        self.refused = refused

    def _serve_health(self, snap: Snapshot, state: DesiredState) -> None:
        """The datapath holds what was noticed: healthy again; the health servers follow the new state."""
        self.health.updated()
        me = next((n for n in snap.nodes if isinstance(n, dict) and
                   (n.get("metadata") or {}).get("name") == self.opts.node_name), None)
        self.health.set_node_eligible(node_eligible(me))
        if not self.opts.health_servers:
            return
        if self.health_servers is None:
            host, _, port = self.opts.healthz_bind_address.rpartition(":")
            listen = (host or "0.0.0.0", int(port)) if self.opts.healthz_bind_address else None
            self.health_servers = HealthServers(self.health, listen)
        for text in self.health_servers.sync(state.health_checks, state.node_addrs):
            self._problem(text)

    def _socket_lb(self, setting: bool) -> bool:
        """socketLB as the configuration says it, unless this agent was started with --no-socket-lb."""
        if setting and not self.opts.socket_lb:
            self._problem("the agent's --no-socket-lb keeps the socket LB off on this node (the configuration's "
                          "socketLB is true); in-cluster connections of pods go through the pod-facing path")
        return setting and self.opts.socket_lb

    def _refresh_pods(self) -> None:
        """Between syncs: a pod whose veth was just wired gets the pod-facing path now, not at the next sync."""
        try:
            for action in self.datapath.refresh_pods():
                log.info("in-cluster: %s", action)
        except Exception:
            log.exception("pod path: attaching to new pod veths failed; the next sync retries")

    def _set_debug_logging(self, on: bool) -> None:
        """debugLogging: the agent's loggers at DEBUG, or back at the command line's level."""
        if on != self.debug_logging:
            self.debug_logging = on
            logging.getLogger("bpflb").setLevel(logging.DEBUG if on else logging.NOTSET)
            log.info("debugLogging %s: logging at %s", str(on).lower(), "DEBUG" if on else "the command line's level")

    def _obey_uninstall(self, node_addr: IPv4Address) -> None:
        """Detach the programs and remove the pinned maps once, as the agent configuration says."""
        if self.uninstalled:
            return
        device = self.datapath.attached or self.opts.device or device_for_address(node_addr)
        log.info("the agent configuration says %s=true: detaching the programs from %s and removing the "
                 "pinned maps", UNINSTALL_KEY, device or "(no device found)")
        self.uninstall(device)
        if self.health_servers is not None:
            self.health_servers.sync({}, ())       # no Service's health is this node's to tell any more
        self.state = None
        self.mode = None
        self.uninstalled = True

    def _log_frontend_changes(self, old: DesiredState | None, new: DesiredState) -> None:
        before: dict[L4Addr, Frontend] = old.frontends if old else {}
        incremental = old is not None and new.changes is not None and new.base == old.generation
        look = new.changes if incremental and new.changes is not None else new.frontends.keys() | before.keys()
        said = 0
        debug = log.isEnabledFor(logging.DEBUG)
        for key in look:
            fe = new.frontends.get(key)
            if fe is not None and before.get(key) != fe:
                said += 1
                if said <= LOGGED_CHANGES or debug:
                    verb = "serving" if old is None else "updated" if key in before else "added"
                    log.log(logging.INFO if said <= LOGGED_CHANGES else logging.DEBUG, "%s %s", verb, _describe(fe))
            elif fe is None and key in before:
                said += 1
                if said <= LOGGED_CHANGES or debug:
                    gone = before[key]
                    log.log(logging.INFO if said <= LOGGED_CHANGES else logging.DEBUG,
                            "removed %s %s of Service %s", gone.kind.value, gone.l4, gone.service)
        if said > LOGGED_CHANGES:
            log.info("... and %d more frontends changed in this sync (each at DEBUG: debugLogging); %d frontends of "
                     "%d Services are served", said - LOGGED_CHANGES, len(new.frontends), len(new.by_service))

    def _problem(self, text: str) -> None:
        if text not in self._problems_seen:
            self._problems_seen.add(text)
            log.warning("skipped: %s", text)

    def _note(self, text: str) -> None:
        """A field bpflb does not act on: said once (it is in the node report as long as it holds)."""
        if text not in self._notes_seen:
            self._notes_seen.add(text)
            log.warning("not acted on: %s", text)

    def collect_conntrack(self) -> None:
        """Run the conntrack GC (ended flows out; handshake-incomplete ones early under pressure) and say
        when it is due next."""
        report = self.datapath.collect_conntrack()
        if report is None:
            self.gc_schedule.due = time.monotonic() + Schedule.IDLE_S
            return
        for line in describe(report):
            log.info("%s", line)
        self.gc_schedule.after(report, report.capacity, self.datapath.counters())

    def _gc_loop(self) -> None:
        """The conntrack GC's own thread: a collection of full maps takes a second or more, and syncs must
        not wait for it (the two touch different maps)."""
        while not self._stop.wait(0.5):
            if self.state is None or self.uninstalled:
                continue
            try:
                if time.monotonic() >= self.gc_schedule.due or self.gc_schedule.pressing(self.datapath.counters()):
                    self.collect_conntrack()
            except Exception:
                log.exception("conntrack GC failed; retrying later")
                self.gc_schedule.due = time.monotonic() + Schedule.ACTIVE_S

    def start_retrying(self, first_delay: float = 1.0, max_delay: float = 30.0) -> bool:
        """start(), again and again while the datapath cannot be loaded (say, the pin root is on no bpffs
        yet): the reason is logged and reported (last_error, the after-sync hook), the process never
        crash-loops. False when stopped first."""
        delay = first_delay
        while not self._stop.is_set():
            try:
                self.start()
            except OSError as exc:
                self.last_error = f"cannot load the datapath: {exc}"
                log.error("%s; nothing is changed on this node, retrying in %.0fs", self.last_error, delay)
                if self.on_sync is not None:
                    try:
                        self.on_sync(self, None)
                    except Exception:
                        log.exception("the after-sync hook failed")
                self._stop.wait(delay)
                delay = min(delay * 2, max_delay)
                continue
            self.last_error = None
            return True
        return False

    def run(self) -> None:
        """Sync, then re-sync whenever the source changes, until stopped; the conntrack GC runs alongside."""
        if not self.start_retrying():
            return
        threading.Thread(target=self._gc_loop, name="conntrack-gc", daemon=True).start()
        self.sync_as_listed()
        last_full = 0.0
        try:
            while not self._stop.is_set():
                report = self.run_once(last_full)
                if report is not None:
                    last_full = time.monotonic()
                while not self._stop.is_set():
                    self.heartbeat = time.monotonic()
                    if self.source.wait_for_change(0.5):
                        self.health.queued_update()
                        break
                    self._refresh_pods()
                    if time.monotonic() - last_full > self.opts.resync_interval:
                        break
        finally:
            if self.health_servers is not None:
                self.health_servers.close()
        self.datapath.close()

    def run_once(self, last_full: float = 0.0, retry_delay: float = 1.0) -> SyncReport | None:
        """One sync attempt of the loop: a failure is logged and kept in last_error (the datapath keeps its
        state; the loop retries), the hook is told, the first good sync writes the ready marker."""
        started = self.heartbeat = time.monotonic()
        try:
            report = self.sync_once()
            self.last_error = None
        except Exception as exc:
            log.exception("sync failed; the datapath keeps its current state, retrying")
            report = None
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.health.queued_update()         # what was noticed is still not in the datapath
        self._observe(time.monotonic() - started, report)
        if self.last_error is not None:
            self._stop.wait(retry_delay)
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
            self._freeze_heap()
        return report

    def _observe(self, seconds: float, report: SyncReport | None) -> None:
        """The loop's bookkeeping for the probes and the metrics: ready after the first full sync."""
        if report is not None:
            if not self.synced:
                settle_allocator()      # the first sync's peak is behind: changes' tables from the heap
            self.synced = True
        if self.metrics is not None:
            result = "error" if self.last_error else "waiting" if report is None else "ok"
            self.metrics.observe_sync(seconds, result, len(self.state.frontends) if self.state else 0)


def install_signal_handlers(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT end the loop; programs stay attached and maps stay pinned."""
    def handler(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping (datapath stays in place)", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
