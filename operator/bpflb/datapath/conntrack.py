"""The conntrack maps seen from user space: the agent's garbage collector and the fill levels `bpflb inspect`
shows.

ct_fwd and ct_rev are plain hash maps (bpf_objects/include/maps.h): nothing evicts a live flow, and an entry
that outlived its lifetime stays until the datapath reuses it in place or this collector removes it. The
collector removes a flow once both of its entries are dead (the datapath's own rule for giving a port
again), forward entry first. Under pressure -- a map at least PRESSURE full, or a backend's SNAT port pool --
it also drops flows whose TCP handshake has not completed after EARLY_DROP_AGE_S, as nf_conntrack's
early_drop does: a SYN flood then costs a legitimate client seconds, not the full handshake limit.

The lifetime rules mirror conntrack.h's ct_lifetime and ct_alive; tests/bpf/test_conntrack_gc.py holds the
two to the same verdicts on the same entries."""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import NamedTuple

from bpflb.datapath.libbpf import BPF_NOEXIST, const, ffi, lib
from bpflb.datapath.loader import Map
from bpflb.model.types import Proto

log = logging.getLogger(__name__)

PRESSURE = 0.9                 # fill level from which handshake-incomplete flows are dropped early
EARLY_DROP_AGE_S = 5.0         # ... once their handshake has been pending this long (SYN retries: 1, 3, 7 s)
RESET_LIFETIME_NS = 1_000_000_000   # CT_RESET_LIFETIME_NS
NS = 1_000_000_000

# struct ct_tuple and struct ct_entry (lb_structs.h; tests/bpf/test_layout.py holds these to the BTF).
CT_TUPLE = struct.Struct("=4s4sHHB3x")
CT_ENTRY = struct.Struct("=QI4s4s4s4sHHHHIBBBxI")


class Tuple(NamedTuple):
    """A ct_tuple: addresses as bytes, ports as the raw network-order u16 the map holds."""

    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    proto: int


class Entry(NamedTuple):
    """A ct_entry, fields as the map holds them (addresses as bytes, ports raw network order)."""

    last_seen: int
    backend_id: int
    backend_addr: bytes
    nat_addr: bytes
    fe_addr: bytes
    client_addr: bytes
    backend_port: int
    nat_port: int
    fe_port: int
    client_port: int
    svc_id: int
    flags: int
    mode: int
    state: int
    syn_ack_seq: int


def port(raw: int) -> int:
    """A map's network-order u16 as a port number."""
    return int.from_bytes(raw.to_bytes(2, "little"), "big")


@dataclass(frozen=True)
class Lifetimes:
    """The lifetimes of lb_config, in seconds."""

    tcp: int
    udp: int
    closing: int
    syn: int

    @classmethod
    def read(cls, config: Map) -> Lifetimes:
        cfg = config.lookup(ffi().new("__u32 *", 0))
        if cfg is None:
            raise LookupError("lb_config holds no settings yet")
        return cls(int(cfg.tcp_timeout), int(cfg.udp_timeout), int(cfg.closing_timeout), int(cfg.syn_timeout))


class _Flags:
    """The CT_F_* and CT_S_* bits, read once from lb_structs.h."""

    def __init__(self) -> None:
        self.snat, self.local, self.dsr = const("CT_F_SNAT"), const("CT_F_LOCAL"), const("CT_F_DSR")
        self.closing, self.reset, self.host = const("CT_F_CLOSING"), const("CT_F_RESET"), const("CT_F_HOST")
        self.established = const("CT_S_ESTABLISHED")


_F: _Flags | None = None


def flags() -> _Flags:
    global _F
    if _F is None:
        _F = _Flags()
    return _F


def lifetime_ns(e: Entry, proto: int, lt: Lifetimes) -> int:
    """conntrack.h's ct_lifetime."""
    f = flags()
    if e.flags & f.reset:
        return RESET_LIFETIME_NS
    if e.flags & f.closing:
        return lt.closing * NS
    if proto == Proto.TCP:
        return (lt.tcp if e.state & f.established else lt.syn) * NS
    return lt.udp * NS


