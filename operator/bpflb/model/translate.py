"""Turn a Snapshot of raw Kubernetes objects into the DesiredState of one node, with kube-proxy semantics: the
entry point (translate), the settings and the node's addresses; fields.py validates fields, endpoints.py reads the
EndpointSlices, frontends.py the Services."""

from __future__ import annotations

import bisect
import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import Any

from bpflb.model.endpoints import (
    HEADLESS_LABEL,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    SliceEntry,
    read_slice,
)
from bpflb.model.fields import (
    DEFAULT_NAMESPACE,
    NODEPORT_MAX,
    NODEPORT_MIN,
    _Invalid,
    _ipv4,
    _list,
    _mapping,
    _Meta,
    _meta,
)
from bpflb.model.frontends import (
    DEFAULT_AFFINITY_TIMEOUT,
    LB_ALGORITHM_ANNOTATION,
    MAX_AFFINITY_TIMEOUT,
    Claim,
    _Context,
    _translate_service,
    conflict,
)
from bpflb.model.records import ServiceRecord
from bpflb.model.settings import CONFIG_OBJECT, decode_agent_config
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    DesiredState,
    Frontend,
    HealthCheck,
    L4Addr,
    Problem,
)
from bpflb.sources.base import KubeObject, Snapshot, config_object, object_key

__all__ = ["DEFAULT_AFFINITY_TIMEOUT", "DEFAULT_NAMESPACE", "HEADLESS_LABEL", "LB_ALGORITHM_ANNOTATION",
           "MAX_AFFINITY_TIMEOUT",
           "NODEPORT_MAX", "NODEPORT_MIN", "SERVICE_NAME_LABEL", "SERVICE_PROXY_NAME_LABEL", "parse_settings",
           "translate"]


# ---------------------------------------------------------------------------------------------------------
# Settings


def parse_settings(config: dict[str, str] | None, obj: str = CONFIG_OBJECT) -> tuple[AgentSettings, list[Problem]]:
    """Read the agent ConfigMap data into AgentSettings through the one schema (bpflb.model.settings); an
    invalid value keeps its default (Deckhouse's: bpfLBMode Hybrid, lbAlgorithm Random, maglevTableSize
    16381, maglevHashSeed 0) and is a Problem of obj (the ConfigMap, where it is)."""
    config_, problems = decode_agent_config(config, obj)
    return config_.agent_settings(), problems


# ---------------------------------------------------------------------------------------------------------
# Node


def _node_addrs(snapshot: Snapshot, node_name: str,
                problems: list[Problem]) -> tuple[IPv4Address, ...] | None:
    """Return this node's IPv4 InternalIPs then ExternalIPs (deduplicated), None when its Node is absent."""
    node = next((n for n in snapshot.nodes
                 if isinstance(n, dict) and isinstance(n.get("metadata"), dict)
                 and n["metadata"].get("name") == node_name), None)
    if node is None:
        return None
    obj = f"Node {node_name}"
    try:
        status = _mapping(node.get("status"), "status")
        entries = _list(status.get("addresses"), "status.addresses")
    except _Invalid as bad:
        problems.append(Problem(obj, bad.field, bad.reason))
        return ()
    found: dict[str, list[IPv4Address]] = {"InternalIP": [], "ExternalIP": []}
    for i, entry in enumerate(entries):
        field = f"status.addresses[{i}]"
        try:
            entry = _mapping(entry, field, required=True)
            kind = entry.get("type")
            if kind not in found:
                continue        # Hostname, InternalDNS, ExternalDNS: not addresses packets arrive on
            addr = _ipv4(entry.get("address"), f"{field}.address", "a node address")
        except _Invalid as bad:
            problems.append(Problem(obj, bad.field, bad.reason))
            continue
        if addr is not None:
            found[kind].append(addr)
    addrs = tuple(dict.fromkeys(found["InternalIP"] + found["ExternalIP"]))
    if not addrs:
        problems.append(Problem(obj, "status.addresses",
                                "no IPv4 InternalIP or ExternalIP; NodePort frontends cannot be programmed"))
    return addrs


