"""Turn a Snapshot of raw Kubernetes objects into the DesiredState of one node, with kube-proxy semantics."""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.maglev import SEED_MAX, TABLE_SIZES
from bpflb.model.messages import json_kind as _type_name
from bpflb.model.messages import show as _show
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Problem,
    Proto,
)
from bpflb.sources.base import AGENT_CONFIG_NAME, AGENT_CONFIG_NAMESPACE, KubeObject, Snapshot

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
CONFIG_MODE_KEY = "bpfLBMode"
CONFIG_ALGORITHM_KEY = "lbAlgorithm"
CONFIG_MAGLEV_TABLE_SIZE_KEY = "maglevTableSize"
CONFIG_MAGLEV_SEED_KEY = "maglevHashSeed"
CONFIG_OBJECT = f"ConfigMap {AGENT_CONFIG_NAMESPACE}/{AGENT_CONFIG_NAME}"

NODEPORT_MIN = 30000
NODEPORT_MAX = 32767
DEFAULT_AFFINITY_TIMEOUT = 10800          # seconds, Kubernetes' default for sessionAffinity: ClientIP
MAX_AFFINITY_TIMEOUT = 86400              # the API server's upper bound
DEFAULT_NAMESPACE = "default"             # what kubectl applies a namespace-less manifest to

_ALGORITHMS_BY_CONFIG = {"Random": Algorithm.RANDOM, "Maglev": Algorithm.MAGLEV}
_ALGORITHMS_BY_ANNOTATION = {"random": Algorithm.RANDOM, "maglev": Algorithm.MAGLEV}
_PROTOS = {"TCP": Proto.TCP, "UDP": Proto.UDP}
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_LIMITED_BROADCAST = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Validation helpers: each returns the checked value or raises _Invalid(field, reason); callers turn that
# into a Problem for the object at hand and skip the smallest unit that contains the bad field.


class _Invalid(Exception):
    """A field that cannot be used: where it is and what was expected instead of what was given."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _got(value: Any) -> str:
    """Return 'got <value> (<its type>)', or 'got null' for an absent value."""
    return "got null" if value is None else f"got {_show(value)} ({_type_name(value)})"


def _join(prefix: str, field: str) -> str:
    """Return the path of a field relative to prefix ("" is prefix itself)."""
    return f"{prefix}.{field}" if field else prefix


def _mapping(value: Any, field: str, *, required: bool = False) -> dict[str, Any]:
    """Return a mapping field; absent/null is an empty mapping unless required (a list item, say)."""
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(field, f"must be a mapping; {_got(value)}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    """Return a list field; absent/null is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(field, f"must be a list; {_got(value)}")
    return value


def _str(value: Any, field: str, default: str) -> str:
    """Return a string field; absent/null is the default."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise _Invalid(field, f"must be a string; {_got(value)}")
    return value


def _bool(value: Any, field: str, default: bool) -> bool:
    """Return a boolean field; absent/null is the default."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(field, f"must be true or false; {_got(value)}")
    return value


