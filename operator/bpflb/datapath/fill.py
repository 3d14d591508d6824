"""How full a kernel BPF map is: its type and capacity from the kernel (BPF_OBJ_GET_INFO_BY_FD), its entries
counted with batched lookups (BPF_MAP_LOOKUP_BATCH: a few dozen syscalls for the 262,144 entries of a full
conntrack map), key by key where a map type has no batch operations (LPM tries). Arrays are always full
by construction and have no fill level."""

from __future__ import annotations

import errno
from typing import Any

from bpflb.datapath.base import MapFill
from bpflb.datapath.libbpf import ffi, lib
from bpflb.datapath.loader import Map

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_ARRAYS = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})
_PERCPU = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH})
_BATCH_BYTES = 4 << 20          # keys and values fetched per lookup_batch call, at most
_ENOTSUPP = 524                 # the kernel's own "not supported" (not in errno)


def _errno(rc: int) -> int:
    return -rc if rc != -1 else int(ffi().errno)


def map_info(fd: int) -> Any:
    """The kernel's struct bpf_map_info (its prefix) of a map fd."""
    info = ffi().new("struct bpf_map_info_prefix *")
    size = ffi().new("__u32 *", ffi().sizeof("struct bpf_map_info_prefix"))
    rc = lib().bpf_obj_get_info_by_fd(fd, info, size)
    if rc < 0:
        raise OSError(_errno(rc), f"BPF_OBJ_GET_INFO_BY_FD on map fd {fd}")
    return info


def _count_by_keys(fd: int, key_size: int) -> int:
    f, count = ffi(), 0
    cur, nxt = f.new("char[]", key_size), f.new("char[]", key_size)
    first = True
    while lib().bpf_map_get_next_key(fd, f.NULL if first else cur, nxt) == 0:
        count += 1
        first = False
        f.memmove(cur, nxt, key_size)
    return count


def count_entries(fd: int, key_size: int, value_size: int) -> int:
    """Entries in a (non-per-CPU) hash-like map, read in batches; key by key without batch support."""
    f = ffi()
    per_call = max(1, min(8192, _BATCH_BYTES // max(1, key_size + value_size)))
    token_size = max(key_size, 8)
    tokens = [f.new("char[]", token_size), f.new("char[]", token_size)]
    opts = f.new("struct bpf_map_batch_opts *", {"sz": f.sizeof("struct bpf_map_batch_opts")})
    keys, values = f.new("char[]", per_call * key_size), f.new("char[]", per_call * value_size)
    count = f.new("__u32 *")
    total, first = 0, True
    while True:
        count[0] = per_call
        rc = lib().bpf_map_lookup_batch(fd, f.NULL if first else tokens[0], tokens[1], keys, values, count, opts)
        err = _errno(rc) if rc < 0 else 0
        if err == errno.ENOSPC and per_call < (1 << 20):   # one hash bucket holds more than a batch
            per_call *= 2
            keys, values = f.new("char[]", per_call * key_size), f.new("char[]", per_call * value_size)
            continue
        if err in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP) and first:
            return _count_by_keys(fd, key_size)
        if err not in (0, errno.ENOENT):
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on map fd {fd}")
        total += int(count[0])
        if err == errno.ENOENT:
            return total
        f.memmove(tokens[0], tokens[1], token_size)
        first = False


def kernel_fill(m: Map) -> MapFill | None:
    """A kernel map's fill level; None for arrays (full by construction) and per-CPU maps."""
    info = map_info(m.fd)
    if info.type in _ARRAYS or info.type in _PERCPU:
        return None
    return MapFill(count_entries(m.fd, int(info.key_size), int(info.value_size)), int(info.max_entries))