# ---------------------------------------------------------------------------------------------------------


def translate(snapshot: Snapshot, node_name: str) -> DesiredState:
    """Return what node_name's datapath should hold for this snapshot; pure, never raises for bad input.

    Frontends: NodePorts on every IPv4 InternalIP/ExternalIP of the node, LoadBalancer ingress IPs and
    externalIPs (IPv6 ignored), and the IPv4 clusterIP (served to in-cluster clients only, with the
    internalTrafficPolicy's endpoints; the other frontends of its port name it as their `internal` view).
    Bad input is skipped at the smallest unit that holds it (an address, a Service port, a Service, an
    EndpointSlice) and reported in state.problems; everything else still works. Two Services wanting the
    same frontend: the one whose "namespace/name" sorts first keeps it.

    Settings: an invalid bpfLBMode or lbAlgorithm in the agent ConfigMap is a Problem and that setting
    keeps its default (Hybrid, Random) in state.settings (look for problems whose obj is the ConfigMap,
    sources.base.config_object(snapshot.config_namespace)).

    When the node's Node object is absent the state has no frontends and a Problem says so.
    Frontends are in L4Addr order and backends in (name, address) order, whatever the input order, so
    every node computes the same backend order.
    """
    state = Translator(node_name).translate(snapshot)
    state.frontends = {l4: state.frontends[l4] for l4 in sorted(state.frontends)}
    return state


@dataclass(slots=True)
class _Service:
    """One Service as last translated: the objects it came from and what it asks for."""

    raw: KubeObject | ServiceRecord       # as the source handed it over (a record stays packed)
    key: str
    created: str
    claims: tuple[Claim, ...]
    problems: Sequence[Problem]           # () when none (10,000 Services: no empty list each)
    notes: Sequence[Problem]
    health: HealthCheck | None


@dataclass(slots=True)
class _Object:
    """One object of a snapshot list, known by its identity: its namespace/name (None when its metadata is
    unusable), its checked metadata (None for a ServiceRecord: read again from its view when translated), and
    the problems reading it gave."""

    raw: Any
    key: str | None
    meta: _Meta | None
    problems: Sequence[Problem]           # () when none
    source: Any = None        # the object as the source handed it over (raw, or what raw was read from)


def _quick_key(raw: Any) -> str | None:
    """namespace/name of a raw object when its metadata is plain (None otherwise: it is read in full)."""
    meta = raw.get("metadata") if type(raw) is dict else None
    if type(meta) is not dict or type(meta.get("name")) is not str:
        return None
    namespace = meta.get("namespace")
    return object_key(namespace if type(namespace) is str else None, meta["name"])


def _service_key(raw: Any) -> str | None:
    """namespace/name of a Service, a record the source packed or a raw object."""
    return raw.key if type(raw) is ServiceRecord else _quick_key(raw)


def _slice_key(raw: Any) -> str | None:
    """namespace/name of an EndpointSlice, a record the source read already or a raw object."""
    return raw.key if type(raw) is SliceEntry else _quick_key(raw)


def _same(a: Any, b: Any) -> bool:
    """The same object for the translation: the same dict (sources hand unchanged objects over as they
    were), or the same resourceVersion of the same object (a re-list); for two ServiceRecords, the same
    resourceVersion and the same packed view (the uid, the name and the namespace in it)."""
    if a is b:
        return True
    if type(a) is ServiceRecord and type(b) is ServiceRecord:
        return bool(a.version) and a.version == b.version and a.key == b.key and a.packed == b.packed
    if type(a) is not dict or type(b) is not dict:
        return False                # (slice records a source read already: the same only when the same record)
    meta_a, meta_b = a.get("metadata"), b.get("metadata")
    if not isinstance(meta_a, dict) or not isinstance(meta_b, dict):
        return False
    rv = meta_a.get("resourceVersion")
    return bool(rv) and rv == meta_b.get("resourceVersion") and meta_a.get("uid") == meta_b.get("uid") \
        and meta_a.get("name") == meta_b.get("name") and meta_a.get("namespace") == meta_b.get("namespace")


