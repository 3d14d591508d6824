"""EndpointSlices for the translation: parsed once into an index by Service, and the backends a node may
pick for a Service port with kube-proxy's rules (ready endpoints; serving-terminating ones when none is
ready; eTP Local on this node only) plus the draining ones that keep their open flows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.fields import (
    _bool,
    _got,
    _int,
    _Invalid,
    _ipv4_int,
    _join,
    _list,
    _mapping,
    _Meta,
    _meta,
    _proto,
    _str,
)
from bpflb.model.messages import show as _show
from bpflb.model.types import Backend, L4Addr, Problem, Proto
from bpflb.sources.base import KubeObject

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"    # another proxy's object
HEADLESS_LABEL = "service.kubernetes.io/headless"                        # a headless Service's object
# kube-proxy watches Services and EndpointSlices with a selector excluding these labels: objects carrying
# either are not load-balanced (their Service is said once by the translation of Services).
IGNORED_LABELS = (SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL)


@dataclass(slots=True)
class _Endpoint:
    """One address of one EndpointSlice endpoint, conditions resolved with the API defaults."""

    ip: int                   # the address as an integer: cheap to hash, unlike IPv4Address
    addr: IPv4Address
    name: str                 # targetRef name, else the address
    node: str | None
    ready: bool
    serving: bool
    terminating: bool


@dataclass(frozen=True, slots=True)
class _Slice:
    ports: dict[tuple[str, Proto], int]     # (port name, protocol) -> backend port; first entry wins
    endpoints: tuple[_Endpoint, ...]


@dataclass
class _SliceIndex:
    """EndpointSlices grouped by (namespace, service name), parsed once."""

    slices: dict[tuple[str, str], list[_Slice]]
    claimed: set[tuple[str, str]]    # services with any slice at all, even one that could not be used


def _index_slices(raw_slices: Iterable[Any], problems: list[Problem]) -> _SliceIndex:
    metas: list[tuple[_Meta, KubeObject]] = []
    for i, raw in enumerate(raw_slices):
        meta = _meta("EndpointSlice", raw, i, problems)
        if meta is not None:
            metas.append((meta, raw))
    metas.sort(key=lambda pair: pair[0].key)

    index = _SliceIndex({}, set())
    seen: set[str] = set()
    for meta, raw in metas:
        obj = f"EndpointSlice {meta.key}"
        if meta.key in seen:
            problems.append(Problem(obj, "metadata.name",
                                    "duplicate object with the same namespace/name; only the first is used"))
            continue
        seen.add(meta.key)
        if any(label in meta.labels for label in IGNORED_LABELS):
            continue            # another proxy's or a headless Service's endpoints
        service = meta.labels.get(SERVICE_NAME_LABEL)
        if not isinstance(service, str) or not service:
            reason = ("missing; expected the name of the Service it belongs to" if service is None
                      else f"must be the name of its Service; {_got(service)}")
            problems.append(Problem(obj, f'metadata.labels["{SERVICE_NAME_LABEL}"]', reason))
            continue
        key = (meta.namespace, service)
        index.claimed.add(key)
        address_type = raw.get("addressType")
        if address_type == "IPv6":
            continue            # IPv4 only for now: a dual-stack Service's IPv6 slice is not an error
        if address_type != "IPv4":
            problems.append(Problem(obj, "addressType", f"expected IPv4; {_got(address_type)}"))
            continue
        parsed = _parse_slice(raw, obj, problems)
        if parsed is not None:
            index.slices.setdefault(key, []).append(parsed)
    return index


def _parse_slice(raw: KubeObject, obj: str, problems: list[Problem]) -> _Slice | None:
    try:
        raw_ports = _list(raw.get("ports"), "ports")
        raw_endpoints = _list(raw.get("endpoints"), "endpoints")
    except _Invalid as bad:
        problems.append(Problem(obj, bad.field, bad.reason))
        return None

    # Field paths are relative ("conditions.ready") and prefixed only when reporting: this loop runs once per
    # endpoint of the cluster, and formatting every path up front would dominate its cost.
    ports: dict[tuple[str, Proto], int] = {}
    for i, raw_port in enumerate(raw_ports):
        try:
            entry = _mapping(raw_port, "", required=True)
            if entry.get("protocol") == "SCTP":
                continue        # matches only SCTP Service ports, which are reported on the Service
            proto = _proto(entry.get("protocol"), "protocol")
            name = _str(entry.get("name"), "name", "")
            port = _int(entry.get("port"), "port", 1, 65535)
        except _Invalid as bad:
            problems.append(Problem(obj, _join(f"ports[{i}]", bad.field), bad.reason))
            continue
        ports.setdefault((name, proto), port)

    endpoints: list[_Endpoint] = []
    for i, raw_endpoint in enumerate(raw_endpoints):
        try:
            entry = _mapping(raw_endpoint, "", required=True)
            conditions = _mapping(entry.get("conditions"), "conditions")
            ready = _bool(conditions.get("ready"), "conditions.ready", True)
            serving = _bool(conditions.get("serving"), "conditions.serving", ready)
            terminating = _bool(conditions.get("terminating"), "conditions.terminating", False)
            node = _str(entry.get("nodeName"), "nodeName", "") or None
            target = _mapping(entry.get("targetRef"), "targetRef")
            target_name = _str(target.get("name"), "targetRef.name", "")
            addresses = _list(entry.get("addresses"), "addresses")
            if not addresses:
                raise _Invalid("addresses", "empty; expected at least one IPv4 address")
        except _Invalid as bad:
            problems.append(Problem(obj, _join(f"endpoints[{i}]", bad.field), bad.reason))
            continue
        for j, text in enumerate(addresses):
            try:
                ip = _ipv4_int(text, "", "a backend address")
                if ip is None:
                    raise _Invalid("", f"an IPv6 address in an IPv4 EndpointSlice; got {_show(text)}")
            except _Invalid as bad:
                problems.append(Problem(obj, f"endpoints[{i}].addresses[{j}]", bad.reason))
                continue
            endpoints.append(
                _Endpoint(ip, IPv4Address(ip), target_name or text, node, ready, serving, terminating))
    return _Slice(ports, tuple(endpoints))


def _backends(slices: list[_Slice], port_name: str, proto: Proto, node_name: str,
              local_only: bool) -> tuple[tuple[Backend, ...], tuple[Backend, ...], bool]:
    """Return (the backends this node may pick for new flows, the draining ones, whether the Service has no
    endpoints at all).

    kube-proxy's rules: ready endpoints; when none is ready, the serving-and-terminating ones. For
    externalTrafficPolicy Local the same rule is applied to this node's endpoints only, while "no
    endpoints" (reject rather than drop) still looks at the whole cluster. Draining: every other endpoint
    still listed (terminating, or not ready) that this node could have picked; it gets no new flow, but
    its open flows continue until it leaves the EndpointSlices.
    """
    chosen: dict[tuple[int, int], _Endpoint] = {}        # (address, port) -> endpoint
    for one in slices:
        port = one.ports.get((port_name, proto))
        if port is None:
            continue
        for ep in one.endpoints:
            seen = chosen.get((ep.ip, port))
            if seen is None or (ep.ready and not seen.ready):   # the same address in two slices: ready wins
                chosen[ep.ip, port] = ep

    no_endpoints = not any(ep.ready or (ep.serving and ep.terminating) for ep in chosen.values())
    pool = [(port, ep) for (_, port), ep in chosen.items() if not local_only or ep.node == node_name]
    eligible = [] if no_endpoints else [(port, ep) for port, ep in pool if ep.ready]
    if not eligible and not no_endpoints:
        eligible = [(port, ep) for port, ep in pool if ep.serving and ep.terminating]
    picked = {(ep.ip, port) for port, ep in eligible}
    backends = [Backend(L4Addr(ep.addr, port, proto), ep.name, ep.node, ep.node == node_name, ep.terminating)
                for port, ep in eligible]
    draining = [Backend(L4Addr(ep.addr, port, proto), ep.name, ep.node, ep.node == node_name, ep.terminating)
                for port, ep in pool if (ep.ip, port) not in picked]
    backends.sort(key=lambda b: (b.name, b.l4))
    draining.sort(key=lambda b: (b.name, b.l4))
    return tuple(backends), tuple(draining), no_endpoints