def alive(e: Entry, proto: int, lt: Lifetimes, now: int) -> bool:
    """conntrack.h's ct_alive."""
    return e.last_seen >= now or now - e.last_seen <= lifetime_ns(e, proto, lt)


def handshake_pending(e: Entry, proto: int) -> bool:
    """A TCP flow whose handshake has not completed (and that is not closing)."""
    f = flags()
    return proto == Proto.TCP and not e.state & f.established and not e.flags & (f.closing | f.reset)


def peer_key(e: Entry, forward: bool, proto: int) -> bytes | None:
    """conntrack.h's ct_peer_key: the key of the flow's other entry on this node, packed."""
    f = flags()
    if e.flags & f.dsr:
        return None
    if forward:
        if e.flags & f.snat:
            return CT_TUPLE.pack(e.backend_addr, e.nat_addr, e.backend_port, e.nat_port, proto)
        return CT_TUPLE.pack(e.backend_addr, e.client_addr, e.backend_port, e.client_port, proto)
    return CT_TUPLE.pack(e.client_addr, e.fe_addr, e.client_port, e.fe_port, proto)


def same_flow(a: Entry, b: Entry) -> bool:
    """conntrack.h's ct_same_flow."""
    return (a.backend_addr, a.backend_port, a.nat_addr, a.nat_port, a.client_addr, a.client_port) == \
        (b.backend_addr, b.backend_port, b.nat_addr, b.nat_port, b.client_addr, b.client_port)


def read_all(m: Map, batch: int = 4096) -> dict[bytes, bytes]:
    """Every entry of a hash map, read with bpf_map_lookup_batch (a few syscalls for the whole map)."""
    f, lb = ffi(), lib()
    out: dict[bytes, bytes] = {}
    keys = f.new("char[]", m.key_size * batch)
    values = f.new("char[]", m.value_size * batch)
    token_in = f.new("char[]", max(m.key_size, 8))
    token_out = f.new("char[]", max(m.key_size, 8))
    opts = f.new("struct bpf_map_batch_opts *", {"sz": f.sizeof("struct bpf_map_batch_opts")})
    count = f.new("__u32 *")
    first = True
    while True:
        count[0] = batch
        rc = lb.bpf_map_lookup_batch(m.fd, f.NULL if first else token_in, token_out, keys, values, count, opts)
        err = f.errno if rc < 0 else 0
        n = int(count[0])
        kb, vb = f.buffer(keys, m.key_size * n)[:], f.buffer(values, m.value_size * n)[:]
        for i in range(n):
            out[kb[i * m.key_size:(i + 1) * m.key_size]] = vb[i * m.value_size:(i + 1) * m.value_size]
        if rc < 0:
            if err == 2:          # ENOENT: the last batch
                return out
            if err == 28 and batch < 1 << 20:   # ENOSPC: a bucket holds more than a batch
                return read_all(m, batch * 4)
            raise OSError(err, f"batch lookup of map {m.name}")
        f.memmove(token_in, token_out, max(m.key_size, 8))
        first = False


@dataclass
class Snapshot:
    """Both conntrack maps at one moment, decoded."""

    now: int
    lifetimes: Lifetimes
    fwd: dict[bytes, Entry]
    rev: dict[bytes, Entry]

    def proto(self, key: bytes) -> int:
        return key[12]

    def peer(self, key: bytes, e: Entry, forward: bool) -> Entry | None:
        pk = peer_key(e, forward, self.proto(key))
        other = None if pk is None else (self.rev if forward else self.fwd).get(pk)
        return other if other is not None and same_flow(e, other) else None

    def alive(self, key: bytes, e: Entry) -> bool:
        return alive(e, self.proto(key), self.lifetimes, self.now)


def snapshot(fwd: Map, rev: Map, config: Map, now: int | None = None) -> Snapshot:
    lt = Lifetimes.read(config)
    t = time.monotonic_ns() if now is None else now      # CLOCK_MONOTONIC: bpf_ktime_get_ns's clock
    return Snapshot(t, lt, {k: Entry(*CT_ENTRY.unpack(v)) for k, v in read_all(fwd).items()},
                    {k: Entry(*CT_ENTRY.unpack(v)) for k, v in read_all(rev).items()})


