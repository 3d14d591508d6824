"""A thin cffi (ABI mode) binding to the system libbpf (libbpf.so.1) and to bpflb's shared structs.

Only what bpflb uses is declared.  Struct declarations are copied from libbpf 1.1's public
headers; libbpf's `sz` fields make a declared prefix of a newer struct valid.  The shared
map structs come from bpf_objects/include/lb_structs.h, the same file the BPF C includes.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from functools import cache
from pathlib import Path
from typing import Any

import cffi

_LIBBPF_CDEF = """
typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
typedef int32_t __s32;

struct bpf_object; struct bpf_program; struct bpf_map;

struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    bool relaxed_maps;
    const char *pin_root_path;
    __u32 _stub_attach_prog_fd;
    const char *kconfig;
    const char *btf_custom_path;
    char *kernel_log_buf;
    size_t kernel_log_size;
    __u32 kernel_log_level;
};

struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
const char *bpf_map__pin_path(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
__u32 bpf_map__map_flags(const struct bpf_map *map);

/* struct bpf_map_info (uapi linux/bpf.h), the prefix bpflb reads. */
struct bpf_map_info_prefix {
    __u32 type; __u32 id; __u32 key_size; __u32 value_size; __u32 max_entries; __u32 map_flags;
};
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);

int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_lookup_and_delete_elem(int fd, const void *key, void *value);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_get(const char *pathname);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_map_create(int map_type, const char *map_name, __u32 key_size, __u32 value_size, __u32 max_entries,
                   const void *opts);

struct bpf_map_batch_opts { size_t sz; __u64 elem_flags; __u64 flags; };
int bpf_map_update_batch(int fd, const void *keys, const void *values, __u32 *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_map_delete_batch(int fd, const void *keys, __u32 *count, const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values, __u32 *count,
                         const struct bpf_map_batch_opts *opts);

enum bpf_tc_attach_point { BPF_TC_INGRESS = 1, BPF_TC_EGRESS = 2, BPF_TC_CUSTOM = 4 };
struct bpf_tc_hook { size_t sz; int ifindex; enum bpf_tc_attach_point attach_point; __u32 parent; };
struct bpf_tc_opts { size_t sz; int prog_fd; __u32 flags; __u32 prog_id; __u32 handle; __u32 priority; };
int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in; void *data_out; __u32 data_size_in; __u32 data_size_out;
    const void *ctx_in; void *ctx_out; __u32 ctx_size_in; __u32 ctx_size_out;
    __u32 retval; int repeat; __u32 duration; __u32 flags; __u32 cpu; __u32 batch_size;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

/* struct xdp_md (uapi linux/bpf.h), the XDP test-run context. */
struct xdp_md_ctx {
    __u32 data; __u32 data_end; __u32 data_meta; __u32 ingress_ifindex; __u32 rx_queue_index;
    __u32 egress_ifindex;
};

struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; };
int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_detach(int ifindex, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_query_id(int ifindex, int flags, __u32 *prog_id);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);

/* cgroup v2 attachment of the socket LB through BPF links (pinned in bpffs to outlive the agent). */
struct bpf_link;
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
struct bpf_link *bpf_link__open(const char *path);
int bpf_link__pin(struct bpf_link *link, const char *path);
int bpf_link__update_program(struct bpf_link *link, struct bpf_program *prog);
int bpf_link__detach(struct bpf_link *link);
int bpf_link__destroy(struct bpf_link *link);
int bpf_link__fd(const struct bpf_link *link);
int bpf_prog_query(int target_fd, int type, __u32 query_flags, __u32 *attach_flags, __u32 *prog_ids,
                   __u32 *prog_cnt);
/* (bpf_obj_get_info_by_fd is declared with the maps' functions above) */
/* struct bpf_link_info (uapi linux/bpf.h) up to its cgroup member; the kernel fills a shorter struct. */
struct bpf_link_info_cgroup {
    __u32 type; __u32 id; __u32 prog_id; __u32 _pad; __u64 cgroup_id; __u32 attach_type; __u32 _pad2;
};

/* struct __sk_buff prefix used as test-run context (uapi linux/bpf.h). */
struct sk_buff_ctx {
    __u32 len; __u32 pkt_type; __u32 mark; __u32 queue_mapping; __u32 protocol; __u32 vlan_present;
    __u32 vlan_tci; __u32 vlan_proto; __u32 priority; __u32 ingress_ifindex; __u32 ifindex; __u32 tc_index;
    __u32 cb[5]; __u32 hash; __u32 tc_classid; __u32 data; __u32 data_end; __u32 napi_id;
    __u32 family; __u32 remote_ip4; __u32 local_ip4; __u32 remote_ip6[4]; __u32 local_ip6[4];
    __u32 remote_port; __u32 local_port; __u32 data_meta; __u64 flow_keys; __u64 tstamp; __u32 wire_len;
    __u32 gso_segs; __u64 sk; __u32 gso_size; __u8 tstamp_type; __u8 _pad[3]; __u64 hwtstamp;
};

/* Taking over another version's pinned maps (datapath.migrate): the whole struct bpf_map_info (uapi
 * linux/bpf.h), its BTF ids included, and libbpf's BTF reader (btf.h; struct btf_type, btf_member, btf_array
 * as uapi linux/btf.h lays them out). */
