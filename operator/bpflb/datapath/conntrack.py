"""The conntrack maps seen from user space: the agent's garbage collector and the fill levels `bpflb inspect`
shows.

ct_fwd and ct_rev are plain hash maps (bpf_objects/include/maps.h): nothing evicts a live flow, and an entry
that outlived its lifetime stays until the datapath reuses it in place or this collector removes it. The
collector removes a flow once both of its entries are dead (the datapath's own rule for giving a port
again), forward entry first. Under pressure -- a map at least PRESSURE full, or a backend's SNAT port pool --
it also drops flows whose TCP handshake has not completed after EARLY_DROP_AGE_S, as nf_conntrack's
early_drop does: a SYN flood then costs a legitimate client seconds, not the full handshake limit.

The lifetime rules mirror conntrack.h's ct_lifetime and ct_alive (Table); tests/bpf/test_conntrack_gc.py holds
the two to the same verdicts on the same entries. A collection reads both maps in a few batch syscalls and
decodes in full only the entries that are dead; the agent runs it in a thread of its own."""

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
        self.portmap = const("CT_F_PORTMAP")
        self.established = const("CT_S_ESTABLISHED")


_F: _Flags | None = None


def flags() -> _Flags:
    global _F
    if _F is None:
        _F = _Flags()
    return _F


def peer_key(e: Entry, forward: bool, proto: int) -> bytes | None:
    """conntrack.h's ct_peer_key: the key of the flow's other entry on this node, packed."""
    f = flags()
    if (e.flags & (f.dsr | f.portmap)) == f.dsr:
        return None
    if forward:
        if e.flags & (f.snat | f.portmap):
            return CT_TUPLE.pack(e.backend_addr, e.nat_addr, e.backend_port, e.nat_port, proto)
        return CT_TUPLE.pack(e.backend_addr, e.client_addr, e.backend_port, e.client_port, proto)
    if e.flags & f.dsr:   # a remapped DSR flow's mapping, keyed client -> pod
        return CT_TUPLE.pack(e.client_addr, e.backend_addr, e.client_port, e.backend_port, proto)
    return CT_TUPLE.pack(e.client_addr, e.fe_addr, e.client_port, e.fe_port, proto)


def same_flow(a: Entry, b: Entry) -> bool:
    """conntrack.h's ct_same_flow."""
    return (a.backend_addr, a.backend_port, a.nat_addr, a.nat_port, a.client_addr, a.client_port) == \
        (b.backend_addr, b.backend_port, b.nat_addr, b.nat_port, b.client_addr, b.client_port)


def read_raw(m: Map, batch: int = 8192) -> tuple[bytes, bytes]:
    """Every entry of a hash map as two contiguous blobs (keys, values), read with bpf_map_lookup_batch (a
    few syscalls for the whole map)."""
    f, lb = ffi(), lib()
    keys_out, values_out = bytearray(), bytearray()
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
        keys_out += f.buffer(keys, m.key_size * n)
        values_out += f.buffer(values, m.value_size * n)
        if rc < 0:
            if err == 2:          # ENOENT: the last batch
                return bytes(keys_out), bytes(values_out)
            if err == 28 and batch < 1 << 20:   # ENOSPC: a bucket holds more than a batch
                return read_raw(m, batch * 4)
            raise OSError(err, f"batch lookup of map {m.name}")
        f.memmove(token_in, token_out, max(m.key_size, 8))
        first = False


