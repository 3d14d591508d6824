"""Turn a Snapshot of raw Kubernetes objects into the DesiredState of one node, with kube-proxy semantics: the
entry point (translate), the settings and the node's addresses; fields.py validates fields, endpoints.py reads the
EndpointSlices, frontends.py the Services."""

from __future__ import annotations

import bisect
import gc
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.endpoints import SERVICE_NAME_LABEL, SliceEntry, read_slice
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
    SERVICE_PROXY_NAME_LABEL,
    Claim,
    _Context,
    _translate_service,
    conflict,
)
from bpflb.model.settings import decode_agent_config
from bpflb.model.types import (
    AgentSettings,
    DesiredState,
    Frontend,
    L4Addr,
    Problem,
)
from bpflb.sources.base import KubeObject, Snapshot

__all__ = ["DEFAULT_AFFINITY_TIMEOUT", "DEFAULT_NAMESPACE", "LB_ALGORITHM_ANNOTATION", "MAX_AFFINITY_TIMEOUT",
           "NODEPORT_MAX", "NODEPORT_MIN", "SERVICE_NAME_LABEL", "SERVICE_PROXY_NAME_LABEL", "parse_settings",
           "translate"]


# ---------------------------------------------------------------------------------------------------------
# Settings


def parse_settings(config: dict[str, str] | None) -> tuple[AgentSettings, list[Problem]]:
    """Read the agent ConfigMap data into AgentSettings through the one schema (bpflb.model.settings); an
    invalid value keeps its default (Deckhouse's: bpfLBMode Hybrid, lbAlgorithm Random, maglevTableSize
    16381, maglevHashSeed 0) and is a Problem."""
    config_, problems = decode_agent_config(config)
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
    externalIPs (IPv6 ignored). Bad input is skipped at the smallest unit that holds it (an address, a
    Service port, a Service, an EndpointSlice) and reported in state.problems; everything else still
    works. Two Services wanting the same frontend: the one whose "namespace/name" sorts first keeps it.

    Settings: an invalid bpfLBMode or lbAlgorithm in the agent ConfigMap is a Problem and that setting
    keeps its default (Hybrid, Random) in state.settings (look for problems whose obj is settings.CONFIG_OBJECT).

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

    raw: KubeObject
    slices: tuple[SliceEntry, ...]
    key: str
    created: str
    claims: list[Claim]
    problems: list[Problem]


def _same(a: KubeObject, b: KubeObject) -> bool:
    """The same object for the translation: the same dict (sources hand unchanged objects over as they
    were), or the same resourceVersion of the same object (a re-list)."""
    if a is b:
        return True
    meta_a, meta_b = a.get("metadata"), b.get("metadata")
    if not isinstance(meta_a, dict) or not isinstance(meta_b, dict):
        return False
    rv = meta_a.get("resourceVersion")
    return bool(rv) and rv == meta_b.get("resourceVersion") and meta_a.get("uid") == meta_b.get("uid") \
        and meta_a.get("name") == meta_b.get("name") and meta_a.get("namespace") == meta_b.get("namespace")


