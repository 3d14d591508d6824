"""The lab's cgroups: one cgroup v2 directory per node, under one per lab (<cgroup v2 root>/bpflb-lab.<lab>/
nodeK; on this machine the root is /sys/fs/cgroup/unified). A node's agent, its pods' processes and every
process `bpflb lab exec` runs as that node or one of its pods live in it, and the node's agent attaches its
socket LB there (--cgroup-root), as a real node's agent attaches to the host's root. Found by name, so
`lab down` removes them after a crash too; a process is put in one before it execs (its sockets are the
cgroup's from the first)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from bpflb.datapath.cgroup import default_cgroup_root
from bpflb_lab.lab.errors import LabError

PREFIX = "bpflb-lab."
EMPTY_TIMEOUT = 10.0


def root() -> Path:
    """The cgroup v2 hierarchy's root, or LabError when none is mounted."""
    found = default_cgroup_root()
    if found is None:
        raise LabError("no cgroup v2 hierarchy is mounted (the lab's socket LB needs one; on a hybrid host it is "
                       "/sys/fs/cgroup/unified)")
    return found


def available() -> bool:
    return default_cgroup_root() is not None


def lab_cgroup(lab: str) -> Path:
    return root() / f"{PREFIX}{lab}"


def node_cgroup(lab: str, node: str) -> Path:
    return lab_cgroup(lab) / node


def create(lab: str, nodes: Sequence[str]) -> list[Path]:
    """The lab's cgroup and one per node (existing ones are kept)."""
    made = [node_cgroup(lab, n) for n in nodes]
    for path in made:
        path.mkdir(parents=True, exist_ok=True)
    return made


def join_argv(cgroup: Path, argv: Sequence[str]) -> list[str]:
    """argv run as a process of cgroup: a shell moves itself there, then execs argv (same pid)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv]


def join(cgroup: Path) -> None:
    """Move the calling process into cgroup (a forked child, before it opens any socket)."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))


def procs(cgroup: Path) -> list[int]:
    """The processes of cgroup and of every cgroup below it."""
    found: list[int] = []
    for directory, _, _ in os.walk(cgroup):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()]
    return found


def remove(lab: str) -> list[str]:
    """Stop whatever still runs in the lab's cgroups and remove them; return the directories left behind."""
    try:
        top = lab_cgroup(lab)
    except LabError:
        return []
    if not top.exists():
        return []
    for pid in procs(top):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + EMPTY_TIMEOUT
    left: list[str] = []
    for directory in sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:          # EBUSY: a killed process has not left it yet
                if time.monotonic() > deadline:
                    left.append(str(directory))
                    break
                time.sleep(0.02)
    return left