@dataclass
class GcReport:
    """What one collection did and saw."""

    fwd_entries: int = 0            # before the collection
    rev_entries: int = 0
    removed_fwd: int = 0
    removed_rev: int = 0
    early_dropped: int = 0          # flows removed before their handshake limit, under pressure
    kept_touched: int = 0           # entries the datapath touched between the read and the removal
    pressure: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class PoolUse:
    """One backend tuple's SNAT ports in use."""

    addr: bytes                     # the backend tuple, as the map holds it
    raw_port: int
    proto: int
    used: int                       # flows holding a port (the node's moved connections included)
    size: int                       # ports in the range

    @property
    def backend(self) -> str:
        return f"{IPv4Address(self.addr)}:{port(self.raw_port)}/{Proto(self.proto).name}"

    @property
    def fill(self) -> float:
        return self.used / self.size if self.size else 0.0


def holds_port(snap: Snapshot, key: bytes, e: Entry) -> bool:
    """A reverse entry's port is not free while the entry or its flow's forward entry is alive."""
    if snap.alive(key, e):
        return True
    peer = snap.peer(key, e, forward=False)
    return peer is not None and alive(peer, snap.proto(key), snap.lifetimes, snap.now)


def pool_use(snap: Snapshot, size: int) -> list[PoolUse]:
    """SNAT ports in use per backend tuple, fullest first."""
    snat = flags().snat
    used: Counter[tuple[bytes, int, int]] = Counter(
        (e.backend_addr, e.backend_port, snap.proto(key))
        for key, e in snap.rev.items() if e.flags & snat and holds_port(snap, key, e))
    return sorted((PoolUse(a, p, proto, n, size) for (a, p, proto), n in used.items()),
                  key=lambda u: (-u.used, u.backend))


class Collector:
    """The conntrack garbage collector of one node's maps (run by the agent, see Agent.run)."""

    def __init__(self, fwd: Map, rev: Map, config: Map) -> None:
        self.fwd, self.rev, self.config = fwd, rev, config
        self.capacity = const("CT_MAX")

    def collect(self, now: int | None = None) -> GcReport:
        started = time.monotonic()
        snap = snapshot(self.fwd, self.rev, self.config, now)
        report = GcReport(len(snap.fwd), len(snap.rev))
        cfg = self.config.lookup(ffi().new("__u32 *", 0))
        span = int(cfg.nat_port_max) - int(cfg.nat_port_min) + 1 if cfg is not None else 0
        doomed_fwd, doomed_rev = self._dead(snap)
        early = self._early_drops(snap, span, report)
        for key, peer in early:
            doomed_fwd.add(key)
            if peer is not None:
                doomed_rev.add(peer)
        report.early_dropped = len(early)
        # Forward entries first: a reverse entry (a port) is never gone while its forward entry is there.
        report.removed_fwd = self._remove(self.fwd, doomed_fwd, snap.fwd, report)
        report.removed_rev = self._remove(self.rev, doomed_rev, snap.rev, report)
        report.seconds = time.monotonic() - started
        return report

    def _dead(self, snap: Snapshot) -> tuple[set[bytes], set[bytes]]:
        """Entries dead together with their flow's other entry (or that have none)."""
        fwd = set()
        for key, e in snap.fwd.items():
            if not snap.alive(key, e):
                peer = snap.peer(key, e, forward=True)
                if peer is None or not alive(peer, snap.proto(key), snap.lifetimes, snap.now):
                    fwd.add(key)
        rev = set()
        for key, e in snap.rev.items():
            if not snap.alive(key, e):
                peer = snap.peer(key, e, forward=False)
                if peer is None or not alive(peer, snap.proto(key), snap.lifetimes, snap.now):
                    rev.add(key)
        return fwd, rev

    def _early_drops(self, snap: Snapshot, span: int, report: GcReport) -> list[tuple[bytes, bytes | None]]:
        """Under pressure: (forward key, reverse key) of flows whose handshake has been pending too long."""
        full = max(len(snap.fwd), len(snap.rev)) >= PRESSURE * self.capacity
        crowded: set[tuple[bytes, int, int]] = set()
        for use in pool_use(snap, span) if span else []:
            if use.fill >= PRESSURE:
                report.pressure.append(f"SNAT pool of {use.backend} {use.fill:.0%} taken")
                crowded.add((use.addr, use.raw_port, use.proto))
        if full:
            report.pressure.append(f"conntrack {max(len(snap.fwd), len(snap.rev)):,} of {self.capacity:,} entries")
        if not full and not crowded:
            return []
        limit = int(EARLY_DROP_AGE_S * NS)
        out = []
        for key, e in snap.fwd.items():
            proto = snap.proto(key)
            if not handshake_pending(e, proto) or snap.now - e.last_seen < limit:
                continue
            if full or (e.backend_addr, e.backend_port, proto) in crowded:
                out.append((key, peer_key(e, True, proto) if snap.peer(key, e, forward=True) else None))
        return out

    @staticmethod
    def _remove(m: Map, keys: set[bytes], seen: dict[bytes, Entry], report: GcReport) -> int:
        """Remove each key unless the datapath touched it since it was read (then it goes back)."""
        f, lb = ffi(), lib()
        value = f.new("char[]", m.value_size)
        removed = 0
        for key in keys:
            if lb.bpf_map_lookup_and_delete_elem(m.fd, key, value) < 0:
                continue
            raw = f.buffer(value)[:]
            if Entry(*CT_ENTRY.unpack(raw)).last_seen != seen[key].last_seen:
                lb.bpf_map_update_elem(m.fd, key, raw, BPF_NOEXIST)
                report.kept_touched += 1
                continue
            removed += 1
        return removed


