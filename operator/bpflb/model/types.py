"""The load-balancer model: what one node's datapath should hold, independent of BPF and of Kubernetes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bpflb.model.maglev import DEFAULT_SEED, DEFAULT_TABLE_SIZE

# SNAT source ports without a setting: Cilium's NodePort SNAT range, 32,768 ports per backend tuple.
NAT_PORT_RANGE_DEFAULT = (32768, 65535)


def parse_port_range(text: str) -> tuple[int, int]:
    """The SNAT port range setting, "MIN-MAX", as (MIN, MAX); ValueError says what is expected."""
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError(f"must be MIN-MAX (two port numbers, e.g. 32768-65535); got {text!r}")
    pair = (int(lo), int(hi))
    if not 1 <= pair[0] <= pair[1] <= 65535:
        raise ValueError(f"must be 1 <= MIN <= MAX <= 65535; got {text!r}")
    return pair


class Proto(enum.IntEnum):
    """IP protocol numbers of the L4 protocols the datapath balances."""

    TCP = 6
    UDP = 17


class Mode(enum.IntEnum):
    """bpfLBMode; the values are the datapath's LB_MODE_* constants."""

    SNAT = 0
    DSR = 1
    HYBRID = 2

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Map a ModuleConfig spelling (SNAT, DSR, Hybrid) to a Mode; ValueError names the choices."""
        for mode in cls:
            if mode.label == text:
                return mode
        raise ValueError(f"must be one of SNAT, DSR, Hybrid; got {text!r}")

    @property
    def label(self) -> str:
        return {Mode.SNAT: "SNAT", Mode.DSR: "DSR", Mode.HYBRID: "Hybrid"}[self]


class Algorithm(enum.IntEnum):
    """Backend selection; the values are the datapath's LB_ALG_* constants."""

    RANDOM = 0
    MAGLEV = 1


class FrontendKind(enum.Enum):
    NODEPORT = "NodePort"
    LOADBALANCER = "LoadBalancer"
    EXTERNAL_IP = "ExternalIP"
    CLUSTER_IP = "ClusterIP"          # served to in-cluster clients only (socket LB, pod-facing tc)


@dataclass(frozen=True, order=True, slots=True)
class L4Addr:
    """An address:port/protocol triple, the identity of a frontend or a backend."""

    addr: IPv4Address
    port: int
    proto: Proto

    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashed by the hundred thousand on every sync, and IPv4Address's own hash goes through hex():
        # computed once per address.
        object.__setattr__(self, "_hash", hash((int(self.addr), self.port, int(self.proto))))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}/{self.proto.name}"


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint of a Service port, as this node sees it."""

    l4: L4Addr
    name: str            # stable identity across nodes (pod name or address), used to order backends
    node_name: str | None
    local: bool          # on this node: reached without SNAT, and the only kind eTP Local may use
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class Frontend:
    """One address:port a client can hit, with the backends this node may pick for it."""

    l4: L4Addr
    kind: FrontendKind
    service: str                      # "namespace/name" of the Service
    port_name: str                    # the Service port's name ("" when unnamed)
    local_only: bool                  # externalTrafficPolicy: Local (a ClusterIP: internalTrafficPolicy)
    backends: tuple[Backend, ...]     # eligible for new flows on this node, in a stable order
    no_endpoints: bool                # the Service has no usable endpoint anywhere: reject
    algorithm: Algorithm = Algorithm.RANDOM
    affinity_timeout: int = 0         # sessionAffinity ClientIP timeout in seconds; 0 = none
    # Endpoints still listed for the Service port but not eligible for new flows (terminating, or not
    # ready): kept in the datapath's backends so their open flows continue, never selected.
    draining: tuple[Backend, ...] = ()
    # A NodePort, LoadBalancer or externalIP frontend: its Service port's ClusterIP frontend, whose backends
    # (the internal view) clients inside the cluster get when they address this one; None: its own.
    internal: L4Addr | None = None
    # False: not served to in-cluster clients at all; their traffic goes to the address itself (an externalIP
    # that is not this node's own address: CVE-2020-8554, Cilium's rule).
    in_cluster: bool = True
    # loadBalancerSourceRanges when svcSourceRangeCheck enforces them on this frontend: the client prefixes
    # it admits (or refuses, with source_ranges_deny); None = no check. An empty tuple admits nobody (every
    # range was IPv6, say): a Service that asked to be limited never falls open.
    source_ranges: tuple[IPv4Network, ...] | None = None
    source_ranges_deny: bool = False


@dataclass(frozen=True)
class Problem:
    """A bad input that was skipped: which object, which field, and why."""

    obj: str      # "Service default/echo", "EndpointSlice default/echo-abc"
    field: str    # "spec.ports[1].protocol"
    reason: str   # "SCTP is not supported; expected TCP or UDP"

    def __str__(self) -> str:
        return f"{self.obj}: {self.field}: {self.reason}"


@dataclass(frozen=True)
class AgentSettings:
    """Runtime settings of a node's datapath: the typed view of bpflb.model.settings.AgentConfig, whose
    defaults (Deckhouse's) these repeat; tests/unit/test_settings.py holds the two equal."""

    mode: Mode = Mode.HYBRID
    algorithm: Algorithm = Algorithm.RANDOM
    maglev_table_size: int = DEFAULT_TABLE_SIZE    # M, a prime of bpflb.model.maglev.TABLE_SIZES
    maglev_seed: int = DEFAULT_SEED                # cluster-wide: every node must build the same tables
    algorithm_annotation: bool = False             # extraLoadBalancerAlgorithmsEnabled: honour lb-algorithm
    source_range_check: bool = False               # svcSourceRangeCheck: enforce loadBalancerSourceRanges


@dataclass(frozen=True)
class HealthCheck:
    """A healthCheckNodePort this node answers (eTP Local LoadBalancer Services), as kube-proxy does."""

    port: int
    namespace: str
    name: str
    local_endpoints: int          # this node's ready endpoints of the Service (distinct addresses)


@dataclass
class DesiredState:
    """Everything one node's datapath should hold after a sync."""

    node_name: str
    node_addrs: tuple[IPv4Address, ...]
    frontends: dict[L4Addr, Frontend] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    settings: AgentSettings = field(default_factory=AgentSettings)
    # Fields bpflb does not act on (not errors): each said once in the agent's log and its node report.
    notes: list[Problem] = field(default_factory=list)
    health_checks: dict[int, HealthCheck] = field(default_factory=dict)      # by healthCheckNodePort
    # The frontends of each Service ("namespace/name"), and when each Service was created (its
    # metadata.creationTimestamp, "" when unknown): who is admitted first when the maps are short (model.budget).
    by_service: dict[str, tuple[Frontend, ...]] = field(default_factory=dict)
    service_rank: dict[str, str] = field(default_factory=dict)
    # What differs from the state whose generation is `base` (the previous one its translator made): the
    # frontends added, replaced or gone, and the Services whose frontends did. None: not known, compare all.
    # Unchanged frontends are the same objects in both states.
    generation: int = 0
    base: int = -1
    changes: set[L4Addr] | None = None
    services_changed: set[str] | None = None