def _int(value: Any, field: str, low: int, high: int) -> int:
    """Return an integer field that must be present and within low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(field, f"must be an integer in {low}..{high}; {_got(value)}")
    if not low <= value <= high:
        raise _Invalid(field, f"must be an integer in {low}..{high}; got {value}")
    return value


def _proto(value: Any, field: str) -> Proto:
    """Return a Kubernetes protocol field (absent means TCP); SCTP and anything else are refused."""
    if value is None:
        return Proto.TCP
    proto = _PROTOS.get(value) if isinstance(value, str) else None
    if proto is not None:
        return proto
    if value == "SCTP":
        raise _Invalid(field, "SCTP is not supported; expected TCP or UDP")
    raise _Invalid(field, f"expected TCP or UDP; {_got(value)}")


def _ipv4_int(value: Any, field: str, role: str) -> int | None:
    """Return an IPv4 address as an integer, None for a well-formed IPv6 one (IPv4 only for now: no error).

    inet_pton plus the round trip accept exactly the canonical dotted quad, as ipaddress does, at a fraction
    of its cost (this runs once per endpoint address).
    """
    if not isinstance(value, str):
        raise _Invalid(field, f"must be an IP address string; {_got(value)}")
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
        if socket.inet_ntop(socket.AF_INET, packed) != value:
            raise ValueError(value)
    except (OSError, ValueError):
        try:
            socket.inet_pton(socket.AF_INET6, value)
        except (OSError, ValueError):
            raise _Invalid(field, f"not a valid IP address; got {_show(value)}") from None
        return None
    number = int.from_bytes(packed, "big")
    top = number >> 24
    if number == 0 or top == 127 or top >> 4 == 14 or number == _LIMITED_BROADCAST:
        raise _Invalid(field, f"{value} cannot be used as {role}; expected a unicast, non-loopback address")
    return number


def _ipv4(value: Any, field: str, role: str) -> IPv4Address | None:
    """Return an IPv4 address, None for a well-formed IPv6 one (IPv4 only for now, not an error)."""
    number = _ipv4_int(value, field, role)
    return None if number is None else IPv4Address(number)


@dataclass(frozen=True, slots=True)
class _Meta:
    """The identity part of an object's metadata, already checked."""

    namespace: str
    name: str
    labels: dict[str, Any]
    annotations: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _meta(kind: str, obj: Any, index: int, problems: list[Problem]) -> _Meta | None:
    """Check a namespaced object's metadata; None (with a Problem) when the whole object must be skipped."""
    if not isinstance(obj, dict):
        problems.append(Problem(f"{kind} #{index}", "(object)", f"must be a mapping; {_got(obj)}"))
        return None
    raw = obj.get("metadata")
    namespace = DEFAULT_NAMESPACE
    if isinstance(raw, dict) and isinstance(raw.get("namespace"), str) and raw["namespace"]:
        namespace = raw["namespace"]
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name:
        reason = "missing" if name is None else f"must be a non-empty string; {_got(name)}"
        problems.append(Problem(f"{kind} {namespace}/<unnamed #{index}>", "metadata.name",
                                f"{reason}; the object is skipped"))
        return None
    try:
        metadata = _mapping(raw, "metadata")
        _str(metadata.get("namespace"), "metadata.namespace", DEFAULT_NAMESPACE)
        labels = _mapping(metadata.get("labels"), "metadata.labels")
        annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    except _Invalid as bad:
        problems.append(Problem(f"{kind} {namespace}/{name}", bad.field,
                                f"{bad.reason}; the object is skipped"))
        return None
    return _Meta(namespace, name, labels, annotations)


# ---------------------------------------------------------------------------------------------------------
# Settings


def parse_settings(config: dict[str, str] | None) -> tuple[AgentSettings, list[Problem]]:
    """Read the agent ConfigMap data into AgentSettings; an invalid value keeps its default and is a Problem.

    Absent keys (or an absent ConfigMap) mean the defaults: bpfLBMode SNAT, lbAlgorithm Random,
    maglevTableSize 16381, maglevHashSeed 0. Unknown keys are left alone (other components may read them).
    """
    problems: list[Problem] = []
    mode = Mode.SNAT
    algorithm = Algorithm.RANDOM
    if config is None:
        return AgentSettings(mode, algorithm), problems
    if not isinstance(config, dict):
        problems.append(Problem(CONFIG_OBJECT, "data", f"must be a mapping of strings; {_got(config)}"))
        return AgentSettings(mode, algorithm), problems
    defaults = AgentSettings()

    raw_mode = config.get(CONFIG_MODE_KEY)
    if raw_mode is not None:
        parsed_mode = next((m for m in Mode if isinstance(raw_mode, str) and m.label == raw_mode), None)
        if parsed_mode is None:
            problems.append(Problem(CONFIG_OBJECT, f"data.{CONFIG_MODE_KEY}",
                                    f"must be one of SNAT, DSR, Hybrid; got {_show(raw_mode)}"))
        else:
            mode = parsed_mode

    raw_alg = config.get(CONFIG_ALGORITHM_KEY)
    if raw_alg is not None:
        parsed_alg = _ALGORITHMS_BY_CONFIG.get(raw_alg) if isinstance(raw_alg, str) else None
        if parsed_alg is None:
            problems.append(Problem(CONFIG_OBJECT, f"data.{CONFIG_ALGORITHM_KEY}",
                                    f"must be one of Random, Maglev; got {_show(raw_alg)}"))
        else:
            algorithm = parsed_alg

    table_size = _config_int(config, CONFIG_MAGLEV_TABLE_SIZE_KEY, defaults.maglev_table_size, problems,
                             allowed=TABLE_SIZES)
    seed = _config_int(config, CONFIG_MAGLEV_SEED_KEY, defaults.maglev_seed, problems, high=SEED_MAX)
    return AgentSettings(mode, algorithm, maglev_table_size=table_size, maglev_seed=seed), problems


