"""Loading bpflb's BPF objects through libbpf: bpffs, pinned maps, tc attachment, test runs."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bpflb.datapath import migrate
from bpflb.datapath.libbpf import (
    BPF_ANY,
    BPF_F_TEST_XDP_LIVE_FRAMES,
    BPF_TC_F_REPLACE,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    BatchError,
    BpfError,
    check,
    ffi,
    lib,
    map_info,
    objects_dir,
)

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/bpflb")
LB_OBJECT = "bpf_lb.o"
XDP_OBJECT = "bpf_xdp.o"
SOCK_OBJECT = "bpf_sock.o"
TC_HANDLE = 0xB1B
TC_PRIORITY = 1


def bpffs_mountpoint(path: Path) -> Path | None:
    """The bpffs mount that holds path, or None when no bpf filesystem covers it."""
    best: Path | None = None
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3 or fields[2] != "bpf":
                continue
            mnt = Path(fields[1].replace("\\040", " "))
            if (path == mnt or mnt in path.parents) and (best is None or len(mnt.parts) > len(best.parts)):
                best = mnt
    return best


BPF_FS_MAGIC = 0xCAFE4A11


def on_bpffs(path: Path) -> bool:
    """Whether path (or, while it does not exist yet, its nearest existing parent) is on a bpf filesystem, as
    the kernel sees it (statfs: a bpffs hidden under another mount does not count)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    buf = ctypes.create_string_buffer(256)          # struct statfs; f_type is its first word
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(str(probe).encode(), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == BPF_FS_MAGIC


class NotOnBpffs(BpfError):
    """The pin root is on no bpf filesystem: maps created there would die with this mount namespace."""


BPFFS_ROOT = Path("/sys/fs/bpf")


def mount_bpffs(target: Path = BPFFS_ROOT) -> bool:
    """Mount bpffs at target unless a bpf filesystem is already mounted exactly there; True when mounted now.
    What the DaemonSet's init container runs (`bpflb mount-bpffs`) on the host's /sys/fs/bpf, with
    Bidirectional propagation, so the mount is the host's and outlives every pod."""
    if on_bpffs(target) and bpffs_mountpoint(target) == target:
        return False
    target.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(target).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"mount -t bpf bpf {target}: {os.strerror(err)}")
    log.info("mounted bpffs at %s (it was missing)", target)
    return True


def ensure_bpffs(pin_root: Path, mount: bool = False) -> None:
    """The pin root must be on the node's bpf filesystem, or the maps die with this process's mount namespace
    (every flow dropped at the next restart, the programs replaced by ones on fresh maps). The agent never
    mounts one itself unless told (mount: an agent run directly on the host, `--mount-bpffs`): in a pod, a
    bpffs mounted by the agent would be the pod's own. NotOnBpffs says what to do instead."""
    if on_bpffs(pin_root):
        _warn_if_private(pin_root)
        return
    if mount:
        if BPFFS_ROOT not in pin_root.parents:
            raise NotOnBpffs(22, f"pin root {pin_root} is not on a bpf filesystem and not under {BPFFS_ROOT}")
        mount_bpffs(BPFFS_ROOT)
        return
    raise NotOnBpffs(2, (
        f"pin root {pin_root} is not on a bpf filesystem: refusing to create maps that would not outlive this "
        f"mount namespace (every flow would be dropped at the next restart). Mount the node's bpffs "
        f"(`mount -t bpf bpf {BPFFS_ROOT}` on the host; the DaemonSet's init container runs `bpflb mount-bpffs`) "
        f"and give the agent the host's {BPFFS_ROOT} (hostPath, mountPropagation HostToContainer); an agent run "
        f"directly on the host may pass --mount-bpffs"))


def _warn_if_private(pin_root: Path) -> None:
    """Say so when the bpffs holding the pin root looks like this mount namespace's own: another namespace
    than PID 1's (when this process can tell), and a mount that propagates to and from no other one."""
    try:
        if os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt"):
            return
        mount = bpffs_mountpoint(pin_root)
        with open("/proc/self/mountinfo") as info:
            for line in info:
                fields = line.split()
                if len(fields) > 6 and Path(fields[4].replace("\\040", " ")) == mount:
                    tags = fields[6:fields.index("-")]
                    if any(t.startswith(("shared:", "master:")) for t in tags):
                        return
    except (OSError, ValueError):
        return
    log.warning("the bpffs at %s is private to this mount namespace as far as the agent can tell (no propagation "
                "from the host): if it is not the host's, the pins under %s die with it", mount, pin_root)