class Schedule:
    """When the next collection is due: often while the maps or a pool are under pressure or flows end in
    numbers, rarely while nothing happens (Cilium's GC interval adapts the same way), and at once when the
    datapath's counters show pressure building up between collections (refused flows, a burst of new ones:
    a flood is answered within a second, not at the next idle collection)."""

    BUSY_S, ACTIVE_S, IDLE_S = 1.0, 5.0, 30.0
    BURST = 5000                    # new flows since the last collection that make it due at once
    WATCHED = ("new_flow", "drop_nat_exhausted", "ct_insert_failed")

    def __init__(self) -> None:
        self.due = 0.0
        self.last = 0.0
        self._seen: dict[str, int] = {}

    def after(self, report: GcReport, capacity: int, counters: dict[str, int] | None = None) -> float:
        entries = max(report.fwd_entries, report.rev_entries)
        removed = report.removed_fwd + report.removed_rev
        if report.pressure or entries >= capacity // 2:
            wait = self.BUSY_S
        elif removed >= 1000 or entries >= capacity // 10:
            wait = self.ACTIVE_S
        else:
            wait = self.IDLE_S
        if counters is not None:
            self._seen = {k: counters.get(k, 0) for k in self.WATCHED}
        self.last = time.monotonic()
        self.due = self.last + wait
        return wait

    def pressing(self, counters: dict[str, int]) -> bool:
        """Do the counters since the last collection call for one now (at most one a second)?"""
        if not self._seen or time.monotonic() - self.last < self.BUSY_S:
            return False
        return (counters.get("new_flow", 0) - self._seen["new_flow"] >= self.BURST or
                any(counters.get(k, 0) > self._seen[k] for k in ("drop_nat_exhausted", "ct_insert_failed")))


def describe(report: GcReport) -> Iterator[str]:
    """The agent's log lines for a collection that did something."""
    if report.removed_fwd or report.removed_rev or report.early_dropped:
        yield (f"conntrack GC: removed {report.removed_fwd:,} forward and {report.removed_rev:,} reverse entries "
               f"of ended flows ({report.fwd_entries:,}/{report.rev_entries:,} before, {report.seconds * 1000:.0f} ms)")
    if report.early_dropped:
        yield (f"conntrack GC: under pressure ({'; '.join(report.pressure)}): dropped {report.early_dropped:,} flows "
               f"whose TCP handshake was pending for over {EARLY_DROP_AGE_S:g}s")