class _Objects:
    """The objects of one snapshot list (Services or EndpointSlices) followed by identity: what is new, what
    is gone and which namespace/name each one holds, at the cost of a set comparison (in C) when nothing
    changed. Two objects with one namespace/name: the first in the list is used, the others are Problems."""

    def __init__(self, kind: str, read: Callable[[Any, int], _Object],
                 rebind: Callable[[_Object, Any], None], key: Callable[[Any], str | None] = _quick_key) -> None:
        self.kind = kind
        self.read = read
        self.rebind = rebind
        self.key = key
        self.by_id: dict[int, _Object] = {}
        # The objects (ids) holding each namespace/name: the one id (nearly always), a list when several do.
        self.by_key: dict[str, int | list[int]] = {}
        self.winner: dict[str, _Object] = {}
        self.duplicates: dict[str, Sequence[Problem]] = {}
        self.unnamed: dict[int, Sequence[Problem]] = {}
        self.troubled: set[str] = set()         # namespace/names whose object has problems of its own

    def update(self, raws: list[Any]) -> set[str]:
        """Follow the list; return the namespace/names whose object changed (appeared, went, replaced)."""
        order = list(map(id, raws))
        ids = set(order)
        if len(ids) == len(raws) and ids == self.by_id.keys():
            return set()
        fresh = ids - self.by_id.keys()
        position: dict[int, int] = {}
        if len(ids) != len(raws) or len(fresh) > 8:
            position = dict(zip(order, range(len(order)), strict=True))
        else:
            position = {new: order.index(new) for new in fresh}      # a few: found by a scan in C
        touched: set[str] = set()
        went: dict[str, _Object] = {}
        for gone in self.by_id.keys() - ids:
            obj = self.by_id.pop(gone)
            self.unnamed.pop(gone, None)
            if obj.key is not None:
                held = self.by_key[obj.key]
                if isinstance(held, list):
                    held.remove(gone)
                    if len(held) == 1:
                        self.by_key[obj.key] = held[0]
                else:
                    del self.by_key[obj.key]
                touched.add(obj.key)
                went[obj.key] = obj
        for new in fresh:
            i = position[new]
            raw = raws[i]
            key = self.key(raw)
            old = went.get(key) if key is not None else None
            if old is not None and _same(old.source, raw):
                obj = old                      # another object, the same resourceVersion: a re-list, a replay
                obj.source = raw
                self.rebind(obj, raw)
            else:
                obj = self.read(raw, i)
            self.by_id[new] = obj
            if obj.key is None:
                self.unnamed[new] = obj.problems
            else:
                others = self.by_key.get(obj.key)
                if others is None:
                    self.by_key[obj.key] = new
                elif isinstance(others, list):
                    others.append(new)
                else:
                    self.by_key[obj.key] = [others, new]
                touched.add(obj.key)
        for key in touched:
            holders = self.by_key.get(key)
            if holders is None:
                self.winner.pop(key, None)
                self.duplicates.pop(key, None)
                self.troubled.discard(key)
                continue
            if isinstance(holders, list):              # (two or more)
                if len(position) < len(raws):
                    position = dict(zip(order, range(len(order)), strict=True))
                holders.sort(key=lambda h: position[h])
                self.duplicates[key] = [Problem(f"{self.kind} {key}", "metadata.name",
                                                "duplicate object with the same namespace/name; only the first is "
                                                "used")] * (len(holders) - 1)
            else:
                self.duplicates.pop(key, None)
            self.winner[key] = winner = self.by_id[holders if isinstance(holders, int) else holders[0]]
            if winner.problems:
                self.troubled.add(key)
            else:
                self.troubled.discard(key)
        return touched

    def apply(self, changes: dict[str, Any]) -> set[str] | None:
        """Follow what the source says changed (namespace/name -> the object now, None: deleted) instead of
        comparing the lists: the same result as update() on the list those changes made, at the cost of the
        changes alone. None (nothing done) when they cannot be followed that way (a key holds several objects,
        an object is not named by its key): the caller compares the lists."""
        plan: list[tuple[str, Any, int | None, _Object | None]] = []       # key, raw, the id it replaces, read
        for key, raw in changes.items():
            held = self.by_key.get(key)
            if isinstance(held, list):
                return None
            if raw is None:
                if held is not None:
                    plan.append((key, None, held, None))
                continue
            if held == id(raw):
                continue                        # the object the list held already
            if id(raw) in self.by_id or self.key(raw) != key:
                return None
            old = self.by_id[held] if held is not None else None
            obj = None if old is not None and _same(old.source, raw) else self.read(raw, 0)
            if obj is not None and obj.key != key:
                return None
            plan.append((key, raw, held, obj))
        touched: set[str] = set()
        for key, raw, held, obj in plan:
            touched.add(key)
            if held is not None:
                old = self.by_id.pop(held)
                del self.by_key[key]
                if obj is None and raw is not None:      # another object, the same resourceVersion: a re-list
                    obj = old
                    obj.source = raw
                    self.rebind(obj, raw)
            if raw is None or obj is None:
                self.winner.pop(key, None)
                self.duplicates.pop(key, None)
                self.troubled.discard(key)
                continue
            self.by_id[id(raw)] = obj
            self.by_key[key] = id(raw)
            self.winner[key] = obj
            if obj.problems:
                self.troubled.add(key)
            else:
                self.troubled.discard(key)
        return touched

    def problems(self, own: bool) -> list[Problem]:
        """The problems of reading the list: nameless objects, duplicates, and (own) each object's own."""
        out = [p for key in sorted(self.troubled) if key in self.winner for p in self.winner[key].problems] \
            if own else []
        for found in (self.unnamed, self.duplicates):
            out += [p for probs in found.values() for p in probs]
        return out