def _config_int(config: dict[str, Any], key: str, default: int, problems: list[Problem], *,
                allowed: tuple[int, ...] = (), high: int = 0) -> int:
    """Return an integer ConfigMap value (a decimal string, or an integer in a hand-written file) that is one
    of `allowed`, or in 0..high; absent means the default, anything else is a Problem and the default."""
    raw = config.get(key)
    if raw is None:
        return default
    expected = (f"one of {', '.join(map(str, allowed))}" if allowed else f"an integer in 0..{high}")
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        value = int(raw.strip())
    if value is None or (value not in allowed if allowed else not 0 <= value <= high):
        problems.append(Problem(CONFIG_OBJECT, f"data.{key}",
                                f"must be {expected}; got {_show(raw)}; the default {default} is used"))
        return default
    return value


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
# EndpointSlices


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


# ---------------------------------------------------------------------------------------------------------
# Services


@dataclass(frozen=True, slots=True)
class _Owner:
    """Who claimed a frontend first: the Service and the index of its port."""

    service: str
    port_index: int


@dataclass
class _Context:
    node_name: str
    node_addrs: tuple[IPv4Address, ...]
    settings: AgentSettings
    index: _SliceIndex
    frontends: dict[L4Addr, Frontend]
    owners: dict[L4Addr, _Owner]
    problems: list[Problem]


def _frontend_ips(values: list[Any], field: str, ip_key: str | None, obj: str,
                  problems: list[Problem]) -> Iterator[tuple[IPv4Address, str]]:
    """Yield (IPv4 address, its field path) from spec.externalIPs or status.loadBalancer.ingress."""
    for i, value in enumerate(values):
        path = f"{field}[{i}]"
        try:
            if ip_key is not None:
                entry = _mapping(value, path, required=True)
                if entry.get("ipMode") == "Proxy":
                    continue    # the load balancer proxies to the nodes; packets never carry this address
                value = entry.get(ip_key)
                if value is None:
                    continue    # a hostname-only ingress
                path = f"{path}.{ip_key}"
            addr = _ipv4(value, path, "a frontend address")
        except _Invalid as bad:
            problems.append(Problem(obj, bad.field, bad.reason))
            continue
        if addr is not None:
            yield addr, path


# -- ClusterIP (issue 13) ----------------------------------------------------------------------------------


def _cluster_ips(spec: dict[str, Any], obj: str, problems: list[Problem]) -> list[tuple[IPv4Address, str]]:
    """The Service's IPv4 clusterIP with its field path: spec.clusterIPs (dual-stack: at most one per family)
    or else spec.clusterIP; unset (""), IPv6 and None-valued entries give nothing, bad ones a Problem."""
    values = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    paths = [f"spec.clusterIPs[{i}]" for i in range(len(values))]
    if not values:
        values, paths = [spec.get("clusterIP")], ["spec.clusterIP"]
    out: list[tuple[IPv4Address, str]] = []
    for value, path in zip(values, paths, strict=True):
        if value is None or value == "":
            continue
        try:
            addr = _ipv4(value, path, "a clusterIP")
        except _Invalid as bad:
            problems.append(Problem(obj, bad.field, bad.reason))
            continue
        if addr is not None and all(addr != a for a, _ in out):
            out.append((addr, path))
    return out


def _policy(spec: dict[str, Any], field: str) -> bool:
    """True for a traffic policy field set to Local; Cluster (the default) is False."""
    policy = _str(spec.get(field), f"spec.{field}", "Cluster")
    if policy not in ("Cluster", "Local"):
        raise _Invalid(f"spec.{field}", f"expected Cluster or Local; got {_show(policy)}")
    return policy == "Local"


