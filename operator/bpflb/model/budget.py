"""Map capacity, budgeted before anything is written: how many entries of each bounded map a Service needs,
and which Services do not fit. A Service that does not fit is refused whole and alone (a Problem naming it,
the map and the numbers); every other Service is programmed.

Who is refused is decided the same way on every node: Services are admitted oldest first (creationTimestamp,
then namespace/name), each if what it needs still fits after the ones admitted before it. So a Service that
works keeps working when a newer one would overflow a map (the newcomer is refused), and a refused Service is
admitted as soon as room appears (another Service deleted or shrunk), at the next sync. A Service that grows
beyond what is left is refused too, whatever its age: admission looks at what each Service needs now.

The counts mirror what the datapath writes (datapath.lbmaps, clustermaps): per frontend one lb_services
master plus one slot per backend, ceil(M / 8192) lb_maglev blocks for Maglev, one lb_affinity_members entry
per backend with session affinity; lb_backends, lb_dsr_frontends, lb_dsr_backends and lb_local_backends hold
distinct keys, shared between Services; lb_internal_view one entry per frontend that has an internal view. Each frontend holds at most 65,535 backends (lb_svc_val.count is 16 bits)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.types import Algorithm, DesiredState, Frontend, FrontendKind, L4Addr, Problem

ANY_NODE = IPv4Address(0)         # a NodePort's DSR members are listed under address 0 (model.cluster.ANY_NODE)

SERVICES = "lb_services"
BACKENDS = "lb_backends"
MAGLEV = "lb_maglev"
MEMBERS = "lb_affinity_members"
DSR = "lb_dsr_frontends"
DSR_MEMBERS = "lb_dsr_backends"
LOCAL = "lb_local_backends"
VIEWS = "lb_internal_view"
SLOTS_MAX = 65535                 # backends of one frontend: lb_svc_val.count and Maglev entries are 16 bits
MAGLEV_BLOCK = 8192               # LB_MAGLEV_BLOCK: table entries per lb_maglev value

# What a user changes to make a Service fit, per map (the field of the refusal).
_FIELD = {SERVICES: "spec.ports (frontends x endpoints)", BACKENDS: "endpoints (EndpointSlices)",
          MAGLEV: "Maglev tables (lbAlgorithm)", MEMBERS: "spec.sessionAffinity (ClientIP members)",
          DSR: "spec.ports x frontend addresses (DSR frontends)", LOCAL: "endpoints on this node",
          DSR_MEMBERS: "spec.ports x endpoints on this node (DSR frontend members)",
          VIEWS: "spec.ports x frontend addresses (internal views)"}
_COUNTED = (SERVICES, MAGLEV, MEMBERS)
_SETS = (BACKENDS, DSR, LOCAL, DSR_MEMBERS, VIEWS)


@dataclass(frozen=True)
class Refusal:
    """A Service left out because it does not fit: which map, what it needs and what was left."""

    service: str          # namespace/name
    map_name: str
    field: str
    reason: str

    def problem(self) -> Problem:
        return Problem(f"Service {self.service}", self.field, self.reason)


@dataclass(slots=True)
class _Demand:
    """What one Service needs: entries of each map of _COUNTED (in that order) and the frontend too big for any
    map. The distinct keys it needs (_keys) are made again when asked for rather than kept: a large cluster has
    10,000 Services, whose tuples of keys would be kept between syncs (as many as the backends)."""

    frontends: tuple[Frontend, ...]
    counts: tuple[int, ...]
    too_big: Frontend | None


def _demand(frontends: tuple[Frontend, ...], table_size: int) -> _Demand:
    blocks = -(-table_size // MAGLEV_BLOCK)
    services = maglev_blocks = members = 0
    too_big = None
    for fe in frontends:
        n = len(fe.backends)
        if n > SLOTS_MAX and too_big is None:
            too_big = fe
        services += 1 + n
        if n and fe.algorithm == Algorithm.MAGLEV:
            maglev_blocks += blocks
        if n and fe.affinity_timeout:
            members += n
    return _Demand(frontends, (services, maglev_blocks, members), too_big)   # the order of _COUNTED


def _keys(frontends: tuple[Frontend, ...], node_addrs: AbstractSet[IPv4Address]) -> dict[str, tuple[Any, ...]]:
    """Per map of distinct keys (_SETS), the keys a Service's frontends need, each once; a map it needs none
    of is absent. The same for the same frontends and node addresses."""
    backends: set[L4Addr] = set()
    dsr: set[L4Addr] = set()
    local: set[L4Addr] = set()
    members: set[tuple[L4Addr, L4Addr]] = set()
    views: set[L4Addr] = set()
    for fe in frontends:
        external = fe.kind is not FrontendKind.CLUSTER_IP      # ClusterIPs: no DSR, no reply guard
        every = fe.backends + fe.draining if fe.draining else fe.backends
        backends.update([be.l4 for be in every])
        if external:
            local.update([be.l4 for be in every if be.local])
        if not fe.in_cluster or fe.internal is not None:
            views.add(fe.l4)
        if not fe.local_only and external:
            if fe.kind is FrontendKind.NODEPORT:
                dsr.update(L4Addr(a, fe.l4.port, fe.l4.proto) for a in node_addrs)
                key = L4Addr(ANY_NODE, fe.l4.port, fe.l4.proto)
            else:
                dsr.add(fe.l4)
                key = fe.l4
            members.update((key, be.l4) for be in fe.backends + fe.draining if be.local)
    return {name: tuple(keys) for name, keys in ((BACKENDS, backends), (DSR, dsr), (LOCAL, local),
                                                 (DSR_MEMBERS, members), (VIEWS, views)) if keys}


def by_service(state: DesiredState) -> Mapping[str, tuple[Frontend, ...]]:
    """The state's frontends grouped by Service (the translator's grouping when it made one)."""
    if state.by_service:
        return state.by_service
    out: dict[str, list[Frontend]] = {}
    for fe in state.frontends.values():
        out.setdefault(fe.service, []).append(fe)
    return {k: tuple(v) for k, v in out.items()}


class Budget:
    """Decides, sync after sync, which Services fit the maps. It keeps each Service's demand and the totals,
    so a sync where everything fits costs only the Services that changed; the oldest-first admission runs
    only when the totals exceed a map."""

    def __init__(self) -> None:
        self._context: tuple[frozenset[IPv4Address], int] | None = None
        self._reset()

    def _reset(self) -> None:
        self._demands: dict[str, _Demand] = {}
        self._counts: dict[str, int] = dict.fromkeys(_COUNTED, 0)
        self._refs: dict[str, Counter[Any]] = {name: Counter() for name in _SETS}
        self._too_big_services: set[str] = set()
        self._refused: set[str] = set()          # refused by the last fit
        self._seen = -2                          # the generation of the last state fitted

    def _add(self, svc: str, d: _Demand, sign: int) -> None:
        for name, n in zip(_COUNTED, d.counts, strict=True):
            self._counts[name] += sign * n
        assert self._context is not None
        for name, keys in _keys(d.frontends, self._context[0]).items():
            refs = self._refs[name]
            if sign > 0:
                refs.update(keys)           # counted in C
                continue
            for k in keys:
                left = refs[k] - 1
                if left:
                    refs[k] = left
                else:
                    del refs[k]
        if d.too_big is not None:
            (self._too_big_services.add if sign > 0 else self._too_big_services.discard)(svc)

    def fit(self, state: DesiredState, node_addrs: Iterable[IPv4Address],
            capacity: Mapping[str, int]) -> tuple[DesiredState, list[Refusal]]:
        """The state without the Services that do not fit (the same object when all do), and the refusals.
        Its changes (when the state says what changed) include the frontends of Services admitted or refused
        since the last fit."""
        context = (frozenset(node_addrs), state.settings.maglev_table_size)
        if context != self._context:
            self._reset()        # node addresses or the table size changed: every demand does
            self._context = context
        groups = by_service(state)
        demands = self._demands
        if state.services_changed is not None and state.base == self._seen:
            candidates: Iterable[str] = state.services_changed
        else:
            candidates = [*[s for s in demands if s not in groups], *groups]
        for svc in candidates:
            d = demands.get(svc)
            fes = groups.get(svc)
            if d is not None and d.frontends is fes:
                continue
            if d is not None:
                self._add(svc, demands.pop(svc), -1)
            if fes is not None:
                d = demands[svc] = _demand(fes, context[1])
                self._add(svc, d, +1)
        self._seen = state.generation
        fits = all(self._counts[n] <= capacity[n] for n in _COUNTED if capacity.get(n)) and \
            all(len(self._refs[n]) <= capacity[n] for n in _SETS if capacity.get(n))
        refusals = [self._too_big(svc, demands[svc]) for svc in sorted(self._too_big_services)] if fits \
            else self._admit(state, capacity)
        out = {r.service for r in refusals}
        flipped, self._refused = out ^ self._refused, out
        if state.changes is not None:
            for svc in flipped:
                d = demands.get(svc)
                state.changes.update(fe.l4 for fe in (groups.get(svc) or (d.frontends if d else ())))
        if not refusals:
            return state, []
        frontends = {l4: fe for l4, fe in state.frontends.items() if fe.service not in out}
        groups = {svc: fes for svc, fes in groups.items() if svc not in out}
        return replace(state, frontends=frontends, by_service=groups), refusals

    @staticmethod
    def _too_big(svc: str, d: _Demand) -> Refusal:
        fe = d.too_big
        assert fe is not None
        return Refusal(svc, SERVICES, _FIELD[BACKENDS],
                       f"{len(fe.backends):,} endpoints for frontend {fe.l4}; a Service port holds at most "
                       f"{SLOTS_MAX:,} (the datapath's slot numbers are 16 bits); the Service is not programmed, "
                       f"every other Service is")

    def _admit(self, state: DesiredState, capacity: Mapping[str, int]) -> list[Refusal]:
        """Oldest first, each Service if it fits what the ones before it left."""
        rank = state.service_rank
        assert self._context is not None
        node_addrs = self._context[0]
        used = dict.fromkeys(_COUNTED, 0)
        taken: dict[str, set[Any]] = {name: set() for name in _SETS}
        refusals: list[Refusal] = []
        for svc in sorted(self._demands, key=lambda s: (rank.get(s, ""), s)):
            d = self._demands[svc]
            if d.too_big is not None:
                refusals.append(self._too_big(svc, d))
                continue
            short: tuple[str, int, int] | None = None       # map, needed, left
            for name, need in zip(_COUNTED, d.counts, strict=True):
                cap = capacity.get(name)
                if cap and used[name] + need > cap:
                    short = (name, need, cap - used[name])
                    break
            fresh: dict[str, frozenset[Any]] = {}
            if short is None:
                sets = _keys(d.frontends, node_addrs)
                for name in _SETS:
                    cap = capacity.get(name)
                    fresh[name] = frozenset(sets.get(name, ())).difference(taken[name]) if cap else frozenset()
                    if cap and len(taken[name]) + len(fresh[name]) > cap:
                        short = (name, len(fresh[name]), cap - len(taken[name]))
                        break
            if short is not None:
                name, need, left = short
                refusals.append(Refusal(svc, name, _FIELD[name], (
                    f"needs {need:,} more entries of map {name} and {max(left, 0):,} of its {capacity[name]:,} "
                    f"are left after the Services admitted before it (oldest first); the Service is not "
                    f"programmed, every other Service is")))
                continue
            for name, need in zip(_COUNTED, d.counts, strict=True):
                used[name] += need
            for name in _SETS:
                taken[name] |= fresh.get(name, frozenset())
        return refusals
