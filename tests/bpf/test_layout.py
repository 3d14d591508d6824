"""The struct layouts Python writes into maps equal the ones the compiled BPF object was built with:
every shared struct's size and member offsets from the object's BTF, compared with cffi's view."""

from __future__ import annotations

import re
from typing import Any, cast

import cffi

from bpflb.datapath.libbpf import ffi, objects_dir, structs_header

_BTF_CDEF = """
struct btf;
struct btf_type { uint32_t name_off; uint32_t info; uint32_t size; };
struct btf_member { uint32_t name_off; uint32_t type; uint32_t offset; };
struct btf *btf__parse_elf(const char *path, void *btf_ext);
void btf__free(struct btf *btf);
int btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);
"""
BTF_KIND_STRUCT = 4


def _btf_layout(obj_path: str, struct: str) -> tuple[int, dict[str, int]] | None:
    f = cffi.FFI()
    f.cdef(_BTF_CDEF)
    lib: Any = f.dlopen("libbpf.so.1")      # typed Any as libbpf.lib(): the cdef'd functions are dynamic
    btf = lib.btf__parse_elf(obj_path.encode(), f.NULL)
    assert btf != f.NULL, f"no BTF in {obj_path}"
    try:
        tid = lib.btf__find_by_name_kind(btf, struct.encode(), BTF_KIND_STRUCT)
        if tid <= 0:
            return None
        t = lib.btf__type_by_id(btf, tid)
        vlen, kflag = t.info & 0xFFFF, (t.info >> 31) & 1
        members = f.cast("struct btf_member *", t + 1)
        offsets = {}
        for i in range(vlen):
            bits = members[i].offset & 0xFFFFFF if kflag else members[i].offset
            offsets[cast(bytes, f.string(lib.btf__name_by_offset(btf, members[i].name_off))).decode()] = bits // 8
        return int(t.size), offsets
    finally:
        lib.btf__free(btf)


# Every object whose maps hold shared structs; a struct is checked in the first one that has it.
OBJECTS = ("bpf_lb.o", "bpf_sock.o")


def test_every_shared_struct_matches_the_compiled_object() -> None:
    names = re.findall(r"^struct (\w+) \{", structs_header().read_text(), re.MULTILINE)
    assert {"lb_svc_key", "lb_svc_val", "lb_backend", "ct_tuple", "ct_entry", "lb_config",
            "lb_sock_rev_key", "lb_sock_rev_val", "lb_sock_affinity_key"} <= set(names)
    for name in names:
        found = next((lay for obj in OBJECTS if (lay := _btf_layout(str(objects_dir() / obj), name))), None)
        assert found is not None, f"struct {name} is in the BTF of none of {', '.join(OBJECTS)}"
        size, offsets = found
        assert ffi().sizeof(f"struct {name}") == size, name
        for member, off in offsets.items():
            assert ffi().offsetof(f"struct {name}", member) == off, f"{name}.{member}"


def test_the_packed_encoders_match_the_structs() -> None:
    """LBMaps packs its hottest entries with struct layouts; they must equal cffi's (hence BTF's) layout."""
    from ipaddress import IPv4Address

    from bpflb.datapath.lbmaps import BACKEND, SVC_KEY, SVC_VAL, svc_key
    from bpflb.model.types import L4Addr, Proto

    f = ffi()
    for name, st in (("lb_svc_key", SVC_KEY), ("lb_svc_val", SVC_VAL), ("lb_backend", BACKEND)):
        assert st.size == f.sizeof(f"struct {name}"), name
    l4 = L4Addr(IPv4Address("198.18.0.11"), 30080, Proto.UDP)
    want = f.new("struct lb_svc_key *", {"addr": int.from_bytes(l4.addr.packed, "little"),
                                        "port": int.from_bytes((30080).to_bytes(2, "big"), "little"),
                                        "slot": 513, "proto": 17})
    assert svc_key(l4, 513) == bytes(f.buffer(want))
    val = f.new("struct lb_svc_val *", {"id": 0x01020304, "count": 0x0506, "flags": 0x0708,
                                       "affinity_timeout": 0x090A0B0C, "algorithm": 1})
    assert SVC_VAL.pack(0x01020304, 0x0506, 0x0708, 0x090A0B0C, 1) == bytes(f.buffer(val))
    be = f.new("struct lb_backend *", {"addr": int.from_bytes(bytes([10, 244, 2, 10]), "little"),
                                      "port": int.from_bytes((8080).to_bytes(2, "big"), "little"),
                                      "proto": 6, "flags": 1})
    assert BACKEND.pack(bytes([10, 244, 2, 10]), (8080).to_bytes(2, "big"), 6, 1) == bytes(f.buffer(be))
