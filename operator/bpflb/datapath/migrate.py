"""Taking over the pinned maps of another version of bpflb (an upgrade, or a downgrade): a pinned map whose
definition differs from what the objects being loaded declare — type, key or value size, max_entries,
flags, or the layout of its key or value struct read from BTF — is moved aside (pin_root/migrating/), a new
map is created in its place, and its entries are copied over field by field, matched by name using both
maps' BTF: a field both have is copied (an integer that changed size is converted), a new field starts at
zero, a dropped one is dropped; keys are translated the same way. Nothing here knows bpflb's structs: it
works for any map whose definition carries BTF, so conntrack entries, NAT state and counters of any later
layout migrate alike.

The copy runs twice: once after the new objects are loaded (while the old programs still run on the old
maps) and once more after the new programs are attached, for the entries the old programs created
meanwhile (keys the new map lacks); only then is the old map unpinned. An agent that dies in between
finds the parked maps at its next start and finishes the job. A map without BTF (made by hand, or by a
release that had none) whose sizes changed cannot be matched field by field: it starts empty, said in the
log. A copy never fails the load: entries that do not fit (a smaller map) are counted and logged."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpflb.datapath.libbpf import BpfError, ffi, lib, map_info, possible_cpus

log = logging.getLogger("bpflb.migrate")

PARKED = "migrating"           # where old maps wait under the pin root until their entries are over (bpffs
                               # refuses names with a dot)
_SEQ = "__"                    # a parked map is <name>__<n>, the newest with the highest n

# BTF kinds (uapi linux/btf.h)
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM = 1, 2, 3, 4, 5, 6
_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _FLOAT, _TYPE_TAG, _ENUM64 = 8, 9, 10, 11, 16, 18, 19
_QUALIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)
# Map types whose entries are per-CPU (a value per possible CPU, each rounded up to 8 bytes).
_PERCPU = {5, 6, 10}           # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
# Map types whose entries can be copied: keys and values (hash maps, arrays, LPM tries).
_COPYABLE = {1, 2, 5, 6, 9, 10, 11}


@dataclass(frozen=True)
class Field:
    """A leaf of a struct: its path by member names ("a.b"), where it is and how to convert it."""

    path: str
    offset: int
    size: int
    kind: str                  # "int" (converted when its size changes) or "bytes" (copied as far as it fits)


Layout = tuple[Field, ...]


@dataclass(frozen=True)
class MapDef:
    """A map's definition: what libbpf compares to reuse a pin, plus the layout of its key and value."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key: Layout | None = None            # None: no BTF to tell
    value: Layout | None = None

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.type, self.key_size, self.value_size, self.max_entries, self.flags

    def differs(self, other: MapDef) -> list[str]:
        """What differs, in words ("max_entries 262144 -> 131072", "value layout: + layout_test")."""
        out = [f"{name} {a} -> {b}" for name, a, b in zip(("type", "key size", "value size", "max_entries", "flags"),
                                                           self.shape, other.shape, strict=True) if a != b]
        for what, a, b in (("key", self.key, other.key), ("value", self.value, other.value)):
            if a is not None and b is not None and a != b:
                old, new = {f.path: f for f in a}, {f.path: f for f in b}
                change = [f"+{p}" for p in new if p not in old] + [f"-{p}" for p in old if p not in new]
                change += [f"~{p}" for p in new if p in old and new[p] != old[p]]
                out.append(f"{what} layout {' '.join(change)}")
        return out


# ---------------------------------------------------------------------------------------------- BTF


class Unsupported(Exception):
    """A layout this module does not translate (bitfields)."""


def _type(btf: Any, tid: int) -> Any:
    t = lib().btf__type_by_id(btf, tid)
    if t == ffi().NULL:
        raise Unsupported(f"no BTF type {tid}")
    return t


def _kind(t: Any) -> int:
    return int((t.info >> 24) & 0x1F)


def _resolve(btf: Any, tid: int) -> tuple[int, Any]:
    t = _type(btf, tid)
    while _kind(t) in _QUALIFIERS:
        tid = int(t.size_or_type)
        t = _type(btf, tid)
    return tid, t