# ---------------------------------------------------------------------------------------------------------


def _translate_service(meta: _Meta, raw: KubeObject, ctx: _Context) -> None:
    obj = f"Service {meta.key}"
    if SERVICE_PROXY_NAME_LABEL in meta.labels:
        return                  # another proxy's Service
    try:
        spec = _mapping(raw.get("spec"), "spec")
        if spec.get("clusterIP") == "None":
            return              # headless: nothing to balance
        kind = _str(spec.get("type"), "spec.type", "ClusterIP")
        if kind not in _SERVICE_TYPES:
            raise _Invalid("spec.type", f"expected one of {', '.join(_SERVICE_TYPES)}; got {_show(kind)}")
        if kind == "ExternalName":
            return              # a DNS alias, never proxied
        external_ips = _list(spec.get("externalIPs"), "spec.externalIPs")
        local_only = _policy(spec, "externalTrafficPolicy")
        internal_local = _policy(spec, "internalTrafficPolicy")
        cluster_ips = _cluster_ips(spec, obj, ctx.problems)
        affinity_timeout = _affinity_timeout(spec)
        ports = _list(spec.get("ports"), "spec.ports")
        if not ports:
            raise _Invalid("spec.ports", "empty; expected at least one port")
        ingress: list[Any] = []
        if kind == "LoadBalancer":
            status = _mapping(raw.get("status"), "status")
            load_balancer = _mapping(status.get("loadBalancer"), "status.loadBalancer")
            ingress = _list(load_balancer.get("ingress"), "status.loadBalancer.ingress")
        selector = _mapping(spec.get("selector"), "spec.selector")
    except _Invalid as bad:
        ctx.problems.append(Problem(obj, bad.field, bad.reason + "; the Service is skipped"))
        return

    key = (meta.namespace, meta.name)
    if not selector and key not in ctx.index.claimed:
        ctx.problems.append(Problem(obj, "spec.selector",
                                    "selector-less Service without EndpointSlices; the Service is skipped"))
        return

    algorithm = _algorithm(meta, obj, ctx)
    node_port_field = kind in ("NodePort", "LoadBalancer")
    lb_ips = list(_frontend_ips(ingress, "status.loadBalancer.ingress", "ip", obj, ctx.problems))
    ext_ips = list(_frontend_ips(external_ips, "spec.externalIPs", None, obj, ctx.problems))
    slices = ctx.index.slices.get(key, [])
    used_ports: dict[tuple[str, Proto], int] = {}

    for i, raw_port in enumerate(ports):
        field = f"spec.ports[{i}]"
        try:
            entry = _mapping(raw_port, field, required=True)
            proto = _proto(entry.get("protocol"), f"{field}.protocol")
            name = _str(entry.get("name"), f"{field}.name", "")
            port = _int(entry.get("port"), f"{field}.port", 1, 65535)
            node_port: int | None = None
            if node_port_field and entry.get("nodePort") is not None:
                node_port = _int(entry.get("nodePort"), f"{field}.nodePort", NODEPORT_MIN, NODEPORT_MAX)
            if (name, proto) in used_ports:
                raise _Invalid(f"{field}.name", f"duplicates spec.ports[{used_ports[name, proto]}] "
                               f"(same name {_show(name)} and protocol {proto.name})")
        except _Invalid as bad:
            ctx.problems.append(Problem(obj, bad.field, bad.reason + "; the port is skipped"))
            continue
        used_ports[name, proto] = i

        wanted: list[tuple[L4Addr, FrontendKind, str]] = [
            (L4Addr(a, port, proto), FrontendKind.CLUSTER_IP, path) for a, path in cluster_ips]
        if node_port is not None:
            wanted += [(L4Addr(a, node_port, proto), FrontendKind.NODEPORT, f"{field}.nodePort")
                       for a in ctx.node_addrs]
        wanted += [(L4Addr(a, port, proto), FrontendKind.LOADBALANCER, path) for a, path in lb_ips]
        wanted += [(L4Addr(a, port, proto), FrontendKind.EXTERNAL_IP, path) for a, path in ext_ips]
        if not wanted:
            continue
        # The port's endpoints under each traffic policy its frontends use: the ClusterIP internalTrafficPolicy,
        # the others externalTrafficPolicy (computed once when both are alike).
        views: dict[bool, tuple[tuple[Backend, ...], tuple[Backend, ...], bool]] = {}
        internal: L4Addr | None = None
        owner = _Owner(meta.key, i)
        for l4, fe_kind, path in wanted:
            first = ctx.owners.get(l4)
            if first == owner:
                continue        # e.g. the same address both in externalIPs and in the ingress status
            if first is not None:
                holder = (f"spec.ports[{first.port_index}] of this Service" if first.service == meta.key
                          else f"Service {first.service}")
                ctx.problems.append(Problem(obj, path, f"frontend {l4} is already used by {holder}; skipped"))
                continue
            ctx.owners[l4] = owner
            policy_local = internal_local if fe_kind is FrontendKind.CLUSTER_IP else local_only
            if policy_local not in views:
                views[policy_local] = _backends(slices, name, proto, ctx.node_name, policy_local)
            backends, draining, no_endpoints = views[policy_local]
            ctx.frontends[l4] = Frontend(
                l4=l4, kind=fe_kind, service=meta.key, port_name=name, local_only=policy_local,
                backends=backends, no_endpoints=no_endpoints, algorithm=algorithm,
                affinity_timeout=affinity_timeout, draining=draining,
                internal=None if fe_kind is FrontendKind.CLUSTER_IP else internal)
            if fe_kind is FrontendKind.CLUSTER_IP and internal is None:
                internal = l4


