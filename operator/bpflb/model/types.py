"""The load-balancer model: what one node's datapath should hold, independent of BPF and of Kubernetes."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from operator import itemgetter
from typing import Self

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


class L4Addr(int):
    """An address:port/protocol triple, the identity of a frontend or a backend.

    One integer underneath, address << 24 | port << 8 | protocol number: 32 bytes, where a tuple of three
    integers took 88 and its address 28 more (a large cluster holds a hundred thousand, one per endpoint).
    Hashed, compared and ordered in C, by (address, port, protocol) as the tuple it was; read as one too
    (l4[0], l4[1], l4[2], or address, port, proto = l4). Its value is also the lb_backend struct's leading
    bytes in network order (lbmaps packs it as it is)."""

    __slots__ = ()

    def __new__(cls, addr: IPv4Address | int, port: int, proto: Proto | int) -> Self:
        ip = addr if type(addr) is int else int(addr)
        if not (0 <= ip <= 0xFFFFFFFF and 0 <= port <= 0xFFFF and 0 <= proto <= 0xFF):
            raise ValueError(f"not an IPv4 address, port and protocol number: {addr!r}, {port!r}, {proto!r}")
        return int.__new__(cls, ip << 24 | port << 8 | proto)

    @classmethod
    def of(cls, ip: int, port: int, proto: int) -> L4Addr:
        """From integers already known to be in range (the endpoints' fast path: no check)."""
        return _int_new(cls, ip << 24 | port << 8 | proto)

    @property
    def addr(self) -> IPv4Address:
        return IPv4Address(self >> 24)

    @property
    def ip(self) -> int:
        """The address as an integer."""
        return self >> 24

    @property
    def packed(self) -> bytes:
        """The address in network order (4 bytes)."""
        return (self >> 24).to_bytes(4, "big")

    @property
    def port(self) -> int:
        """The port number."""
        return self >> 8 & 0xFFFF

    @property
    def proto(self) -> Proto:
        return _PROTOS[self & 0xFF]

    def __getitem__(self, i: int) -> int:
        """(address, port, protocol number)[i], as the tuple it was."""
        return (self >> 24, self >> 8 & 0xFFFF, self & 0xFF)[i]

    def __iter__(self) -> Iterator[int]:
        return iter((self >> 24, self >> 8 & 0xFFFF, self & 0xFF))

    def __len__(self) -> int:
        return 3

    def __repr__(self) -> str:
        return f"L4Addr(addr={self.addr!r}, port={self.port}, proto={self.proto!r})"

    def __str__(self) -> str:
        return f"{self.addr}:{self.port}/{self.proto.name}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __reduce__(self) -> tuple[type[L4Addr], tuple[int, int, int]]:
        return L4Addr, (self >> 24, self >> 8 & 0xFFFF, self & 0xFF)


_int_new = int.__new__


_PROTOS = {int(p): p for p in Proto}


class Backend(tuple[L4Addr, str, str | None, bool, bool]):
    """One endpoint of a Service port, as this node sees it.

    A tuple underneath (l4, name, node_name, local, terminating), made, compared and hashed in C: a large
    cluster has a hundred thousand, made anew whenever a Service's endpoints are translated."""

    __slots__ = ()

    def __new__(cls, l4: L4Addr, name: str, node_name: str | None, local: bool, terminating: bool = False) -> Self:
        return tuple.__new__(cls, (l4, name, node_name, local, terminating))

    l4 = property(itemgetter(0), doc="the backend's address:port/protocol")
    name = property(itemgetter(1), doc="stable identity across nodes (pod name or address): orders the backends")
    node_name = property(itemgetter(2), doc="the node it runs on, None when unknown")
    local = property(itemgetter(3), doc="on this node: reached without SNAT, the only kind eTP Local may use")
    terminating = property(itemgetter(4), doc="its pod is terminating")

    def __repr__(self) -> str:
        return (f"Backend(l4={self[0]!r}, name={self[1]!r}, node_name={self[2]!r}, local={self[3]!r}, "
                f"terminating={self[4]!r})")

    def __reduce__(self) -> tuple[type[Backend], tuple[L4Addr, str, str | None, bool, bool]]:
        return Backend, (self[0], self[1], self[2], self[3], self[4])


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
    # A Translator's state holds read-only views of its own, current until its next translation: read them in
    # the sync that state is for (copying 10,000 entries each would be most of a one-change sync).
    by_service: Mapping[str, tuple[Frontend, ...]] = field(default_factory=dict)
    service_rank: Mapping[str, str] = field(default_factory=dict)
    # What differs from the state whose generation is `base` (the previous one its translator made): the
    # frontends added, replaced or gone, and the Services whose frontends did. None: not known, compare all.
    # Unchanged frontends are the same objects in both states.
    generation: int = 0
    base: int = -1
    changes: set[L4Addr] | None = None
    services_changed: set[str] | None = None
