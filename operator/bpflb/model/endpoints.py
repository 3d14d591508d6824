"""EndpointSlices for the translation: parsed once into an index by Service, and the backends a node may
pick for a Service port with kube-proxy's rules (ready endpoints; serving-terminating ones when none is
ready; eTP Local on this node only) plus the draining ones that keep their open flows."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
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
    name: str                 # targetRef name, else the address
    node: str | None
    ready: bool
    serving: bool
    terminating: bool


@dataclass(slots=True)
class _Slice:
    ports: dict[tuple[str, Proto], int]     # (port name, protocol) -> backend port; first entry wins
    # Its endpoints, unless packed: (addresses, names, nodes), one entry per endpoint, each ready, serving and
    # not terminating (nearly every slice of a large cluster: an object per endpoint costs 6 MiB per 100,000).
    listed: tuple[_Endpoint, ...]
    # Every endpoint ready, each address once: the common slice, whose endpoints are then kept in backend order
    # (name, address) and become backends as they are, with no rule to apply.
    plain: bool = False
    packed: tuple[tuple[int, ...], tuple[str, ...], tuple[str | None, ...]] | None = None
    # A packed slice once translated: the node its backends were made for, then (port name, protocol), its
    # backends, for each port asked so far. They replace the columns (packed is None then): the translation's
    # Backend objects are the record itself, one tuple shared by the slice and every frontend of the port.
    made: tuple[Any, ...] | None = None

    @property
    def columns(self) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str | None, ...]] | None:
        """(addresses, names, nodes) of a packed slice, from its backends once they are made."""
        if self.packed is not None or self.made is None:
            return self.packed
        backends: tuple[Backend, ...] = self.made[2]
        return (tuple([b[0] >> 24 for b in backends]), tuple([b[1] for b in backends]),
                tuple([b[2] for b in backends]))

    @property
    def endpoints(self) -> tuple[_Endpoint, ...]:
        columns = self.columns
        if columns is None:
            return self.listed
        ips, names, nodes = columns
        return tuple(_Endpoint(ip, name, node, True, True, False) for ip, name, node in zip(ips, names, nodes,
                                                                                             strict=True))

    def backends(self, key: tuple[str, Proto], node_name: str) -> tuple[Backend, ...] | None:
        """A packed slice's backends for the port key (None: the slice has no such port), as node_name sees
        them; made once and kept (the columns give way to them), the same tuple every time."""
        port = self.ports.get(key)
        if port is None:
            return None
        made = self.made
        if made is not None and made[0] == node_name:
            for i in range(1, len(made), 2):
                if made[i] == key:
                    return made[i + 1]     # type: ignore[no-any-return]
        columns = self.columns
        assert columns is not None
        ips, names, nodes = columns
        p = int(key[1])
        backends = tuple([_new(Backend, (_int_new(L4Addr, ip << 24 | port << 8 | p), name, node, node == node_name,
                                         False)) for ip, name, node in zip(ips, names, nodes, strict=True)])
        self.made = (node_name, key, backends) if made is None or made[0] != node_name else (*made, key, backends)
        self.packed = None
        return backends


@dataclass(slots=True)
class SliceEntry:
    """One EndpointSlice as read: its namespace/name, the Service it belongs to, its parsed content (None when
    unusable) and its problems. The translator keeps these between syncs, one per slice object."""

    raw: Any                               # the object it was read from (None in the records of slice_record)
    key: str | None                        # namespace/name, None when the metadata is unusable
    service: tuple[str, str] | None        # (namespace, Service name) it belongs to
    parsed: _Slice | None
    problems: Sequence[Problem]            # () when none (a large cluster: no empty list per slice)


def read_slice(raw: Any, index: int) -> SliceEntry:
    """Read one EndpointSlice (index: its position, for the message of a nameless one)."""
    entry = _read_slice(raw, index)
    if not entry.problems:
        entry.problems = ()
    return entry


def _read_slice(raw: Any, index: int) -> SliceEntry:
    problems: list[Problem] = []
    meta = _meta("EndpointSlice", raw, index, problems)
    if meta is None:
        return SliceEntry(raw, None, None, None, problems)
    obj = f"EndpointSlice {meta.key}"
    if any(label in meta.labels for label in IGNORED_LABELS):
        return SliceEntry(raw, meta.key, None, None, problems)   # another proxy's or a headless Service's
    service = meta.labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        reason = ("missing; expected the name of the Service it belongs to" if service is None
                  else f"must be the name of its Service; {_got(service)}")
        problems.append(Problem(obj, f'metadata.labels["{SERVICE_NAME_LABEL}"]', reason))
        return SliceEntry(raw, meta.key, None, None, problems)
    key = (meta.namespace, service)
    address_type = raw.get("addressType")
    parsed = None
    if address_type == "IPv6":
        pass                    # IPv4 only for now: a dual-stack Service's IPv6 slice is not an error
    elif address_type != "IPv4":
        problems.append(Problem(obj, "addressType", f"expected IPv4; {_got(address_type)}"))
    else:
        parsed = _parse_slice(raw, obj, problems)
    return SliceEntry(raw, meta.key, key, parsed, problems)


def slice_record(raw: Any) -> SliceEntry:
    """An EndpointSlice reduced to what the translation uses of it, the decoded object not kept: what the
    Kubernetes source holds of each slice (the translator takes these records as they are)."""
    entry = read_slice(raw, 0)
    entry.raw = None
    return entry


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
    ports = _shared(ports)

    endpoints: list[_Endpoint] = []
    for i, raw_endpoint in enumerate(raw_endpoints):
        fast = _plain_endpoint(raw_endpoint)
        if fast is not None:
            endpoints.append(fast)
            continue
        try:
            entry = _mapping(raw_endpoint, "", required=True)
            conditions = _mapping(entry.get("conditions"), "conditions")
            ready = _bool(conditions.get("ready"), "conditions.ready", True)
            serving = _bool(conditions.get("serving"), "conditions.serving", ready)
            terminating = _bool(conditions.get("terminating"), "conditions.terminating", False)
            node = _str(entry.get("nodeName"), "nodeName", "") or None
            node = sys.intern(node) if node else None
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
            endpoints.append(_Endpoint(ip, target_name or text, node, ready, serving, terminating))
    plain = all(ep.ready for ep in endpoints) and len({ep.ip for ep in endpoints}) == len(endpoints)
    if plain:
        endpoints.sort(key=lambda ep: (ep.name, ep.ip))
        if all(ep.serving and not ep.terminating for ep in endpoints):
            return _Slice(ports, (), True, (tuple([ep.ip for ep in endpoints]), tuple([ep.name for ep in endpoints]),
                                            tuple([ep.node for ep in endpoints])))
    return _Slice(ports, tuple(endpoints), plain)


# The port sets of the slices read (most slices of a cluster list one of a few), each held once: read-only
# once made. Bounded: emptied when it has grown this large (the slices read before keep theirs).
_PORT_SETS: dict[tuple[tuple[tuple[str, Proto], int], ...], dict[tuple[str, Proto], int]] = {}
_PORT_SETS_MAX = 4096


def _shared(ports: dict[tuple[str, Proto], int]) -> dict[tuple[str, Proto], int]:
    key = tuple(ports.items())
    held = _PORT_SETS.get(key)
    if held is None:
        if len(_PORT_SETS) >= _PORT_SETS_MAX:
            _PORT_SETS.clear()
        held = _PORT_SETS[key] = ports
    return held


def _plain_endpoint(raw: Any) -> _Endpoint | None:
    """The common endpoint (one valid IPv4 address, well-typed fields) read without the field checks' cost;
    None for anything else, which the checking path reads and reports. The same result either way."""
    if type(raw) is not dict:
        return None
    conditions = raw.get("conditions")
    ready: Any = True
    serving: Any = None
    terminating: Any = False
    if conditions is not None:
        if type(conditions) is not dict:
            return None
        ready, serving, terminating = (conditions.get("ready"), conditions.get("serving"),
                                       conditions.get("terminating"))
        if ready is None:
            ready = True
        elif type(ready) is not bool:
            return None
        if serving is not None and type(serving) is not bool:
            return None
        if terminating is None:
            terminating = False
        elif type(terminating) is not bool:
            return None
    node = raw.get("nodeName")
    if node is not None and type(node) is not str:
        return None
    target = raw.get("targetRef")
    name = None
    if target is not None:
        if type(target) is not dict:
            return None
        name = target.get("name")
        if name is not None and type(name) is not str:
            return None
    addresses = raw.get("addresses")
    if type(addresses) is not list or len(addresses) != 1 or type(addresses[0]) is not str:
        return None
    try:
        ip = _ipv4_int(addresses[0], "", "a backend address")
    except _Invalid:
        return None
    if ip is None:
        return None
    return _Endpoint(ip, name or addresses[0], sys.intern(node) if node else None, ready,
                     ready if serving is None else serving, terminating)




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
    if len(slices) == 1 and slices[0].plain:
        return _plain_backends(slices[0], port_name, proto, node_name, local_only)
    chosen: dict[tuple[int, int], _Endpoint] = {}        # (address, port) -> endpoint
    made: dict[L4Addr, Backend] = {}                     # packed slices' backends, used as they are
    for one in slices:
        port = one.ports.get((port_name, proto))
        if port is None:
            continue
        if one.packed is not None or one.made is not None:
            made.update((b[0], b) for b in one.backends((port_name, proto), node_name) or ())
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
    backends = [_backend(ep, port, proto, node_name, made) for port, ep in eligible]
    draining = [_backend(ep, port, proto, node_name, made) for port, ep in pool if (ep.ip, port) not in picked]
    backends.sort(key=_BACKEND_ORDER)
    draining.sort(key=_BACKEND_ORDER)
    return tuple(backends), tuple(draining), no_endpoints


_BACKEND_ORDER = itemgetter(1, 0)          # (name, l4)
_new = tuple.__new__
_int_new = int.__new__


def _plain_backends(one: _Slice, port_name: str, proto: Proto, node_name: str,
                    local_only: bool) -> tuple[tuple[Backend, ...], tuple[Backend, ...], bool]:
    """_backends of one plain slice (every endpoint ready, each address once, in backend order): the same
    result, without the rules' bookkeeping (this runs for nearly every Service port of a large cluster). A
    packed slice's backends are its own (made once), shared by every frontend of the port."""
    if one.packed is not None or one.made is not None:
        backends = one.backends((port_name, proto), node_name)
        if backends is None:
            return (), (), True
        if local_only:
            return tuple([b for b in backends if b[3]]), (), not backends
        return backends, (), not backends
    port = one.ports.get((port_name, proto))
    if port is None:
        return (), (), True
    p = int(proto)
    eps = one.endpoints
    if local_only:
        eps = tuple(ep for ep in eps if ep.node == node_name)
    return tuple([_new(Backend, (_int_new(L4Addr, ep.ip << 24 | port << 8 | p), ep.name, ep.node,
                                 ep.node == node_name, ep.terminating)) for ep in eps]), (), not one.endpoints


def _backend(ep: _Endpoint, port: int, proto: Proto, node_name: str,
             made: dict[L4Addr, Backend] | None = None) -> Backend:
    l4: L4Addr = _int_new(L4Addr, ep.ip << 24 | port << 8 | int(proto))
    if made:
        same = made.get(l4)
        if same is not None and same[1] == ep.name and same[3] == (ep.node == node_name) \
                and not ep.terminating and same[2] == ep.node:
            return same
    return _new(Backend, (l4, ep.name, ep.node, ep.node == node_name, ep.terminating))