class Translator:
    """translate() with a memory, for the agent: it keeps every Service's and EndpointSlice's translation and
    redoes only those whose objects changed since the last snapshot (a different object, or another
    resourceVersion), the Services whose EndpointSlices changed, and the frontends two Services compete for.
    The result equals translate()'s, frontends in another order; unchanged Services keep their Frontend objects,
    which is how the budget and the map programming below see what changed.

    The cyclic garbage collector is paused while it runs (and restored after): the result is hundreds of
    thousands of acyclic objects for a large cluster, and full collections over the caller's snapshot
    would otherwise double the run time."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._config: tuple[dict[str, str] | None, AgentSettings, list[Problem]] | None = None
        self._context: tuple[tuple[IPv4Address, ...], AgentSettings] | None = None
        self._slices: dict[str, SliceEntry] = {}                      # by namespace/name
        self._by_svc: dict[tuple[str, str], dict[str, SliceEntry]] = {}
        self._services: dict[str, _Service] = {}
        self._claims: dict[L4Addr, list[tuple[str, int, Claim]]] = {}  # (service, claim index, claim), sorted
        self._frontends: dict[L4Addr, Frontend] = {}
        self._conflicts: dict[L4Addr, list[Problem]] = {}
        self._owned: dict[str, tuple[Frontend, ...]] = {}

    def translate(self, snapshot: Snapshot) -> DesiredState:
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._translate(snapshot)
        finally:
            if paused:
                gc.enable()

    def _settings(self, config: dict[str, str] | None) -> tuple[AgentSettings, list[Problem]]:
        if self._config is None or self._config[0] != config:
            settings, problems = parse_settings(config)
            self._config = (None if config is None else dict(config), settings, problems)
        return self._config[1], list(self._config[2])

    def _translate(self, snapshot: Snapshot) -> DesiredState:
        node_name = self.node_name
        settings, problems = self._settings(snapshot.config)
        node_addrs = _node_addrs(snapshot, node_name, problems)
        if node_addrs is None:
            problems.append(Problem(f"Node {node_name}", "metadata.name",
                                    "not found in the snapshot; no frontends are programmed for this node"))
            return DesiredState(node_name, (), problems=problems, settings=settings)
        if self._context != (node_addrs, settings):
            self._context = (node_addrs, settings)
            for key in list(self._services):
                self._forget(key)
        dirty = self._read_slices(snapshot.endpointslices, problems)
        ctx = _Context(node_name, node_addrs, settings, [])

        metas: dict[str, tuple[_Meta, KubeObject]] = {}
        for i, raw in enumerate(snapshot.services):
            known = self._services.get(self._key_of(raw))
            if known is not None and known.raw is raw and known.key not in metas:
                metas[known.key] = (None, raw)  # type: ignore[assignment]   # unchanged: no need to re-read
                continue
            meta = _meta("Service", raw, i, problems)
            if meta is None:
                continue
            if meta.key in metas:
                problems.append(Problem(f"Service {meta.key}", "metadata.name",
                                        "duplicate object with the same namespace/name; only the first is used"))
                continue
            metas[meta.key] = (meta, raw)
        for key in [k for k in self._services if k not in metas]:
            self._forget(key)
        for key, (meta, raw) in metas.items():
            known = self._services.get(key)
            ns_name = tuple(key.split("/", 1))
            slices = self._by_svc.get(ns_name, {})          # type: ignore[arg-type]
            if known is not None and _same(known.raw, raw) and key not in dirty and \
                    len(known.slices) == len(slices) and all(s is slices.get(s.key or "") for s in known.slices):
                known.raw = raw
                continue
            if meta is None:
                meta = _meta("Service", raw, 0, problems)
                assert meta is not None
            ctx.problems = []
            ordered = tuple(slices[k] for k in sorted(slices))
            claims = _translate_service(meta, raw, [s.parsed for s in ordered if s.parsed is not None],
                                        bool(slices), ctx)
            created = (raw.get("metadata") or {}).get("creationTimestamp")
            self._forget(key)
            self._services[key] = _Service(raw, ordered, key, created if isinstance(created, str) else "",
                                           claims, ctx.problems)
            self._claim(key, claims)

        for key in sorted(self._services):
            problems += self._services[key].problems
        for l4 in sorted(self._conflicts):
            problems += self._conflicts[l4]
        return DesiredState(node_name, node_addrs, frontends=dict(self._frontends), problems=problems,
                            settings=settings, by_service=dict(self._owned),
                            service_rank={k: s.created for k, s in self._services.items()})

    def service_uid(self, key: str) -> str | None:
        """metadata.uid of the Service namespace/name as last translated (for Events about it)."""
        known = self._services.get(key)
        uid = (known.raw.get("metadata") or {}).get("uid") if known is not None else None
        return uid if isinstance(uid, str) else None

    @staticmethod
    def _key_of(raw: Any) -> str:
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        if not isinstance(meta, dict):
            return ""
        return f"{meta.get('namespace') or DEFAULT_NAMESPACE}/{meta.get('name')}"

    def _read_slices(self, raws: list[KubeObject], problems: list[Problem]) -> set[str]:
        """Bring the EndpointSlice index up to date; return the Services ("namespace/name") whose slices changed."""
        dirty: set[str] = set()
        seen: dict[str, SliceEntry] = {}
        for i, raw in enumerate(raws):
            known = self._slices.get(self._key_of(raw))
            if known is not None and known.raw is raw:
                entry = known
            elif known is not None and isinstance(raw, dict) and _same(known.raw, raw):
                known.raw = raw
                entry = known
            else:
                entry = read_slice(raw, i)
            if entry.key is None:
                problems += entry.problems
                continue
            if entry.key in seen:
                problems.append(Problem(f"EndpointSlice {entry.key}", "metadata.name",
                                        "duplicate object with the same namespace/name; only the first is used"))
                continue
            seen[entry.key] = entry
        for key, entry in self._slices.items():
            if seen.get(key) is not entry:
                self._unindex(entry, dirty)
        for key, entry in seen.items():
            if self._slices.get(key) is not entry and entry.service is not None:
                self._by_svc.setdefault(entry.service, {})[key] = entry
                dirty.add("/".join(entry.service))
            problems += entry.problems
        self._slices = seen
        return dirty

    def _unindex(self, entry: SliceEntry, dirty: set[str]) -> None:
        if entry.service is None or entry.key is None:
            return
        mine = self._by_svc.get(entry.service)
        if mine is not None and mine.get(entry.key) is entry:
            del mine[entry.key]
            if not mine:
                del self._by_svc[entry.service]
        dirty.add("/".join(entry.service))

    # -- frontends two Services compete for ---------------------------------------------------------------
    def _forget(self, key: str) -> None:
        """Take a Service's claims back (it changed or is gone)."""
        known = self._services.pop(key, None)
        if known is None:
            return
        touched = []
        for claim in known.claims:
            entries = self._claims.get(claim.l4)
            if entries is not None:
                entries[:] = [e for e in entries if e[0] != key]
                touched.append(claim.l4)
        self._settle(touched, {key})

    def _claim(self, key: str, claims: list[Claim]) -> None:
        for i, claim in enumerate(claims):
            bisect.insort(self._claims.setdefault(claim.l4, []), (key, i, claim), key=lambda e: (e[0], e[1]))
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
                self._frontends.pop(l4, None)
                self._conflicts.pop(l4, None)
                continue
            first_key, _, first = entries[0]
            self._frontends[l4] = first.frontend
            services.add(first_key)
            lost = [conflict(k, c, first_key, first.port_index) for k, _, c in entries[1:]
                    if not (k == first_key and c.port_index == first.port_index)]
            if lost:
                self._conflicts[l4] = lost
            else:
                self._conflicts.pop(l4, None)
        for key in services:
            known = self._services.get(key)
            owned = tuple(dict.fromkeys(c.frontend for c in known.claims
                                        if self._frontends.get(c.l4) is c.frontend)) if known else ()
            if owned:
                self._owned[key] = owned
            else:
                self._owned.pop(key, None)