@dataclass
class TestRun:
    """The outcome of one BPF_PROG_TEST_RUN."""

    retval: int
    data: bytes
    duration_ns: int


def _csize(cdata: Any) -> int:
    """The size of what a cffi pointer points to (or of an array)."""
    kind = ffi().typeof(cdata)
    return int(ffi().sizeof(kind.item) if kind.kind == "pointer" else ffi().sizeof(cdata))


class Map:
    """A loaded BPF map addressed by its struct types from lb_structs.h. Its key and value sizes and its
    capacity are the kernel's (a map of another build, say a test build with a larger struct, is read
    safely: decode() takes what the Python view knows of it)."""

    def __init__(self, name: str, fd: int, key_type: str, value_type: str) -> None:
        self.name = name
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.key_size = ffi().sizeof(key_type)
        self.value_size = ffi().sizeof(value_type)
        self.max_entries = 0
        if fd >= 0:
            info = map_info(fd)
            self.key_size, self.value_size = int(info.key_size), int(info.value_size)
            self.max_entries = int(info.max_entries)

    def close(self) -> None:
        """Close a map opened on its own (a pin); maps of a loaded object close with the object."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def new_key(self, **fields: Any) -> Any:
        return ffi().new(f"{self.key_type} *", fields) if fields else ffi().new(f"{self.key_type} *")

    def new_value(self, **fields: Any) -> Any:
        return ffi().new(f"{self.value_type} *", fields) if fields else ffi().new(f"{self.value_type} *")

    def _sized(self, value: Any) -> Any:
        """value as a buffer of the kernel's value size (zero-filled beyond what the Python view knows)."""
        size = _csize(value)
        if size >= self.value_size:
            return value
        buf = ffi().new("char[]", self.value_size)
        ffi().memmove(buf, value, size)
        return buf

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        check(lib().bpf_map_update_elem(self.fd, key, self._sized(value), flags), f"update of map {self.name}")

    def update_raw(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        check(lib().bpf_map_update_elem(self.fd, key, value, flags), f"update of map {self.name}")

    def lookup(self, key: Any) -> Any | None:
        value = self.new_value()
        buf = self._sized(value)
        rc = lib().bpf_map_lookup_elem(self.fd, key, buf)
        if rc < 0:
            if -rc == 2 or (rc == -1 and ffi().errno == 2):
                return None
            check(rc, f"lookup in map {self.name}")
        if buf is not value:
            ffi().memmove(value, buf, _csize(value))
        return value

    def delete_raw(self, key: bytes) -> bool:
        rc = lib().bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            if -rc == 2 or (rc == -1 and ffi().errno == 2):
                return False
            check(rc, f"delete from map {self.name}")
        return True

    def update_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Write many entries in one bpf_map_update_batch call (one syscall instead of len(items)): 3-4x
        faster for small entries, on par for 16 KiB Maglev blocks, whose cost is the copy itself."""
        self.update_columns([k for k, _ in items], [v for _, v in items])

    def update_columns(self, keys: list[bytes], values: list[bytes]) -> None:
        """update_many() of keys[i] -> values[i]."""
        if not keys:
            return
        f = ffi()
        count = f.new("__u32 *", len(keys))
        key_buf = f.from_buffer(b"".join(keys))                     # read-only views: no second copy
        value_buf = f.from_buffer(b"".join(values))
        opts = f.new("struct bpf_map_batch_opts *", {"sz": f.sizeof("struct bpf_map_batch_opts")})
        rc = lib().bpf_map_update_batch(self.fd, key_buf, value_buf, count, opts)
        if rc < 0:
            err = -rc if rc != -1 else f.errno
            raise BatchError(err, f"batch update of map {self.name} ({count[0]} of {len(keys)} entries written): "
                                  f"{os.strerror(err)}", int(count[0]))

    def delete_many(self, keys: list[bytes]) -> None:
        """Delete many entries in one bpf_map_delete_batch call; keys already gone are no error."""
        if not keys:
            return
        f = ffi()
        buf = f.from_buffer(b"".join(keys))
        count = f.new("__u32 *", len(keys))
        opts = f.new("struct bpf_map_batch_opts *", {"sz": f.sizeof("struct bpf_map_batch_opts")})
        if lib().bpf_map_delete_batch(self.fd, buf, count, opts) < 0:
            for k in keys[int(count[0]):]:      # the batch stops at the first missing key: go on one by one
                self.delete_raw(k)

    def items_raw(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) as bytes; tolerant of concurrent deletes."""
        f, cur, nxt = ffi(), None, ffi().new("char[]", self.key_size)
        value = f.new("char[]", self.value_size)
        while True:
            rc = lib().bpf_map_get_next_key(self.fd, cur if cur is not None else f.NULL, nxt)
            if rc < 0:
                return
            key = bytes(f.buffer(nxt))
            if lib().bpf_map_lookup_elem(self.fd, nxt, value) == 0:
                yield key, bytes(f.buffer(value))
            cur = f.new("char[]", key)

    def decode_key(self, raw: bytes) -> Any:
        return decode(self.key_type, raw)

    def decode_value(self, raw: bytes) -> Any:
        return decode(self.value_type, raw)


def decode(ctype: str, raw: bytes) -> Any:
    """A fresh cffi struct of ctype holding the bytes raw."""
    obj = ffi().new(f"{ctype} *")
    ffi().memmove(obj, raw, min(len(raw), ffi().sizeof(ctype)))
    return obj


class MapSource(Protocol):
    """Where a node's maps come from: a loaded object (BpfObject) or the in-memory one (datapath.memory)."""

    def map(self, name: str) -> Map:
        ...


# Map name -> (key struct, value struct), as declared in bpf_objects/include/maps.h.
MAP_TYPES: dict[str, tuple[str, str]] = {
    "lb_services": ("struct lb_svc_key", "struct lb_svc_val"),
    "lb_backends": ("__u32", "struct lb_backend"),
    "ct_fwd": ("struct ct_tuple", "struct ct_entry"),
    "ct_rev": ("struct ct_tuple", "struct ct_entry"),
    "lb_config": ("__u32", "struct lb_config"),
    "lb_stats": ("__u32", "__u64"),
    "lb_dsr_frontends": ("struct lb_l4_key", "__u8"),
    "lb_local_backends": ("struct lb_l4_key", "__u8"),
    "lb_cluster_cidrs": ("struct lb_cidr_key", "__u8"),
    "lb_tunnel_map": ("struct lb_cidr_key", "struct lb_tunnel_ep"),
    # backend selection (bpf_objects/include/maglev.h, affinity.h)
    "lb_maglev": ("struct lb_maglev_key", "struct lb_maglev_block"),
    "lb_maglev_cfg": ("__u32", "struct lb_maglev_config"),
    "lb_affinity": ("struct lb_affinity_key", "struct lb_affinity_val"),
    "lb_affinity_members": ("struct lb_affinity_member", "__u32"),
    # in-cluster traffic (bpf_objects/include/east_west.h, sock.h)
    "lb_internal_view": ("struct lb_l4_key", "struct lb_l4_key"),
    "lb_sock_rev": ("struct lb_sock_rev_key", "struct lb_sock_rev_val"),
    "lb_sock_affinity": ("struct lb_sock_affinity_key", "struct lb_affinity_val"),
    "lb_pod_cidrs": ("struct lb_cidr_key", "__u8"),
    # forwarding safety (dsr.h, direct.h, icmp.h, neigh.h)
    "lb_dsr_backends": ("struct lb_dsr_member", "__u8"),
    "lb_dsr_mapped": ("__u32", "__u64"),
    "lb_direct": ("struct ct_tuple", "struct lb_direct_flow"),
    "lb_icmp_rl": ("__u32", "struct lb_icmp_rl"),
    "lb_neigh_seen": ("struct lb_neigh_key", "__u64"),
    # source ranges (bpf_objects/include/srcrange.h)
    "lb_src_ranges": ("struct lb_src_range_key", "__u8"),
    # IP fragments (bpf_objects/include/frag.h)
    "lb_frags": ("struct lb_frag_key", "struct lb_frag_val"),
}


class BpfObject:
    """A loaded BPF object file whose pinned maps live under pin_root (shared across loads)."""

    def __init__(self, path: Path, pin_root: Path | None, share_with: BpfObject | None = None,
                 mount_bpffs: bool = False) -> None:
        """share_with: an object already loaded whose maps of the same names this one uses (how an
        unpinned XDP object and tc object share state in tests; pinned objects share by their pins).
        mount_bpffs: mount the node's bpffs when the pin root is on none (see ensure_bpffs)."""
        self.path = path
        self.pin_root = pin_root
        f, l = ffi(), lib()
        self._keep: list[Any] = []
        opts = f.new("struct bpf_object_open_opts *")
        opts.sz = f.sizeof("struct bpf_object_open_opts")
        if pin_root is not None:
            ensure_bpffs(pin_root, mount_bpffs)
            pin_root.mkdir(parents=True, exist_ok=True)
            root = f.new("char[]", str(pin_root).encode())
            self._keep.append(root)
            opts.pin_root_path = root
        obj = l.bpf_object__open_file(str(path).encode(), opts)
        if obj == f.NULL:
            err = f.errno
            raise BpfError(err, f"cannot open BPF object {path}: {os.strerror(err)} (was `make bpf` run?)")
        self._obj = obj
        self.migrations: list[migrate.Migration] = []      # maps of another version being taken over
        if pin_root is not None:
            self.migrations = migrate.prepare(obj, pin_root)
        if pin_root is None:
            m = l.bpf_object__next_map(obj, f.NULL)
            while m != f.NULL:
                l.bpf_map__set_pin_path(m, f.NULL)
                name = f.string(l.bpf_map__name(m)).decode()
                if share_with is not None and name in MAP_TYPES and share_with.has_map(name):
                    check(l.bpf_map__reuse_fd(m, share_with.map(name).fd), f"sharing map {name}")
                m = l.bpf_object__next_map(obj, m)
        rc = self._load(obj)
        if rc < 0:
            l.bpf_object__close(obj)
            self._obj = f.NULL
            if pin_root is not None:
                migrate.restore(self.migrations, pin_root)
            check(rc, f"loading BPF object {path} (the verifier log is above)")
        if self.migrations:
            migrate.first_pass(self.migrations, self.map_fd)

    def _load(self, obj: Any) -> int:
        """bpf_object__load (a method: a test makes it fail after the maps of another version were parked)."""
        return int(lib().bpf_object__load(obj))

    def finish_migrations(self) -> None:
        """Once the programs of this object are attached: the entries the previous version's programs made
        meanwhile are copied too, and its maps unpinned (see datapath.migrate)."""
        migrate.last_pass(self.migrations)

    def program(self, name: str) -> Any:
        """The libbpf struct bpf_program of a program (for attach calls)."""
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == ffi().NULL:
            raise BpfError(2, f"program {name} not found in {self.path}")
        return prog

    def prog_fd(self, name: str) -> int:
        return int(lib().bpf_program__fd(self.program(name)))

    def has_map(self, name: str) -> bool:
        return bool(lib().bpf_object__find_map_by_name(self._obj, name.encode()) != ffi().NULL)

    def map(self, name: str) -> Map:
        m = lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if m == ffi().NULL:
            raise BpfError(2, f"map {name} not found in {self.path}")
        key_type, value_type = MAP_TYPES[name]
        return Map(name, int(lib().bpf_map__fd(m)), key_type, value_type)

    def close(self) -> None:
        if self._obj != ffi().NULL:
            lib().bpf_object__close(self._obj)
            self._obj = ffi().NULL

    def test_run(self, prog: str, data: bytes, *, ifindex: int = 0, repeat: int = 1,
                 out_size: int = 4096) -> TestRun:
        """Run a program on one frame with BPF_PROG_TEST_RUN; the context carries ifindex."""
        f = ffi()
        opts = f.new("struct bpf_test_run_opts *")
        opts.sz = f.sizeof("struct bpf_test_run_opts")
        data_in = f.new("char[]", data)
        data_out = f.new("char[]", out_size)
        opts.data_in = data_in
        opts.data_size_in = len(data)
        opts.data_out = data_out
        opts.data_size_out = out_size
        ctx = f.new("struct sk_buff_ctx *")
        if ifindex:
            ctx.ifindex = ifindex
            ctx.ingress_ifindex = ifindex
        ctx_out = f.new("struct sk_buff_ctx *")
        opts.ctx_in = ctx
        opts.ctx_size_in = f.sizeof("struct sk_buff_ctx")
        opts.ctx_out = ctx_out
        opts.ctx_size_out = f.sizeof("struct sk_buff_ctx")
        opts.repeat = repeat
        check(lib().bpf_prog_test_run_opts(self.prog_fd(prog), opts), f"test run of {prog}")
        return TestRun(int(opts.retval), bytes(f.buffer(data_out, opts.data_size_out)), int(opts.duration))


    def test_run_xdp(self, prog: str, data: bytes, *, ifindex: int = 0, repeat: int = 1,
                     out_size: int = 4096) -> TestRun:
        """Run an XDP program on one frame with BPF_PROG_TEST_RUN, received on ifindex."""
        f = ffi()
        opts = f.new("struct bpf_test_run_opts *")
        opts.sz = f.sizeof("struct bpf_test_run_opts")
        data_in, data_out = f.new("char[]", data), f.new("char[]", out_size)
        opts.data_in, opts.data_size_in = data_in, len(data)
        opts.data_out, opts.data_size_out = data_out, out_size
        ctx = f.new("struct xdp_md_ctx *", {"data_end": len(data), "ingress_ifindex": ifindex})
        opts.ctx_in, opts.ctx_size_in = ctx, f.sizeof("struct xdp_md_ctx")
        opts.repeat = repeat
        check(lib().bpf_prog_test_run_opts(self.prog_fd(prog), opts), f"test run of {prog}")
        return TestRun(int(opts.retval), bytes(f.buffer(data_out, opts.data_size_out)), int(opts.duration))

    def test_run_xdp_live(self, prog: str, data: bytes, *, ifindex: int, repeat: int,
                          batch_size: int = 64) -> int:
        """Run an XDP program `repeat` times in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES, Linux 5.18+):
        each run gets a frame initialised from data as if received on ifindex (of the caller's
        namespace), and XDP_TX / XDP_REDIRECT really transmit it. Frames are recycled without being
        reset, so a program that edits them must write every field it relies on. Returns the ns taken."""
        f = ffi()
        opts = f.new("struct bpf_test_run_opts *")
        opts.sz = f.sizeof("struct bpf_test_run_opts")
        data_in = f.new("char[]", data)
        opts.data_in, opts.data_size_in = data_in, len(data)
        ctx = f.new("struct xdp_md_ctx *", {"data_end": len(data), "ingress_ifindex": ifindex})
        opts.ctx_in, opts.ctx_size_in = ctx, f.sizeof("struct xdp_md_ctx")
        opts.repeat = repeat
        opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
        opts.batch_size = batch_size
        check(lib().bpf_prog_test_run_opts(self.prog_fd(prog), opts), f"live-frames run of {prog}")
        return int(opts.duration) * repeat

    def map_fd(self, name: str) -> int:
        """The fd of any map of the object by name (for maps without a MAP_TYPES entry)."""
        m = lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if m == ffi().NULL:
            raise BpfError(2, f"map {name} not found in {self.path}")
        return int(lib().bpf_map__fd(m))


def xdp_attach(prog_fd: int, ifindex: int, mode: str) -> str:
    """Attach an XDP program: mode "Native" (driver mode, or fail) or "BestEffort" (driver mode where the
    driver has it, generic XDP elsewhere).  Returns the mode it got ("native" or "generic")."""
    try:
        check(lib().bpf_xdp_attach(ifindex, prog_fd, XDP_FLAGS_DRV_MODE, ffi().NULL), "native XDP attach")
        return "native"
    except BpfError:
        if mode != "BestEffort":
            raise
    check(lib().bpf_xdp_attach(ifindex, prog_fd, XDP_FLAGS_SKB_MODE, ffi().NULL), "generic XDP attach")
    return "generic"


def xdp_detach(ifindex: int) -> bool:
    """Remove whatever XDP program (native or generic) the device has; True when there was one."""
    removed = False
    for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
        prog_id = ffi().new("__u32 *")
        if lib().bpf_xdp_query_id(ifindex, flags, prog_id) == 0 and prog_id[0]:
            removed |= lib().bpf_xdp_detach(ifindex, flags, ffi().NULL) == 0
    return removed


def xdp_attached_prog_id(ifindex: int) -> int | None:
    for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
        prog_id = ffi().new("__u32 *")
        if lib().bpf_xdp_query_id(ifindex, flags, prog_id) == 0 and prog_id[0]:
            return int(prog_id[0])
    return None


def _tc_hook(ifindex: int, point: int) -> Any:
    hook = ffi().new("struct bpf_tc_hook *")
    hook.sz = ffi().sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = point
    return hook


def _has_clsact(ifindex: int) -> bool:
    """Whether the device already has a clsact qdisc (libbpf would log EEXIST noise otherwise)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def tc_attach(prog_fd: int, ifindex: int, *, ingress: bool) -> None:
    """Attach (or atomically replace) a tc program on a device's clsact hook."""
    point = lib().BPF_TC_INGRESS if ingress else lib().BPF_TC_EGRESS
    hook = _tc_hook(ifindex, point)
    if not _has_clsact(ifindex):
        rc = lib().bpf_tc_hook_create(hook)
        if rc < 0 and -rc != 17:  # EEXIST: created meanwhile
            check(rc, f"creating clsact on ifindex {ifindex}")
    check(lib().bpf_tc_attach(hook, _tc_opts(prog_fd, BPF_TC_F_REPLACE)),
          f"attaching tc program on ifindex {ifindex}")


def _tc_opts(prog_fd: int = 0, flags: int = 0) -> Any:
    """bpf_tc_opts naming bpflb's filter (fixed handle and priority)."""
    opts = ffi().new("struct bpf_tc_opts *")
    opts.sz = ffi().sizeof("struct bpf_tc_opts")
    opts.prog_fd = prog_fd
    opts.flags = flags
    opts.handle = TC_HANDLE
    opts.priority = TC_PRIORITY
    return opts


def tc_detach(ifindex: int, *, ingress: bool) -> bool:
    """Remove bpflb's filter from a device's clsact hook; False when it was not there."""
    point = lib().BPF_TC_INGRESS if ingress else lib().BPF_TC_EGRESS
    return bool(lib().bpf_tc_detach(_tc_hook(ifindex, point), _tc_opts()) == 0)


def tc_attached_prog_id(ifindex: int, *, ingress: bool) -> int | None:
    """The id of the program bpflb attached on the hook, or None."""
    point = lib().BPF_TC_INGRESS if ingress else lib().BPF_TC_EGRESS
    opts = _tc_opts()
    if lib().bpf_tc_query(_tc_hook(ifindex, point), opts) < 0:
        return None
    return int(opts.prog_id)


def load_lb(pin_root: Path | None, obj_dir: Path | None = None, mount_bpffs: bool = False) -> BpfObject:
    """Load bpf_lb.o; its maps are pinned under pin_root (None: unpinned, for tests and benchmarks)."""
    return BpfObject((obj_dir or objects_dir()) / LB_OBJECT, pin_root, mount_bpffs=mount_bpffs)


def load_xdp(pin_root: Path | None, share_with: BpfObject | None = None, obj_dir: Path | None = None) -> BpfObject:
    """Load bpf_xdp.o sharing the tc object's maps: through the pins under pin_root, or (unpinned)
    the maps of share_with."""
    return BpfObject((obj_dir or objects_dir()) / XDP_OBJECT, pin_root, share_with)


def load_sock(pin_root: Path | None, share_with: BpfObject | None = None, obj_dir: Path | None = None) -> BpfObject:
    """Load bpf_sock.o (the socket LB) sharing the tc object's maps, as load_xdp does; its own maps
    (lb_sock_rev, lb_sock_affinity) are pinned beside them, or private when unpinned."""
    return BpfObject((obj_dir or objects_dir()) / SOCK_OBJECT, pin_root, share_with)


def remove_pins(pin_root: Path) -> None:
    """Remove every pinned map of a node (uninstall)."""
    if pin_root.exists():
        shutil.rmtree(pin_root)
