"""Attaching the socket LB (bpf_sock.o) to a cgroup v2 directory: its four programs through BPF links.

A link applies to every process of the cgroup and of the cgroups below it, and coexists with other
programs attached there (links are multi-attach).  With a pin directory the links are pinned in bpffs
and outlive the process that made them: an agent restart replaces the programs in place (one atomic
bpf_link_update per hook, so no connect() goes untranslated meanwhile), and removing the pins (or
detach_cgroup) detaches them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpflb.datapath.libbpf import BpfError, check, ffi, lib
from bpflb.datapath.loader import BpfObject

# Program of bpf_sock.o -> its attach type (enum bpf_attach_type, uapi linux/bpf.h).
SOCK_PROGRAMS: dict[str, int] = {
    "lb_connect4": 10,       # BPF_CGROUP_INET4_CONNECT
    "lb_sendmsg4": 14,       # BPF_CGROUP_UDP4_SENDMSG
    "lb_recvmsg4": 19,       # BPF_CGROUP_UDP4_RECVMSG
    "lb_getpeername4": 29,   # BPF_CGROUP_INET4_GETPEERNAME
}
LINK_PIN_PREFIX = "cgroup_"


def cgroup2_mountpoint(path: Path) -> Path | None:
    """The cgroup v2 mount that holds path, or None (not on the unified hierarchy)."""
    best: Path | None = None
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3 or fields[2] != "cgroup2":
                continue
            mnt = Path(fields[1].replace("\\040", " "))
            if (path == mnt or mnt in path.parents) and (best is None or len(mnt.parts) > len(best.parts)):
                best = mnt
    return best


def default_cgroup_root() -> Path | None:
    """The root of this mount namespace's cgroup v2 hierarchy (/sys/fs/cgroup on a pure v2 host,
    /sys/fs/cgroup/unified on a hybrid one), None without one.  Inside a container with a cgroup namespace
    this is the container's own cgroup: the agent's pod passes the host's with --cgroup-root instead."""
    found: list[Path] = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                found.append(Path(fields[1].replace("\\040", " ")))
    return min(found, key=lambda p: len(p.parts)) if found else None


def _cgroup_fd(cgroup: Path) -> int:
    cgroup = cgroup.resolve()
    if cgroup2_mountpoint(cgroup) is None:
        raise BpfError(22, f"{cgroup} is not on a cgroup v2 (unified) hierarchy; the socket LB needs one "
                           "(here it is mounted at /sys/fs/cgroup/unified)")
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise BpfError(exc.errno or 2, f"cannot open cgroup {cgroup}: {exc.strerror}") from exc


def _link_cgroup_id(link: Any) -> int:
    info = ffi().new("struct bpf_link_info_cgroup *")
    size = ffi().new("__u32 *", ffi().sizeof("struct bpf_link_info_cgroup"))
    check(lib().bpf_obj_get_info_by_fd(lib().bpf_link__fd(link), info, size), "reading a pinned link's info")
    return int(info.cgroup_id)


def _open_link(path: Path) -> Any | None:
    if not path.exists():
        return None
    link = lib().bpf_link__open(str(path).encode())
    return None if link == ffi().NULL else link


@dataclass
class CgroupAttachment:
    """The socket LB's links on one cgroup, held by this process (pinned ones survive close())."""

    cgroup: Path
    pin_dir: Path | None
    _links: list[Any] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Let go of the links: unpinned ones detach now, pinned ones stay attached."""
        for link in self._links:
            lib().bpf_link__destroy(link)
        self._links.clear()

    def detach(self) -> None:
        """Detach every program now (pinned or not) and remove the pins."""
        for link in self._links:
            lib().bpf_link__detach(link)
        self.close()
        if self.pin_dir is not None:
            for name in SOCK_PROGRAMS:
                (self.pin_dir / f"{LINK_PIN_PREFIX}{name}").unlink(missing_ok=True)


def attach_cgroup(obj: BpfObject, cgroup: Path, pin_dir: Path | None = None) -> CgroupAttachment:
    """Attach bpf_sock.o's four programs to a cgroup v2 directory.  pin_dir: pin the links there
    (cgroup_lb_connect4, ...), and replace the programs of links already pinned there for this cgroup
    instead of attaching again; a pinned link of another cgroup is detached first."""
    fd = _cgroup_fd(cgroup)
    done = CgroupAttachment(cgroup, pin_dir)
    try:
        cgroup_id = os.fstat(fd).st_ino         # a cgroup v2 directory's inode number is its cgroup id
        for name in SOCK_PROGRAMS:
            prog = obj.program(name)
            pin = pin_dir / f"{LINK_PIN_PREFIX}{name}" if pin_dir is not None else None
            link = _open_link(pin) if pin is not None else None
            if link is not None and _link_cgroup_id(link) != cgroup_id:
                lib().bpf_link__detach(link)
                lib().bpf_link__destroy(link)
                assert pin is not None
                pin.unlink()
                link = None
            if link is not None:
                done._links.append(link)
                check(lib().bpf_link__update_program(link, prog), f"replacing {name} on cgroup {cgroup}")
                continue
            link = lib().bpf_program__attach_cgroup(prog, fd)
            if link == ffi().NULL:
                check(-ffi().errno, f"attaching {name} to cgroup {cgroup}")
            done._links.append(link)
            if pin is not None:
                pin.parent.mkdir(parents=True, exist_ok=True)
                check(lib().bpf_link__pin(link, str(pin).encode()), f"pinning the link of {name} at {pin}")
    except BaseException:
        done.close()
        raise
    finally:
        os.close(fd)
    return done


def detach_cgroup(pin_dir: Path) -> int:
    """Detach the socket LB links pinned in pin_dir (whichever cgroup they are on) and remove their pins;
    returns how many there were."""
    count = 0
    for name in SOCK_PROGRAMS:
        pin = pin_dir / f"{LINK_PIN_PREFIX}{name}"
        link = _open_link(pin)
        if link is not None:
            lib().bpf_link__detach(link)
            lib().bpf_link__destroy(link)
            count += 1
        pin.unlink(missing_ok=True)
    return count


def attached_programs(cgroup: Path, program: str) -> list[int]:
    """Ids of the programs attached to the cgroup itself at the hook of one of bpf_sock.o's programs."""
    fd = _cgroup_fd(cgroup)
    try:
        ids = ffi().new("__u32[]", 64)
        count = ffi().new("__u32 *", 64)
        flags = ffi().new("__u32 *")
        check(lib().bpf_prog_query(fd, SOCK_PROGRAMS[program], 0, flags, ids, count),
              f"querying cgroup {cgroup}")
        return [int(ids[i]) for i in range(int(count[0]))]
    finally:
        os.close(fd)