def _read_service(raw: Any, index: int) -> _Object:
    problems: list[Problem] = []
    if type(raw) is ServiceRecord:
        # A record: one with a key has plain metadata (read when it is translated); one without, its view says why.
        if raw.key is not None:
            return _Object(raw, raw.key, None, (), raw)
        meta = _meta("Service", raw.view(), index, problems)
        return _Object(raw, None if meta is None else meta.key, None, problems or (), raw)
    meta = _meta("Service", raw, index, problems)
    return _Object(raw, None if meta is None else meta.key, meta, problems or (), raw)


def _rebind_service(obj: _Object, raw: Any) -> None:
    obj.raw = raw


def _read_slice_object(raw: Any, index: int) -> _Object:
    entry = raw if type(raw) is SliceEntry else read_slice(raw, index)    # a record the source read already
    return _Object(entry, entry.key, None, entry.problems, raw)


def _rebind_slice(obj: _Object, raw: Any) -> None:
    obj.raw.raw = raw


class Translator:
    """translate() with a memory, for the agent: it keeps every Service's and EndpointSlice's translation and
    redoes only those whose objects changed since the last snapshot (another object in the list, unless it has
    the same resourceVersion), the Services whose EndpointSlices changed, and the frontends two Services compete
    for. When nothing changed, a sync costs two set comparisons. The result equals translate()'s, frontends in
    another order; unchanged Services keep their Frontend objects, and the state says which frontends and
    Services differ from the previous state this translator made (DesiredState.changes, .base), so the budget
    and the map programming below do only that work too.

    The cyclic garbage collector is paused while it runs (and restored after): the result is hundreds of
    thousands of acyclic objects for a large cluster, and full collections over the caller's snapshot
    would otherwise double the run time."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._config: tuple[tuple[dict[str, str] | None, str], AgentSettings, list[Problem]] | None = None
        self._context: tuple[tuple[IPv4Address, ...], Algorithm, bool, bool] | None = None
        self._service_objs = _Objects("Service", _read_service, _rebind_service, _service_key)
        self._slice_objs = _Objects("EndpointSlice", _read_slice_object, _rebind_slice, _slice_key)
        # Each Service's EndpointSlices: the one entry (nearly always), by slice namespace/name when several.
        self._by_svc: dict[tuple[str, str], SliceEntry | dict[str, SliceEntry]] = {}
        self._slice_svc: dict[str, tuple[str, str]] = {}               # slice namespace/name -> its Service
        self._services: dict[str, _Service] = {}
        self._svc_problems: dict[str, list[Problem]] = {}
        self._svc_notes: dict[str, list[Problem]] = {}
        self._health: dict[str, HealthCheck] = {}                      # healthCheckNodePort asked, by Service
        self._rank: dict[str, str] = {}
        # Who wants each frontend: the one Claim (nearly always; its Service is its frontend's), else a tuple of
        # (service, claim index, claim), sorted.
        self._claims: dict[L4Addr, Claim | tuple[tuple[str, int, Claim], ...]] = {}
        self._frontends: dict[L4Addr, Frontend] = {}
        self._conflicts: dict[L4Addr, list[Problem]] = {}
        self._owned: dict[str, tuple[Frontend, ...]] = {}
        self._owned_view, self._rank_view = MappingProxyType(self._owned), MappingProxyType(self._rank)
        self._generation = 0
        self._changed: set[L4Addr] = set()
        self._changed_services: set[str] = set()
        self._seen: tuple[int, int] | None = None     # (origin, seq) of the snapshot translated last (Changes)

    def translate(self, snapshot: Snapshot) -> DesiredState:
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._translate(snapshot)
        finally:
            if paused:
                gc.enable()

    def _settings(self, config: dict[str, str] | None, obj: str) -> tuple[AgentSettings, list[Problem]]:
        if self._config is None or self._config[0] != (config, obj):
            settings, problems = parse_settings(config, obj)
            self._config = ((None if config is None else dict(config), obj), settings, problems)
        return self._config[1], list(self._config[2])

    def _translate(self, snapshot: Snapshot) -> DesiredState:
        node_name = self.node_name
        settings, problems = self._settings(snapshot.config, config_object(snapshot.config_namespace))
        node_addrs = _node_addrs(snapshot, node_name, problems)
        self._generation += 1
        if node_addrs is None:
            problems.append(Problem(f"Node {node_name}", "metadata.name",
                                    "not found in the snapshot; no frontends are programmed for this node"))
            return DesiredState(node_name, (), problems=problems, settings=settings, generation=self._generation)
        # What every Service's translation depends on (the mode, say, does not: switching it re-translates nothing).
        context = (node_addrs, settings.algorithm, settings.algorithm_annotation, settings.source_range_check)
        whole = self._context != context
        if whole:
            self._context = context
            for key in list(self._services):
                self._forget(key)
        self._changed, self._changed_services = set(), set()
        # What the source says changed, when it follows the snapshot this translator read last: the lists are
        # then not compared (two sets of 10,000 identities at 10,000 Services, most of a one-change sync).
        hint, seen = snapshot.changes, self._seen
        self._seen = None               # (until this translation is through: a failure compares next time)
        if hint is not None and seen != (hint.origin, hint.since):
            hint = None
        dirty = self._update_slices(snapshot.endpointslices, None if hint is None else hint.endpointslices)
        touched = None if hint is None else self._service_objs.apply(hint.services)
        if touched is None:
            touched = self._service_objs.update(snapshot.services)
        todo = dirty | touched if not whole else set(self._service_objs.winner)
        for key in sorted(todo):
            obj = self._service_objs.winner.get(key)
            if obj is None:
                self._forget(key)
                continue
            known = self._services.get(key)
            slices = self._by_svc.get(tuple(key.split("/", 1)))     # type: ignore[arg-type]
            if known is not None and key not in dirty and _same(known.raw, obj.raw):
                known.raw = obj.raw                                       # a re-list: the same object
                continue
            # A record is decoded for its translation alone (the view is not kept: _Service.raw keeps the record).
            raw, meta = obj.raw, obj.meta
            if type(raw) is ServiceRecord:
                raw = raw.view()
                meta = _meta("Service", raw, 0, [], key)
            assert meta is not None
            ctx = _Context(node_name, node_addrs, settings, [])
            ordered = () if slices is None else (slices,) if isinstance(slices, SliceEntry) else \
                tuple(slices[k] for k in sorted(slices))
            claims = _translate_service(meta, raw, [s.parsed for s in ordered if s.parsed is not None],
                                        bool(ordered), ctx)
            created = (raw.get("metadata") or {}).get("creationTimestamp")
            self._forget(key)
            if type(created) is str:
                created = sys.intern(created)        # (decoded afresh from a record: Services share seconds)
            self._services[key] = _Service(obj.raw, key, created if isinstance(created, str) else "",
                                           tuple(claims), ctx.problems or (), ctx.notes or (), ctx.health)
            self._rank[key] = self._services[key].created
            if ctx.problems:
                self._svc_problems[key] = ctx.problems
            if ctx.notes:
                self._svc_notes[key] = ctx.notes
            if ctx.health is not None:
                self._health[key] = ctx.health
            self._claim(key, claims)

        problems += self._slice_objs.problems(own=True) + self._service_objs.problems(own=False)
        for key in sorted(self._svc_problems):
            problems += self._svc_problems[key]
        for l4 in sorted(self._conflicts):
            problems += self._conflicts[l4]
        # healthCheckNodePorts: the first Service (by namespace/name) that asks for a port serves it.
        health: dict[int, HealthCheck] = {}
        for key in sorted(self._health):
            check = self._health[key]
            held = health.get(check.port)
            if held is not None:
                problems.append(Problem(f"Service {key}", "spec.healthCheckNodePort", f"{check.port} is already "
                                        f"served for Service {held.namespace}/{held.name}; not served"))
                continue
            health[check.port] = check
        notes = [n for key in sorted(self._svc_notes) for n in self._svc_notes[key]]
        changes = snapshot.changes
        self._seen = None if changes is None or snapshot.partial else (changes.origin, changes.seq)
        return DesiredState(node_name, node_addrs, frontends=dict(self._frontends), problems=problems,
                            settings=settings, notes=notes, health_checks=dict(sorted(health.items())),
                            by_service=self._owned_view, service_rank=self._rank_view,
                            generation=self._generation, base=self._generation - 1,
                            changes=None if whole else self._changed,
                            services_changed=None if whole else self._changed_services)

    def service_uid(self, key: str) -> str | None:
        """metadata.uid of the Service namespace/name as last translated (for Events about it)."""
        known = self._services.get(key)
        if known is None:
            return None
        if isinstance(known.raw, ServiceRecord):
            return known.raw.uid
        uid = (known.raw.get("metadata") or {}).get("uid")
        return uid if isinstance(uid, str) else None

    def _update_slices(self, raws: list[KubeObject], changes: dict[str, Any] | None = None) -> set[str]:
        """Bring the EndpointSlice index up to date (following changes, the source's account, when given and
        it can); return the Services ("namespace/name") whose slices changed."""
        dirty: set[str] = set()
        objs = self._slice_objs
        touched = None if changes is None else objs.apply(changes)
        for key in objs.update(raws) if touched is None else touched:
            now = objs.winner.get(key)
            entry = now.raw if now is not None else None
            # the entry indexed under this slice's name, if any, goes (its Service may differ from the new one's)
            svc = self._slice_svc.pop(key, None)
            before = None
            if svc is not None:
                mine = self._by_svc[svc]
                if isinstance(mine, SliceEntry):
                    before = mine                   # (the entry indexed under key: the only one)
                    del self._by_svc[svc]
                else:
                    before = mine.pop(key, None)
                    if len(mine) == 1:
                        self._by_svc[svc] = next(iter(mine.values()))
                if before is not entry or (entry is not None and entry.service != svc):
                    dirty.add("/".join(svc))
            owner = entry.service if entry is not None else None
            if entry is not None and owner is not None:
                if before is not entry or owner != svc:
                    dirty.add("/".join(owner))
                held = self._by_svc.get(owner)
                if held is None:
                    self._by_svc[owner] = entry
                elif isinstance(held, SliceEntry):
                    assert held.key is not None             # (indexed: named)
                    self._by_svc[owner] = {held.key: held, key: entry}
                else:
                    held[key] = entry
                self._slice_svc[key] = owner
        return dirty

    # -- frontends two Services compete for ---------------------------------------------------------------
    def _forget(self, key: str) -> None:
        """Take a Service's claims back (it changed or is gone)."""
        known = self._services.pop(key, None)
        self._svc_problems.pop(key, None)
        self._svc_notes.pop(key, None)
        self._health.pop(key, None)
        self._rank.pop(key, None)
        if known is None:
            return
        touched = []
        for claim in known.claims:
            held = self._claims.get(claim.l4)
            if held is None:
                continue
            rest: Claim | tuple[tuple[str, int, Claim], ...]
            if isinstance(held, Claim):
                rest = () if held.frontend.service == key else held
            else:
                rest = tuple([e for e in held if e[0] != key])
                if len(rest) == 1:
                    rest = rest[0][2]
            self._claims[claim.l4] = rest
            touched.append(claim.l4)
        self._settle(touched, {key})

    def _entries(self, held: Claim | tuple[tuple[str, int, Claim], ...]) -> tuple[tuple[str, int, Claim], ...]:
        """A frontend's claims as (service, claim index, claim) tuples."""
        if not isinstance(held, Claim):
            return held
        key = held.frontend.service
        known = self._services[key]
        return ((key, next(i for i, c in enumerate(known.claims) if c is held), held),)

    def _claim(self, key: str, claims: list[Claim]) -> None:
        for i, claim in enumerate(claims):
            held = self._claims.get(claim.l4)
            if not held:                    # nearly always: a frontend only one Service wants
                self._claims[claim.l4] = claim
            else:
                more = list(self._entries(held))
                bisect.insort(more, (key, i, claim), key=lambda e: (e[0], e[1]))
                self._claims[claim.l4] = tuple(more)
        self._settle([c.l4 for c in claims], {key})

    def _settle(self, l4s: list[L4Addr], services: set[str]) -> None:
        """Decide who holds each of these frontends (the first claim), and who must be told it lost."""
        for l4 in dict.fromkeys(l4s):
            entries = self._claims.get(l4)
            old = self._frontends.get(l4)
            if old is not None:
                services.add(old.service)
            if not entries:
                self._claims.pop(l4, None)
                if self._frontends.pop(l4, None) is not None:
                    self._changed.add(l4)
                self._conflicts.pop(l4, None)
                continue
            others: tuple[tuple[str, int, Claim], ...]
            if isinstance(entries, Claim):
                first_key, first, others = entries.frontend.service, entries, ()
            else:
                (first_key, _, first), others = entries[0], entries[1:]
            if old is not first.frontend:
                self._frontends[l4] = first.frontend
                self._changed.add(l4)
            services.add(first_key)
            lost = [conflict(k, c, first_key, first.port_index) for k, _, c in others
                    if not (k == first_key and c.port_index == first.port_index)]
            if lost:
                self._conflicts[l4] = lost
            else:
                self._conflicts.pop(l4, None)
        for key in services:
            known = self._services.get(key)
            # by identity: hashing a Frontend would hash every one of its backends
            owned = tuple({id(c.frontend): c.frontend for c in known.claims
                           if self._frontends.get(c.l4) is c.frontend}.values()) if known else ()
            before = self._owned.get(key)
            if owned:
                if before is None or len(before) != len(owned) or any(a is not b for a, b in zip(before, owned,
                                                                                                 strict=True)):
                    self._owned[key] = owned
                    self._changed_services.add(key)
            elif before is not None:
                del self._owned[key]
                self._changed_services.add(key)
