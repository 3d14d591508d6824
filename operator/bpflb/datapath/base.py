"""The seam between the agent and the BPF adapter: one interface (load, attach, program a desired state,
read counters and map fill levels, uninstall) with two implementations, the kernel's (datapath.kernel) and an in-memory one
(datapath.memory) for the agent's logic tests without root; both program maps through LBMaps,
ClusterMaps and EastWestMaps, so the entries they hold are byte for byte the same."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Protocol

from bpflb.datapath.clustermaps import ClusterMaps
from bpflb.datapath.conntrack import GcReport
from bpflb.datapath.eastwest import EastWestMaps
from bpflb.datapath.lbmaps import LBMaps, NodeConfig, SyncReport
from bpflb.datapath.loader import Map
from bpflb.datapath.mapdiff import MapMirror
from bpflb.model.cluster import NetworkSettings, NodeInfo
from bpflb.model.types import DesiredState, L4Addr, Mode


@dataclass(frozen=True)
class MapFill:
    """Entries in a map and how many it can hold."""

    entries: int
    capacity: int

    @property
    def pressure(self) -> float:
        """entries / capacity (Cilium's bpf_map_pressure)."""
        return self.entries / self.capacity if self.capacity else 0.0


@dataclass(frozen=True)
class NodeProgram:
    """Everything one node's datapath should hold after a sync."""

    state: DesiredState                         # frontends, backends, selection settings
    config: NodeConfig                          # lb_config (ext_ifindex is the datapath's own)
    dsr_frontends: Mapping[L4Addr, int] = field(default_factory=dict)   # -> model.cluster.DsrFrontendKind
    dsr_backends: Iterable[tuple[L4Addr, L4Addr]] = frozenset()    # (frontend, local backend) DSR may reach
    local_backends: AbstractSet[L4Addr] | Mapping[L4Addr, int] = frozenset()
    prefixes: frozenset[IPv4Network] = frozenset()
    nodes: tuple[NodeInfo, ...] = ()            # every node: the tunnel map, the overlay's peers
    me: NodeInfo | None = None
    network: NetworkSettings = field(default_factory=NetworkSettings)
    acceleration: str = "Disabled"              # xdpAcceleration
    socket_lb: bool = True                      # socketLB, unless the agent's --no-socket-lb says no
    # Only some of the Services (their first list still coming in): write what state holds, remove nothing
    # it lacks; the first complete program() removes what nobody wants.
    partial: bool = False


@dataclass
class ProgramReport:
    """What one program() did, for the agent's log."""

    sync: SyncReport
    cluster_changes: int = 0
    # DSR frontends, (frontend, local backend) pairs DSR requests may reach, local backends, cluster prefixes
    cluster_sizes: tuple[int, int, int, int] = (0, 0, 0, 0)
    network_actions: list[str] = field(default_factory=list)
    acceleration: str | None = None             # what was attached now ("native"/"generic"), else None
    problems: list[str] = field(default_factory=list)   # what could not be applied (the rest was)
    in_cluster_actions: list[str] = field(default_factory=list)   # socket LB and pod path changes
    # Frontends and cluster facts the kernel refused to hold: (Service "namespace/name" or "", map, reason).
    # The Service is left out whole at the next sync only if the budget says so; the maps keep everything else.
    refused: list[tuple[str, str, str]] = field(default_factory=list)


class Datapath(Protocol):
    """One node's datapath as the agent drives it."""

    def load(self) -> Mode | None:
        """Load the objects, reusing state a previous agent left (pins); the mode the maps hold, if any."""
        ...

    def attach(self, device: str) -> None:
        """Attach the programs to the external device (atomically replacing earlier ones)."""
        ...

    @property
    def attached(self) -> str | None:
        """The device the programs are attached to by this process, None before attach()."""
        ...

    def program(self, want: NodeProgram) -> ProgramReport:
        """Make the datapath hold want, writing only differences; raises when a write fails."""
        ...

    def counters(self) -> dict[str, int]:
        """Packet counters by name (STAT_* of lb_structs.h, lower case)."""
        ...

    def fill_levels(self) -> dict[str, MapFill]:
        """How full each bounded map is, by map name (arrays, full by construction, left out)."""
        ...

    def node_neighbour_counts(self) -> dict[str, int]:
        """The peer-node neighbour refresher's counters (datapath.nodeneigh), empty when it does not run."""
        ...

    def collect_conntrack(self) -> GcReport | None:
        """Remove ended flows from the conntrack maps (datapath.conntrack); None when there are none to collect."""
        ...

    def refresh_pods(self) -> list[str]:
        """Give pods' veths that appeared since the last program() the pod-facing path; what was done.
        Cheap when nothing changed (called between syncs)."""
        ...

    def capacity(self) -> dict[str, int]:
        """max_entries of every map a sync fills, by map name (after load())."""
        ...

    def uninstall(self, device: str | None) -> None:
        """Detach from device and remove every pinned map; load() starts afresh after this."""
        ...

    def close(self) -> None:
        """Stop what attach() started in this process beside the programs (the neighbour watcher); the
        programs stay attached and the maps pinned, for the next agent."""
        ...


class MapsDatapath:
    """The part both implementations share: maps programmed through LBMaps and ClusterMaps, in the order
    that keeps every intermediate state valid (cluster facts, then lb_config, then frontends)."""

    def __init__(self) -> None:
        self.maps: LBMaps | None = None
        self.cluster: ClusterMaps | None = None
        self.east_west: EastWestMaps | None = None
        self.device: str | None = None
        self.ifindex = 0

    @property
    def attached(self) -> str | None:
        return self.device

    def _network(self, want: NodeProgram) -> list[str]:
        """Apply the pod network across nodes; what was done (overridden by the kernel datapath)."""
        return []

    def _accelerate(self, acceleration: str, report: ProgramReport) -> None:
        """Put the XDP fast path in front of tc, or take it away (overridden by the kernel datapath)."""

    def _in_cluster(self, want: NodeProgram, report: ProgramReport) -> None:
        """Attach or detach the socket LB, give the pods' veths the pod-facing path (overridden by both)."""

    def refresh_pods(self) -> list[str]:
        return []

    def program(self, want: NodeProgram) -> ProgramReport:
        assert self.maps is not None and self.cluster is not None, "program() before load()"
        report = ProgramReport(SyncReport())
        # The pod network first, then the cluster-wide facts: this node must accept DSR requests for every
        # frontend, and know every tunnel endpoint, before any node (itself included) starts sending them.
        report.network_actions = self._network(want)
        report.cluster_changes = self.cluster.sync(want.dsr_frontends, want.local_backends, want.prefixes,
                                                   want.nodes, want.dsr_backends, partial=want.partial)
        report.refused += [(_service_of(obj, want), name, why) for name, obj, why in self.cluster.failures]
        report.cluster_sizes = (len(self.cluster.dsr_frontends.entries), len(self.cluster.dsr_backends.entries),
                                len(self.cluster.local_backends.entries), len(self.cluster.cidrs.entries))
        self._accelerate(want.acceleration, report)
        config = NodeConfig(**{**want.config.__dict__, "ext_ifindex": self.ifindex})
        config_changed = self.maps.set_config(config)
        report.sync = self.maps.sync(want.state, partial=want.partial)
        report.sync.config_changed = config_changed
        report.refused += [(f.service, f.map_name, f"frontend {f.frontend}: {f.reason}") for f in report.sync.failures]
        report.problems += report.sync.problems
        # In-cluster paths last: they read the frontends just written; the pod path's sources first.
        if self.east_west is not None:
            self.east_west.sync(want.me.pod_cidrs if want.me else ())
        self._in_cluster(want, report)
        return report

    def capacity(self) -> dict[str, int]:
        assert self.maps is not None and self.cluster is not None, "capacity() before load()"
        return {**self.maps.capacity(), **self.cluster.capacity()}

    def counters(self) -> dict[str, int]:
        assert self.maps is not None, "counters() before load()"
        return self.maps.stats()

    def node_neighbour_counts(self) -> dict[str, int]:
        return {}

    def collect_conntrack(self) -> GcReport | None:
        """The kernel's maps only (the in-memory datapath keeps no flows)."""
        return None

    def open_maps(self) -> list[Map]:
        """Every map this datapath programs, once each (the attributes of LBMaps, ClusterMaps, EastWestMaps);
        the kernel datapath adds those only its programs write (conntrack, ...)."""
        found: dict[str, Map] = {}
        for holder in (self.maps, self.cluster, self.east_west):
            for value in list(vars(holder).values()) if holder is not None else []:
                m = value.map if isinstance(value, MapMirror) else value
                if isinstance(m, Map):
                    found.setdefault(m.name, m)
        return [found[name] for name in sorted(found)]

    def _fill(self, m: Map) -> MapFill | None:
        """One map's fill level (each implementation reads it its own way); None: not bounded that way."""
        return None

    def fill_levels(self) -> dict[str, MapFill]:
        out: dict[str, MapFill] = {}
        for m in self.open_maps():
            level = self._fill(m)
            if level is not None:
                out[m.name] = level
        return out


def _service_of(obj: object, want: NodeProgram) -> str:
    """The Service a refused cluster-map key stands for ("" for a node's prefixes or tunnel endpoints)."""
    if not isinstance(obj, L4Addr):
        return ""
    for fe in want.state.frontends.values():
        if fe.l4 == obj or (fe.l4.port, fe.l4.proto) == (obj.port, obj.proto) \
                or any(b.l4 == obj for b in fe.backends + fe.draining):
            return fe.service
    return ""