struct bpflb_map_info {
    __u32 type; __u32 id; __u32 key_size; __u32 value_size; __u32 max_entries; __u32 map_flags;
    char name[16]; __u32 ifindex; __u32 btf_vmlinux_value_type_id; __u64 netns_dev; __u64 netns_ino;
    __u32 btf_id; __u32 btf_key_type_id; __u32 btf_value_type_id; __u32 _pad; __u64 map_extra;
};
__u32 bpf_map__btf_key_type_id(const struct bpf_map *map);
__u32 bpf_map__btf_value_type_id(const struct bpf_map *map);
struct btf;
struct btf_ext;
struct btf_type { __u32 name_off; __u32 info; __u32 size_or_type; };
struct btf_member { __u32 name_off; __u32 type; __u32 offset; };
struct btf_array { __u32 type; __u32 index_type; __u32 nelems; };
struct btf *bpf_object__btf(const struct bpf_object *obj);
struct btf *btf__load_from_kernel_by_id(__u32 id);
struct btf *btf__parse(const char *path, struct btf_ext **btf_ext);
void btf__free(struct btf *btf);
__u32 btf__type_cnt(const struct btf *btf);
const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
"""

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_TEST_XDP_LIVE_FRAMES = 2  # test_run flag: XDP frames really transmitted (Linux 5.18+)
BPF_TC_F_REPLACE = 1
XDP_FLAGS_SKB_MODE = 2      # generic XDP
XDP_FLAGS_DRV_MODE = 4      # native XDP in the driver
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7


class BpfError(OSError):
    """A libbpf call failed; the message names the call and the object it was about."""


class BatchError(BpfError):
    """A batch map operation stopped at an element: done elements before it were applied, none after."""

    def __init__(self, errno_: int, message: str, done: int) -> None:
        super().__init__(errno_, message)
        self.done = done


def objects_dir() -> Path:
    """Where the compiled BPF objects are: $BPFLB_BPF_DIR, else the source tree's bpf_objects/build."""
    env = os.environ.get("BPFLB_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "bpf_objects" / "build"


def structs_header() -> Path:
    """The shared struct header: $BPFLB_BPF_INCLUDE, else the source tree's bpf_objects/include."""
    env = os.environ.get("BPFLB_BPF_INCLUDE")
    base = Path(env) if env else Path(__file__).resolve().parents[3] / "bpf_objects" / "include"
    return base / "lb_structs.h"


_DEFINE_INT = re.compile(r"^#define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)\s*(/\*.*\*/)?\s*$")


def _header_for_cffi(text: str) -> str:
    """Keep the plain declarations and integer #defines of a C header, drop other directives. #ifdef/#ifndef
    blocks are honoured for names the header itself #defines (nothing is defined from outside): Python sees
    the default build, which is what `make bpf` compiles (test builds add -D flags; their maps are read by
    the sizes the kernel reports, see loader.Map)."""
    kept = []
    defined: set[str] = set()
    active: list[bool] = []
    for line in text.splitlines():
        stripped = line.strip()
        words = stripped.split()
        if words and words[0] in ("#ifdef", "#ifndef") and len(words) > 1:
            on = (words[1] in defined) == (words[0] == "#ifdef")
            active.append(on and all(active))
            continue
        if words and words[0] == "#else" and active:
            outer = all(active[:-1])
            active[-1] = outer and not active[-1]
            continue
        if words and words[0] == "#endif" and active:
            active.pop()
            continue
        if not all(active):
            continue
        if words and words[0] == "#define" and len(words) > 1:
            defined.add(words[1])
        if stripped.startswith("#") and not _DEFINE_INT.match(stripped):
            continue
        kept.append(line)
    return "\n".join(kept)


_FFI_LOCK = threading.Lock()
_FFI: Any = None


def ffi() -> Any:
    """The FFI holding libbpf's declarations and the shared structs (typed Any: cdata fields are dynamic).
    Built once, under a lock (two FFI instances must never meet); afterwards a plain read."""
    if _FFI is not None:
        return _FFI
    return _build_ffi()


def _build_ffi() -> Any:
    global _FFI
    with _FFI_LOCK:
        if _FFI is None:
            _FFI = _ffi()
        return _FFI


@cache
def _ffi() -> Any:
    f = cffi.FFI()
    f.cdef(_LIBBPF_CDEF)
    f.cdef(_header_for_cffi(structs_header().read_text()))
    return f


@cache
def lib() -> Any:
    """The loaded libbpf.so.1 (Debian package libbpf1)."""
    try:
        return ffi().dlopen("libbpf.so.1")
    except OSError as exc:
        raise BpfError(errno.ENOENT, f"cannot load libbpf.so.1 (install Debian package libbpf1): {exc}") from exc


def check(rc: int, what: str) -> int:
    """Raise BpfError for a negative libbpf return code; return rc otherwise."""
    if rc < 0:
        err = -rc if rc != -1 else ffi().errno
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


@cache
def stat_names() -> dict[int, str]:
    """Counter index -> name ("new_flow", ...) from the STAT_* #defines of lb_structs.h."""
    names = {}
    for match in re.finditer(r"^#define STAT_(\w+)\s+(\d+)", structs_header().read_text(), re.MULTILINE):
        if match.group(1) != "MAX":
            names[int(match.group(2))] = match.group(1).lower()
    return names


def const(name: str) -> int:
    """An integer #define of lb_structs.h (e.g. LB_MODE_DSR)."""
    value: int = getattr(lib(), name)
    return value


def map_info(fd: int) -> Any:
    """What the kernel says of the map behind fd (struct bpf_map_info: type, sizes, max_entries, BTF ids)."""
    info = ffi().new("struct bpflb_map_info *")
    size = ffi().new("__u32 *", ffi().sizeof("struct bpflb_map_info"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, size), f"reading the definition of map fd {fd}")
    return info


def possible_cpus() -> int:
    """Number of possible CPUs (the per-CPU map value count)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) if hi else int(lo)) - int(lo) + 1
    return total
