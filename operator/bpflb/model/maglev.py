"""Maglev consistent hashing: the lookup table every node builds identically from a frontend's backends,
and the packet hash the datapath indexes it with (bpf_objects/include/maglev.h computes the same one).

The table has M entries (M prime, from TABLE_SIZES). Backends are ordered by a stable name and each gets
two hashes of that name keyed by the cluster-wide seed: offset = h1 % M and skip = h2 % (M - 1) + 1 give
its preference list (offset + j * skip) % M. Backends take turns, in name order, claiming their next free
preferred entry until the table is full (Eisenbud et al., "Maglev", NSDI 2016, section 3.4). Only the
names, M and the seed decide the table, so every node computes the same one.

The fill loop runs in a small C helper (native/maglev.c, built by `make` into the objects directory)
loaded with ctypes; without it the plain-Python reference below gives the same tables, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
from array import array
from collections.abc import Sequence
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path

log = logging.getLogger(__name__)

# Table sizes offered (primes; Cilium's list). Keep M above 100 x backends for an even spread.
TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381
DEFAULT_SEED = 0
SEED_MAX = 0xFFFFFFFF
MAX_BACKENDS = 0xFFFF            # table entries are 16-bit slot numbers
NATIVE_LIB = "libbpflb_maglev.so"

_U32 = 0xFFFFFFFF
_JHASH_INITVAL = 0xDEADBEEF


class MaglevError(ValueError):
    """Arguments a Maglev table cannot be built from (the message says which and why)."""


def _check(names: Sequence[str], m: int, seed: int) -> None:
    if m not in TABLE_SIZES:
        raise MaglevError(f"table size must be one of {', '.join(map(str, TABLE_SIZES))}; got {m}")
    if not 0 <= seed <= SEED_MAX:
        raise MaglevError(f"seed must be an integer in 0..{SEED_MAX}; got {seed}")
    if not names:
        raise MaglevError("no backends: a table needs at least one")
    if len(names) > MAX_BACKENDS:
        raise MaglevError(f"at most {MAX_BACKENDS} backends per table; got {len(names)}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise MaglevError(f"backend names must be unique; repeated: {', '.join(dup)}")


def permutation(name: str, m: int, seed: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list: two 64-bit halves of BLAKE2b(name) keyed by the seed."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed.to_bytes(4, "little")).digest()
    h1, h2 = struct.unpack("<QQ", digest)
    return h1 % m, h2 % (m - 1) + 1


def reference_fill(m: int, offsets: Sequence[int], skips: Sequence[int], labels: Sequence[int]) -> list[int]:
    """The population loop in plain Python: table[e] = labels[i] of the backend that claimed e."""
    n = len(offsets)
    table = [0] * m
    pos = list(offsets)
    filled = 0
    while filled < m:
        for i in range(n):
            c, skip = pos[i], skips[i]
            while table[c]:
                c += skip
                if c >= m:
                    c -= m
            table[c] = labels[i]
            c += skip
            pos[i] = c - m if c >= m else c
            filled += 1
            if filled == m:
                break
    return table


def _objects_dir() -> Path:
    """Where `make` puts compiled objects: $BPFLB_BPF_DIR, else the source tree's bpf_objects/build."""
    env = os.environ.get("BPFLB_BPF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "bpf_objects" / "build"


@cache
def _native() -> ctypes.CDLL | None:
    path = _objects_dir() / NATIVE_LIB
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.warning("Maglev tables are built in plain Python, about 30x slower: cannot load %s (%s); "
                    "run `make` to build it", path, exc)
        return None
    fn = lib.bpflb_maglev_fill
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    return lib


def native_available() -> bool:
    """Whether the C fill loop is loaded (else tables come from the plain-Python reference)."""
    return _native() is not None


def build_slots(names: Sequence[str], m: int = DEFAULT_TABLE_SIZE, seed: int = DEFAULT_SEED, *,
                native: bool = True) -> array[int]:
    """The table for backends named `names`, as 1-based positions in `names` (the frontend's slots).

    The turn order is the names' sorted order, whatever order `names` is in, so the same backends give
    the same table of names on every node. native=False forces the plain-Python loop (benchmarks, tests).
    """
    _check(names, m, seed)
    order = sorted(range(len(names)), key=names.__getitem__)
    params = [permutation(names[i], m, seed) for i in order]
    offsets = array("I", (p[0] for p in params))
    skips = array("I", (p[1] for p in params))
    labels = array("H", (i + 1 for i in order))
    lib = _native() if native else None
    if lib is None:
        return array("H", reference_fill(m, offsets, skips, labels))
    table = array("H", bytes(2 * m))
    rc = lib.bpflb_maglev_fill(m, len(names), offsets.buffer_info()[0], skips.buffer_info()[0],
                               labels.buffer_info()[0], table.buffer_info()[0])
    if rc != 0:
        raise MaglevError(f"native Maglev fill refused m={m}, n={len(names)}")
    return table


def build_table(names: Sequence[str], m: int = DEFAULT_TABLE_SIZE, seed: int = DEFAULT_SEED, *,
                native: bool = True) -> list[str]:
    """The table as backend names, entry by entry (for tests and tools)."""
    return [names[s - 1] for s in build_slots(names, m, seed, native=native)]


def _rol32(v: int, s: int) -> int:
    return ((v << s) | (v >> (32 - s))) & _U32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """Linux's jhash_3words (include/linux/jhash.h), as the datapath computes it."""
    initval = (initval + _JHASH_INITVAL + (3 << 2)) & _U32
    a, b, c = (a + initval) & _U32, (b + initval) & _U32, (c + initval) & _U32
    c ^= b
    c = (c - _rol32(b, 14)) & _U32
    a ^= c
    a = (a - _rol32(c, 11)) & _U32
    b ^= a
    b = (b - _rol32(a, 25)) & _U32
    c ^= b
    c = (c - _rol32(b, 16)) & _U32
    a ^= c
    a = (a - _rol32(c, 4)) & _U32
    b ^= a
    b = (b - _rol32(a, 14)) & _U32
    c ^= b
    c = (c - _rol32(b, 24)) & _U32
    return c


def packet_hash(client: IPv4Address, client_port: int, frontend_port: int, proto: int,
                seed: int = DEFAULT_SEED) -> int:
    """The datapath's hash of a new flow (maglev_packet_hash): the frontend address is not part of it."""
    return jhash_3words(int(client), (client_port << 16) | frontend_port, proto, seed)


def pick(names: Sequence[str], client: IPv4Address, client_port: int, frontend_port: int, proto: int,
         m: int = DEFAULT_TABLE_SIZE, seed: int = DEFAULT_SEED) -> str:
    """The backend name the datapath's Maglev table gives this flow (for tests and tools)."""
    slots = build_slots(names, m, seed)
    return names[slots[packet_hash(client, client_port, frontend_port, proto, seed) % m] - 1]