def read_all(m: Map) -> dict[bytes, bytes]:
    """Every entry of a hash map, key -> value."""
    keys, values = read_raw(m)
    ks, vs = m.key_size, m.value_size
    return {keys[i * ks:(i + 1) * ks]: values[i * vs:(i + 1) * vs] for i in range(len(keys) // ks)}


# The fields the collector reads of every entry (the rest only for the dead ones): last_seen, flags, state;
# and of a reverse entry also its backend (the SNAT pools' fill).
_HOT = struct.Struct("=Q32xBxBx4x")
_REV_HOT = struct.Struct("=Q4x4s12xH10xBxBx4x")


class Table:
    """One conntrack map, read once: keys and values as blobs, and which entries are alive."""

    def __init__(self, keys: bytes, values: bytes, lt: Lifetimes, now: int) -> None:
        self.keys, self.values = keys, values
        self.n = len(keys) // CT_TUPLE.size
        f = flags()
        closing, reset, established = f.closing, f.reset, f.established
        syn_ns, tcp_ns, udp_ns, close_ns = lt.syn * NS, lt.tcp * NS, lt.udp * NS, lt.closing * NS
        self.alive: list[bool] = []
        self.pending: list[bool] = []       # TCP, handshake incomplete, not closing
        self.protos = keys[12::CT_TUPLE.size]
        for (seen, fl, st), proto in zip(_HOT.iter_unpack(values), self.protos, strict=True):
            if fl & reset:
                life = RESET_LIFETIME_NS
            elif fl & closing:
                life = close_ns
            elif proto == 6:
                life = tcp_ns if st & established else syn_ns
            else:
                life = udp_ns
            self.alive.append(seen >= now or now - seen <= life)
            self.pending.append(proto == 6 and not st & established and not fl & (closing | reset))
        self._index: dict[bytes, int] | None = None

    def key(self, i: int) -> bytes:
        return self.keys[i * CT_TUPLE.size:(i + 1) * CT_TUPLE.size]

    def entry(self, i: int) -> Entry:
        return Entry(*CT_ENTRY.unpack_from(self.values, i * CT_ENTRY.size))

    def find(self, key: bytes) -> int | None:
        if self._index is None:
            ks = CT_TUPLE.size
            self._index = {self.keys[i * ks:(i + 1) * ks]: i for i in range(self.n)}
        return self._index.get(key)

    def entries(self) -> Iterator[tuple[bytes, Entry]]:
        for i in range(self.n):
            yield self.key(i), self.entry(i)

    def kinds(self) -> dict[str, int]:
        """Entries by what they hold: pending handshakes, established, closing, UDP, dead."""
        f = flags()
        out = dict.fromkeys(("handshake", "established", "closing", "udp", "dead"), 0)
        for i, (_, fl, st) in enumerate(_HOT.iter_unpack(self.values)):
            kind = ("dead" if not self.alive[i] else "closing" if fl & (f.closing | f.reset) else
                    "udp" if self.protos[i] != Proto.TCP else "established" if st & f.established else "handshake")
            out[kind] += 1
        return out


@dataclass
class Snapshot:
    """Both conntrack maps at one moment."""

    now: int
    lifetimes: Lifetimes
    fwd: Table
    rev: Table

    def peer(self, table: Table, i: int, forward: bool) -> int | None:
        """The index of entry i's flow's other entry in the other table (same flow), or None."""
        e = table.entry(i)
        pk = peer_key(e, forward, table.protos[i])
        other = self.rev if forward else self.fwd
        j = None if pk is None else other.find(pk)
        return j if j is not None and same_flow(e, other.entry(j)) else None

    def holds_port(self, i: int) -> bool:
        """A reverse entry's port is not free while the entry or its flow's forward entry is alive."""
        if self.rev.alive[i]:
            return True
        j = self.peer(self.rev, i, forward=False)
        return j is not None and self.fwd.alive[j]


def snapshot(fwd: Map, rev: Map, config: Map, now: int | None = None) -> Snapshot:
    lt = Lifetimes.read(config)
    t = time.monotonic_ns() if now is None else now      # CLOCK_MONOTONIC: bpf_ktime_get_ns's clock
    return Snapshot(t, lt, Table(*_as_ct_entries(fwd, *read_raw(fwd)), lt, t),
                    Table(*_as_ct_entries(rev, *read_raw(rev)), lt, t))


def _as_ct_entries(m: Map, keys: bytes, values: bytes) -> tuple[bytes, bytes]:
    """Values cut to the struct ct_entry this code knows, when the map's are longer (another build's, whose
    fields this one does not read come after: see datapath.migrate and make bpf-layout-test)."""
    if m.value_size == CT_ENTRY.size:
        return keys, values
    vs, size = m.value_size, CT_ENTRY.size
    return keys, b"".join(values[i:i + size].ljust(size, b"\0") for i in range(0, len(values), vs))


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
    capacity: int = 0               # entries each map holds at most (CT_MAX)
    dsr_mapped: int = 0             # remapped DSR flows' mappings in ct_fwd (lb_dsr_mapped closed when none)


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


def pool_use(snap: Snapshot, size: int) -> list[PoolUse]:
    """SNAT ports in use per backend tuple, fullest first."""
    snat = flags().snat
    rev = snap.rev
    used: Counter[tuple[bytes, int, int]] = Counter()
    for i, (_, addr, be_port, fl, _) in enumerate(_REV_HOT.iter_unpack(rev.values)):
        if fl & snat and snap.holds_port(i):
            used[(addr, be_port, rev.protos[i])] += 1
    return sorted((PoolUse(a, p, proto, n, size) for (a, p, proto), n in used.items()),
                  key=lambda u: (-u.used, u.backend))


# lb_dsr_mapped (dsr.h): [0] counts remapped DSR flows' mappings made, [1] the count when none was left.
GATE_GRACE_S = 0.001       # between reading [0] and the scan: far longer than any program's run


def _gate(m: Map, index: int) -> int:
    value = m.lookup(ffi().new("__u32 *", index))
    return int(value[0]) if value is not None else 0


def dsr_mappings_made(m: Map) -> int:
    return _gate(m, 0)


def dsr_gate_open(m: Map) -> bool:
    """Whether non-service packets look in ct_fwd for a remapped DSR flow's mapping ([0] != [1])."""
    return _gate(m, 0) != _gate(m, 1)


def open_dsr_gate(m: Map) -> None:
    """Non-service packets look for remapped DSR flows again until a collection finds none (the agent's start:
    a previous agent's datapath may have made some). [1] = [0] - 1, which [0], only growing, never reaches."""
    m.update_raw((1).to_bytes(4, "little"), ((_gate(m, 0) - 1) % 2**64).to_bytes(8, "little"))


def close_dsr_gate(m: Map, made: int) -> None:
    """No mapping was left in a scan that began after [0] read made: [1] = made. If the datapath made one
    meanwhile, [0] has moved on and the gate stays open."""
    if _gate(m, 0) == made:
        m.update_raw((1).to_bytes(4, "little"), made.to_bytes(8, "little"))


class Collector:
    """The conntrack garbage collector of one node's maps (run by the agent, see Agent.run)."""

    def __init__(self, fwd: Map, rev: Map, config: Map, dsr_mapped: Map | None = None) -> None:
        self.fwd, self.rev, self.config = fwd, rev, config
        self.dsr_mapped = dsr_mapped
        self.capacity = const("CT_MAX")

    def collect(self, now: int | None = None) -> GcReport:
        started = time.monotonic()
        made = dsr_mappings_made(self.dsr_mapped) if self.dsr_mapped is not None else None
        if made is not None:
            time.sleep(GATE_GRACE_S)    # every program that counted a mapping before has written it by now
        snap = snapshot(self.fwd, self.rev, self.config, now)
        report = GcReport(snap.fwd.n, snap.rev.n, capacity=self.capacity)
        cfg = self.config.lookup(ffi().new("__u32 *", 0))
        span = int(cfg.nat_port_max) - int(cfg.nat_port_min) + 1 if cfg is not None else 0
        doomed_fwd, doomed_rev = self._dead(snap)
        early = self._early_drops(snap, span, report)
        for i, j in early:
            doomed_fwd.add(i)
            if j is not None:
                doomed_rev.add(j)
        report.early_dropped = len(early)
        # Forward entries first: a reverse entry (a port) is never gone while its forward entry is there.
        report.removed_fwd = self._remove(self.fwd, snap.fwd, doomed_fwd, report)
        report.removed_rev = self._remove(self.rev, snap.rev, doomed_rev, report)
        f = flags()
        both = f.dsr | f.portmap
        report.dsr_mapped = sum(1 for i, (_, fl, _) in enumerate(_HOT.iter_unpack(snap.fwd.values))
                                if fl & both == both and i not in doomed_fwd)
        if made is not None and self.dsr_mapped is not None and not report.dsr_mapped:
            close_dsr_gate(self.dsr_mapped, made)
        report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _dead(snap: Snapshot) -> tuple[set[int], set[int]]:
        """Entries dead together with their flow's other entry (or that have none), by index."""
        fwd = {i for i in range(snap.fwd.n) if not snap.fwd.alive[i] and not (
            (j := snap.peer(snap.fwd, i, forward=True)) is not None and snap.rev.alive[j])}
        rev = {i for i in range(snap.rev.n) if not snap.rev.alive[i] and not (
            (j := snap.peer(snap.rev, i, forward=False)) is not None and snap.fwd.alive[j])}
        return fwd, rev

    def _early_drops(self, snap: Snapshot, span: int, report: GcReport) -> list[tuple[int, int | None]]:
        """Under pressure: (forward index, reverse index) of flows whose handshake has been pending too long."""
        full = max(snap.fwd.n, snap.rev.n) >= PRESSURE * self.capacity
        crowded: set[tuple[bytes, int, int]] = set()
        for use in pool_use(snap, span) if span else []:
            if use.fill >= PRESSURE:
                report.pressure.append(f"SNAT pool of {use.backend} {use.fill:.0%} taken")
                crowded.add((use.addr, use.raw_port, use.proto))
        if full:
            report.pressure.append(f"conntrack {max(snap.fwd.n, snap.rev.n):,} of {self.capacity:,} entries")
        if not full and not crowded:
            return []
        oldest = snap.now - int(EARLY_DROP_AGE_S * NS)
        out = []
        fwd = snap.fwd
        for i, (seen, _, _) in enumerate(_HOT.iter_unpack(fwd.values)):
            if not fwd.pending[i] or seen > oldest:
                continue
            e = fwd.entry(i)
            if full or (e.backend_addr, e.backend_port, fwd.protos[i]) in crowded:
                out.append((i, snap.peer(fwd, i, forward=True)))
        return out

    @staticmethod
    def _remove(m: Map, table: Table, doomed: set[int], report: GcReport) -> int:
        """Remove each entry unless the datapath touched it since it was read (then it goes back)."""
        f, lb = ffi(), lib()
        value = f.new("char[]", m.value_size)
        removed = 0
        for i in doomed:
            key = table.key(i)
            if lb.bpf_map_lookup_and_delete_elem(m.fd, key, value) < 0:
                continue
            raw = f.buffer(value)[:]
            if raw[:8] != table.values[i * CT_ENTRY.size:i * CT_ENTRY.size + 8]:    # last_seen moved
                lb.bpf_map_update_elem(m.fd, key, raw, BPF_NOEXIST)
                report.kept_touched += 1
                continue
            removed += 1
        return removed


class Schedule:
    """When the next collection is due: often while the maps or a pool are under pressure or flows end in
    numbers, rarely while nothing happens (Cilium's GC interval adapts the same way), and at once when the
    datapath's counters show new flows refused since the last collection (a pool or a map full: a flood
    is answered within a second, not at the next idle collection). Flows ending in numbers need no hurry:
    the datapath reuses their entries in place."""

    BUSY_S, ACTIVE_S, IDLE_S = 1.0, 5.0, 30.0
    WATCHED = ("drop_nat_exhausted", "ct_insert_failed")

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
        return any(counters.get(k, 0) > self._seen[k] for k in self.WATCHED)


def describe(report: GcReport) -> Iterator[str]:
    """The agent's log lines for a collection that did something."""
    if report.removed_fwd or report.removed_rev or report.early_dropped:
        yield (f"conntrack GC: removed {report.removed_fwd:,} forward and {report.removed_rev:,} reverse entries "
               f"of ended flows ({report.fwd_entries:,}/{report.rev_entries:,} before, {report.seconds * 1000:.0f} ms)")
    if report.early_dropped:
        yield (f"conntrack GC: under pressure ({'; '.join(report.pressure)}): dropped {report.early_dropped:,} flows "
               f"whose TCP handshake was pending for over {EARLY_DROP_AGE_S:g}s")
