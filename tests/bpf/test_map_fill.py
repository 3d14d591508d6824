"""Map fill levels read from the real kernel (what bpflb_map_pressure reports): capacity from the kernel's map
info, entries counted with batched lookups (hash and LRU maps, past one batch), key by key for LPM tries,
and no fill level for arrays."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from bpflb.datapath.base import MapFill
from bpflb.datapath.fill import count_entries, kernel_fill
from bpflb.datapath.libbpf import const
from bpflb.datapath.loader import BpfObject, load_lb

pytestmark = pytest.mark.privileged


@pytest.fixture
def obj() -> Iterator[BpfObject]:
    loaded = load_lb(None)              # unpinned: maps of this test only
    try:
        yield loaded
    finally:
        loaded.close()


def test_hash_and_lru_maps_are_counted_past_one_batch(obj: BpfObject) -> None:
    backends = obj.map("lb_backends")
    assert kernel_fill(backends) == MapFill(0, const("LB_BACKENDS_MAX"))
    value = bytes(backends.value_size)
    backends.update_many([(struct.pack("=I", i), value) for i in range(1, 20001)])
    assert kernel_fill(backends) == MapFill(20000, const("LB_BACKENDS_MAX"))

    ct = obj.map("ct_fwd")
    entries = [(i.to_bytes(ct.key_size, "little"), bytes(ct.value_size)) for i in range(1, 3001)]
    for key, val in entries:
        ct.update_raw(key, val)
    fill = kernel_fill(ct)
    assert fill is not None and fill.capacity == const("CT_MAX")
    assert fill.entries == 3000 and fill.pressure == pytest.approx(3000 / const("CT_MAX"))
    backends.delete_many([struct.pack("=I", i) for i in range(1, 5001)])
    assert count_entries(backends.fd, backends.key_size, backends.value_size) == 15000


def test_lpm_tries_are_counted_key_by_key_and_arrays_have_no_fill_level(obj: BpfObject) -> None:
    cidrs = obj.map("lb_cluster_cidrs")
    for i in range(10):
        key = struct.pack("=I4s", 24, bytes([10, 244, i, 0]))
        cidrs.update_raw(key, b"\x01")
    assert kernel_fill(cidrs) == MapFill(10, 4096)
    assert kernel_fill(obj.map("lb_config")) is None
    assert kernel_fill(obj.map("lb_stats")) is None
