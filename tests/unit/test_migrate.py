"""The field-by-name translation of datapath.migrate, without a kernel: fields moved, added, dropped and
resized; per-CPU values; what cannot be matched without BTF; what a changed definition says in the log."""

from __future__ import annotations

import struct

from bpflb.datapath.migrate import Field, MapDef, _percpu, converter

OLD = (Field("last_seen", 0, 8, "int"), Field("backend_id", 8, 4, "int"), Field("flags", 12, 1, "int"),
       Field("pad", 13, 3, "bytes"))
# A later layout: a field in front (everything moves), backend_id widened, flags kept, pad gone, a new field.
NEW = (Field("state", 0, 4, "int"), Field("flags", 4, 1, "int"), Field("last_seen", 8, 8, "int"),
       Field("backend_id", 16, 8, "int"), Field("syn_seq", 24, 4, "int"))


def test_fields_are_matched_by_name_whatever_moved() -> None:
    up = converter(OLD, NEW, 16, 32)
    assert up is not None
    old = struct.pack("<QIB3s", 123456789, 77, 5, b"xyz")
    new = up(old)
    state, flags, last_seen, backend_id, syn_seq = struct.unpack("<IB3xQQI4x", new)
    assert (state, flags, last_seen, backend_id, syn_seq) == (0, 5, 123456789, 77, 0)
    down = converter(NEW, OLD, 32, 16)
    assert down is not None
    assert down(new) == struct.pack("<QIB3s", 123456789, 77, 5, b"\0\0\0")    # pad was dropped, so it is zero


def test_an_integer_that_shrinks_keeps_its_low_bytes() -> None:
    narrow = converter((Field("n", 0, 8, "int"),), (Field("n", 0, 2, "int"),), 8, 2)
    assert narrow is not None and narrow((0x123456789).to_bytes(8, "little")) == (0x6789).to_bytes(2, "little")


def test_the_same_layout_is_copied_as_it_is_and_without_btf_only_when_the_sizes_agree() -> None:
    same = converter(OLD, OLD, 16, 16)
    assert same is not None and same(b"a" * 16) == b"a" * 16
    raw = converter(None, NEW, 32, 32)
    assert raw is not None and raw(b"b" * 32) == b"b" * 32
    assert converter(None, NEW, 16, 32) is None
    assert converter(OLD, None, 16, 32) is None


def test_per_cpu_values_are_translated_cpu_by_cpu() -> None:
    widen = converter((Field("n", 0, 4, "int"),), (Field("n", 0, 8, "int"),), 4, 8)
    assert widen is not None
    each = _percpu(widen, 4, 8, 3)
    old = b"".join(struct.pack("<I4x", v) for v in (1, 2, 3))      # 4-byte values, each slot 8 bytes
    assert each(old) == struct.pack("<QQQ", 1, 2, 3)


def test_what_differs_is_said_in_words() -> None:
    a = MapDef(9, 16, 48, 262144, 0, None, OLD)
    b = MapDef(1, 16, 56, 131072, 0, None, NEW)
    said = a.differs(b)
    assert said[:3] == ["type 9 -> 1", "value size 48 -> 56", "max_entries 262144 -> 131072"]
    assert said[3].startswith("value layout ") and "+state" in said[3] and "-pad" in said[3] and \
        "~backend_id" in said[3]