def _size(btf: Any, tid: int) -> int:
    tid, t = _resolve(btf, tid)
    kind = _kind(t)
    if kind == _ARRAY:
        arr = ffi().cast("struct btf_array *", t + 1)
        return int(arr.nelems) * _size(btf, int(arr.type))
    if kind == _PTR:
        return 8
    return int(t.size_or_type)


def _flatten(btf: Any, tid: int, path: str, base: int, out: list[Field]) -> None:
    tid, t = _resolve(btf, tid)
    kind = _kind(t)
    if kind == _STRUCT:
        vlen, kflag = int(t.info & 0xFFFF), int(t.info >> 31)
        members = ffi().cast("struct btf_member *", t + 1)
        for i in range(vlen):
            m = members[i]
            bits = int(m.offset)
            if kflag and bits >> 24:
                raise Unsupported("a bitfield member")
            bits &= 0xFFFFFF if kflag else 0xFFFFFFFF
            if bits % 8:
                raise Unsupported("a member not on a byte boundary")
            name = ffi().string(lib().btf__name_by_offset(btf, m.name_off)).decode()
            _flatten(btf, int(m.type), f"{path}.{name}" if path and name else (name or path), base + bits // 8, out)
        return
    size = _size(btf, tid)
    out.append(Field(path, base, size, "int" if kind in (_INT, _ENUM, _ENUM64) else "bytes"))


def layout(btf: Any, tid: int) -> Layout | None:
    """The leaves of BTF type tid by name (None when there is no BTF to read, or it cannot be translated)."""
    if btf == ffi().NULL or not tid:
        return None
    out: list[Field] = []
    try:
        _flatten(btf, tid, "", 0, out)
    except Unsupported as exc:
        log.warning("BTF type %d: %s; its map is copied as raw bytes when its sizes are unchanged", tid, exc)
        return None
    return tuple(out)


def object_def(bpf_map: Any, btf: Any) -> MapDef:
    """What a map of an opened (not yet loaded) object declares."""
    lb = lib()
    return MapDef(int(lb.bpf_map__type(bpf_map)), int(lb.bpf_map__key_size(bpf_map)),
                  int(lb.bpf_map__value_size(bpf_map)), int(lb.bpf_map__max_entries(bpf_map)),
                  int(lb.bpf_map__map_flags(bpf_map)),
                  layout(btf, int(lb.bpf_map__btf_key_type_id(bpf_map))),
                  layout(btf, int(lb.bpf_map__btf_value_type_id(bpf_map))))


def pinned_def(fd: int) -> MapDef:
    """What the kernel says of an existing map, its BTF included (the BTF of the object that created it)."""
    info = map_info(fd)
    key = value = None
    if info.btf_id:
        btf = lib().btf__load_from_kernel_by_id(info.btf_id)
        if btf != ffi().NULL:
            try:
                key, value = layout(btf, int(info.btf_key_type_id)), layout(btf, int(info.btf_value_type_id))
            finally:
                lib().btf__free(btf)
    return MapDef(int(info.type), int(info.key_size), int(info.value_size), int(info.max_entries),
                  int(info.map_flags), key, value)


# ---------------------------------------------------------------------------------------------- conversion

Convert = Callable[[bytes], bytes]


def converter(old: Layout | None, new: Layout | None, old_size: int, new_size: int) -> Convert | None:
    """bytes of the old struct -> bytes of the new one, by field name; None when it cannot be told."""
    if old is None or new is None:
        return (lambda raw: raw) if old_size == new_size else None
    if old == new and old_size == new_size:
        return lambda raw: raw
    by_path = {f.path: f for f in old}
    copies: list[tuple[int, int, int]] = []          # (from, to, bytes)
    ints: list[tuple[int, int, int, int]] = []       # (from, its size, to, its size)
    for f in new:
        o = by_path.get(f.path)
        if o is None:
            continue                                 # a new field: zero
        if o.size == f.size or not (o.kind == f.kind == "int"):
            copies.append((o.offset, f.offset, min(o.size, f.size)))
        else:
            ints.append((o.offset, o.size, f.offset, f.size))

    def convert(raw: bytes) -> bytes:
        out = bytearray(new_size)
        for src, dst, n in copies:
            out[dst:dst + n] = raw[src:src + n]
        for src, n, dst, m in ints:
            value = int.from_bytes(raw[src:src + n], "little") & ((1 << (8 * m)) - 1)
            out[dst:dst + m] = value.to_bytes(m, "little")
        return bytes(out)

    return convert


def _percpu(convert: Convert, old_size: int, new_size: int, ncpu: int) -> Convert:
    """A per-CPU value: every CPU's slot (rounded up to 8 bytes) converted on its own."""
    step_old, step_new = -(-old_size // 8) * 8, -(-new_size // 8) * 8

    def each(raw: bytes) -> bytes:
        return b"".join(convert(raw[i * step_old:i * step_old + old_size]).ljust(step_new, b"\0")
                        for i in range(ncpu))
    return each


# ---------------------------------------------------------------------------------------------- migrations


@dataclass
class Migration:
    """One map being taken over: the old map (parked under pin_root/migrating) and how to translate it."""

    name: str
    old_fd: int
    parked: Path
    old: MapDef
    new: MapDef
    key: Convert | None
    value: Convert | None
    new_fd: int = -1
    copied: int = 0
    refused: int = 0
    reasons: set[str] = field(default_factory=set)

    @property
    def convertible(self) -> bool:
        return (self.key is not None and self.value is not None and self.old.type in _COPYABLE
                and self.new.type in _COPYABLE)

    def copy(self, only_missing: bool = False) -> int:
        """Copy the old map's entries into the new one (only the keys it lacks, on the second pass);
        returns how many were written."""
        if not self.convertible or self.new_fd < 0:
            return 0
        f, lb = ffi(), lib()
        ncpu = possible_cpus() if self.old.type in _PERCPU else 1
        old_vsize = (-(-self.old.value_size // 8) * 8) * ncpu if self.old.type in _PERCPU else self.old.value_size
        new_vsize = (-(-self.new.value_size // 8) * 8) * ncpu if self.new.type in _PERCPU else self.new.value_size
        assert self.key is not None and self.value is not None
        to_key, to_value = self.key, self.value
        if self.old.type in _PERCPU and self.new.type in _PERCPU:
            to_value = _percpu(self.value, self.old.value_size, self.new.value_size, ncpu)
        elif (self.old.type in _PERCPU) != (self.new.type in _PERCPU):
            return 0                                 # per-CPU and shared values do not translate
        cur, nxt = f.NULL, f.new("char[]", self.old.key_size)
        value = f.new("char[]", old_vsize)
        probe = f.new("char[]", max(new_vsize, 1))
        written = 0
        while lb.bpf_map_get_next_key(self.old_fd, cur, nxt) == 0:
            raw_key = bytes(f.buffer(nxt))
            cur = f.new("char[]", raw_key)
            if lb.bpf_map_lookup_elem(self.old_fd, nxt, value) != 0:
                continue                              # deleted meanwhile
            key = to_key(raw_key)
            if only_missing and lb.bpf_map_lookup_elem(self.new_fd, key, probe) == 0:
                continue
            rc = lb.bpf_map_update_elem(self.new_fd, key, to_value(bytes(f.buffer(value))), 0)
            if rc < 0:
                self.refused += 1
                self.reasons.add(os.strerror(-rc if rc != -1 else f.errno))
                continue
            written += 1
        self.copied += written
        return written

    def finish(self) -> None:
        """The old map is over: unpin it (it is freed when the old programs let go of it)."""
        if self.old_fd >= 0:
            os.close(self.old_fd)
            self.old_fd = -1
        self.parked.unlink(missing_ok=True)
        log.info("map %s taken over: %d entries copied%s; the previous version's map is unpinned", self.name,
                 self.copied, f", {self.refused} did not fit ({', '.join(sorted(self.reasons))})" if self.refused
                 else "")


def _parked(parked_dir: Path, name: str) -> list[tuple[Path, int]]:
    """The parked versions of map `name`, newest first."""
    if not parked_dir.is_dir():
        return []
    found = []
    for p in parked_dir.iterdir():
        base, _, seq = p.name.rpartition(_SEQ)
        if base == name and seq.isdigit():
            found.append((p, int(seq)))
    return sorted(found, key=lambda pair: -pair[1])


def _park(pin: Path, parked_dir: Path) -> Path:
    parked_dir.mkdir(exist_ok=True)
    target = parked_dir / f"{pin.name}{_SEQ}{1 + max((n for _, n in _parked(parked_dir, pin.name)), default=0)}"
    os.rename(pin, target)
    return target


def prepare(obj: Any, pin_root: Path) -> list[Migration]:
    """Before bpf_object__load: every pinned map the object cannot reuse as it is is parked, and the maps
    parked by an agent that died mid-way are picked up again; the new maps are created by the load."""
    f, lb = ffi(), lib()
    btf = lb.bpf_object__btf(obj)
    parked_dir = pin_root / PARKED
    out: list[Migration] = []
    m = lb.bpf_object__next_map(obj, f.NULL)
    while m != f.NULL:
        name = f.string(lb.bpf_map__name(m)).decode()
        pin_path = lb.bpf_map__pin_path(m)
        m_next = lb.bpf_object__next_map(obj, m)
        if pin_path == f.NULL:
            m = m_next
            continue
        want = object_def(m, btf)
        pin = Path(f.string(pin_path).decode())
        sources = [p for p, _ in _parked(parked_dir, name)]
        if pin.exists():
            fd = lb.bpf_obj_get(str(pin).encode())
            if fd < 0:
                raise BpfError(-fd if fd != -1 else f.errno, f"opening the pinned map {pin}")
            try:
                have = pinned_def(fd)
            finally:
                os.close(fd)
            if have.shape != want.shape or (have.key is not None and want.key is not None and have.key != want.key) \
                    or (have.value is not None and want.value is not None and have.value != want.value):
                log.warning("pinned map %s was made by another version (%s): taking it over into a new map",
                            pin, "; ".join(have.differs(want)))
                sources.insert(0, _park(pin, parked_dir))
        for parked in sources:                         # newest first: its entries win
            fd = lb.bpf_obj_get(str(parked).encode())
            if fd < 0:
                continue
            have = pinned_def(fd)
            mig = Migration(name, fd, parked, have, want, converter(have.key, want.key, have.key_size, want.key_size),
                            converter(have.value, want.value, have.value_size, want.value_size))
            if not mig.convertible:
                log.warning("map %s: the previous version's entries cannot be matched to this one's (%s; no BTF "
                            "to match fields by name): it starts empty", name, "; ".join(have.differs(want)))
            out.append(mig)
        m = m_next
    return out


def restore(migrations: list[Migration], pin_root: Path) -> None:
    """The load failed: the parked maps go back where they were (the previous version keeps its state)."""
    for mig in migrations:
        pin = pin_root / mig.name
        if mig.old_fd >= 0:
            os.close(mig.old_fd)
            mig.old_fd = -1
        if not pin.exists() and mig.parked.exists():
            os.rename(mig.parked, pin)


def first_pass(migrations: list[Migration], map_fd: Callable[[str], int]) -> None:
    """After the load: the new maps exist; copy everything the old maps hold."""
    seen: set[str] = set()
    for mig in migrations:               # several for one map (interrupted take-overs): the newest first wins
        mig.new_fd = map_fd(mig.name)
        n = mig.copy(only_missing=mig.name in seen)
        seen.add(mig.name)
        log.info("map %s: %d entries copied from the previous version's map (%s)", mig.name, n,
                 "; ".join(mig.old.differs(mig.new)) or "leftover of an interrupted take-over")


def last_pass(migrations: list[Migration]) -> None:
    """After the new programs are attached: what the old programs created meanwhile, then unpin the old."""
    for mig in migrations:
        mig.copy(only_missing=True)
        mig.finish()
    if migrations:
        parked_dir = migrations[0].parked.parent
        if parked_dir.is_dir() and not any(parked_dir.iterdir()):
            parked_dir.rmdir()
    migrations.clear()