def _affinity_timeout(spec: dict[str, Any]) -> int:
    """Return the ClientIP affinity timeout in seconds, 0 when the Service has no session affinity."""
    affinity = _str(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise _Invalid("spec.sessionAffinity", f"expected None or ClientIP; got {_show(affinity)}")
    config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    return _int(timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 1, MAX_AFFINITY_TIMEOUT)


def _algorithm(meta: _Meta, obj: str, ctx: _Context) -> Algorithm:
    """Return the Service's algorithm annotation, else (also when invalid, with a Problem) the cluster's."""
    value = meta.annotations.get(LB_ALGORITHM_ANNOTATION)
    if value is None:
        return ctx.settings.algorithm
    algorithm = _ALGORITHMS_BY_ANNOTATION.get(value.lower()) if isinstance(value, str) else None
    if algorithm is None:
        ctx.problems.append(Problem(
            obj, f'metadata.annotations["{LB_ALGORITHM_ANNOTATION}"]',
            f"expected random or maglev; got {_show(value)}; the cluster default "
            f"{ctx.settings.algorithm.name.capitalize()} is used"))
        return ctx.settings.algorithm
    return algorithm


# ---------------------------------------------------------------------------------------------------------


def translate(snapshot: Snapshot, node_name: str) -> DesiredState:
    """Return what node_name's datapath should hold for this snapshot; pure, never raises for bad input.

    Frontends: NodePorts on every IPv4 InternalIP/ExternalIP of the node, LoadBalancer ingress IPs and
    externalIPs (IPv6 ignored), and the IPv4 clusterIP (served to in-cluster clients only, with the
    internalTrafficPolicy's endpoints; the other frontends of its port name it as their `internal` view).
    Bad input is skipped at the smallest unit that holds it (an address, a Service port, a Service, an
    EndpointSlice) and reported in state.problems; everything else still works. Two Services wanting the same frontend: the one whose "namespace/name" sorts first keeps it.

    Settings: an invalid bpfLBMode or lbAlgorithm in the agent ConfigMap is a Problem and that setting
    keeps its default (SNAT, Random) in state.settings; the caller decides whether to apply it or keep
    the last valid configuration (look for problems whose obj is CONFIG_OBJECT).

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
    ctx = _Context(node_name, node_addrs, settings, index, {}, {}, problems)

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
    return DesiredState(node_name, node_addrs, frontends=frontends, problems=problems, settings=settings)
