"""Turn a Snapshot of raw Kubernetes objects into the DesiredState of one node, with kube-proxy semantics: the
entry point (translate), the settings and the node's addresses; fields.py validates fields, endpoints.py reads the
EndpointSlices, frontends.py the Services."""

from __future__ import annotations

import gc
from ipaddress import IPv4Address

from bpflb.model.endpoints import HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, _index_slices
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
    _Context,
    _translate_service,
)
from bpflb.model.settings import decode_agent_config
from bpflb.model.types import (
    AgentSettings,
    DesiredState,
    Problem,
)
from bpflb.sources.base import KubeObject, Snapshot

__all__ = ["DEFAULT_AFFINITY_TIMEOUT", "DEFAULT_NAMESPACE", "HEADLESS_LABEL", "LB_ALGORITHM_ANNOTATION",
           "MAX_AFFINITY_TIMEOUT",
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
    externalIPs (IPv6 ignored), and the IPv4 clusterIP (served to in-cluster clients only, with the
    internalTrafficPolicy's endpoints; the other frontends of its port name it as their `internal` view).
    Bad input is skipped at the smallest unit that holds it (an address, a Service port, a Service, an
    EndpointSlice) and reported in state.problems; everything else still works. Two Services wanting the
    same frontend: the one whose "namespace/name" sorts first keeps it.

    Settings: an invalid bpfLBMode or lbAlgorithm in the agent ConfigMap is a Problem and that setting
    keeps its default (Hybrid, Random) in state.settings (look for problems whose obj is settings.CONFIG_OBJECT).

    When the node's Node object is absent the state has no frontends and a Problem says so.
    Frontends are in L4Addr order and backends in (name, address) order, whatever the input order, so
    every node computes the same backend order.

    The cyclic garbage collector is paused while it runs (and restored after): the result is hundreds of
    thousands of acyclic objects for a large cluster, and full collections over the caller's snapshot
    would otherwise double the run time.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return _translate(snapshot, node_name)
    finally:
        if paused:
            gc.enable()


def _translate(snapshot: Snapshot, node_name: str) -> DesiredState:
    settings, problems = parse_settings(snapshot.config)
    node_addrs = _node_addrs(snapshot, node_name, problems)
    if node_addrs is None:
        problems.append(Problem(f"Node {node_name}", "metadata.name",
                                "not found in the snapshot; no frontends are programmed for this node"))
        return DesiredState(node_name, (), problems=problems, settings=settings)

    index = _index_slices(snapshot.endpointslices, problems)
    ctx = _Context(node_name, node_addrs, settings, index, {}, {}, problems, [], {})

    services: list[tuple[_Meta, KubeObject]] = []
    for i, raw in enumerate(snapshot.services):
        meta = _meta("Service", raw, i, problems)
        if meta is not None:
            services.append((meta, raw))
    services.sort(key=lambda pair: pair[0].key)          # stable: duplicates keep input order
    seen: set[str] = set()
    for meta, raw in services:
        if meta.key in seen:
            problems.append(Problem(f"Service {meta.key}", "metadata.name",
                                    "duplicate object with the same namespace/name; only the first is used"))
            continue
        seen.add(meta.key)
        _translate_service(meta, raw, ctx)

    frontends = {l4: ctx.frontends[l4] for l4 in sorted(ctx.frontends)}
    return DesiredState(node_name, node_addrs, frontends=frontends, problems=problems, settings=settings,
                        notes=ctx.notes, health_checks=dict(sorted(ctx.health_checks.items())))
