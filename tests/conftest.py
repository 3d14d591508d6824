"""Test-suite wide rules: privileged tests fail (never skip) when root, namespaces or BPF are missing; no test
leaves the socket LB's programs on the host's cgroup v2 root (they would steer every process of the machine)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest


@cache
def _privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "these tests need root (network namespaces, BPF); run them as root, as CI does"
    probe = f"bpflb-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace (`ip netns add`): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    # The tests pin maps under /sys/fs/bpf, which must be the machine's bpffs (the agent no longer mounts one
    # of its own): mounted here when missing, as `bpflb mount-bpffs` does on a node and the lab on its host.
    from bpflb.datapath.loader import mount_bpffs

    try:
        mount_bpffs()
    except OSError as exc:
        return f"cannot mount bpffs at /sys/fs/bpf: {exc}"
    return None


@pytest.fixture(autouse=True)
def _privileged_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is None:
        return
    problem = _privilege_problem()
    if problem:
        pytest.fail(f"privileged test cannot run here: {problem}", pytrace=False)


def _host_socket_programs() -> set[tuple[str, int]]:
    """The programs attached directly to the host's cgroup v2 root at the socket LB's hooks (root only)."""
    from bpflb.datapath.cgroup import SOCK_PROGRAMS, attached_programs, default_cgroup_root

    root: Path | None = default_cgroup_root()
    if os.geteuid() != 0 or root is None:
        return set()
    return {(hook, prog) for hook in SOCK_PROGRAMS for prog in attached_programs(root, hook)}


@pytest.fixture(autouse=True)
def _host_cgroup_untouched() -> Iterator[None]:
    """Network safety: a test may attach the socket LB to scratch or lab cgroups only. An agent started
    without --cgroup-root attaches to the root of the hierarchy, where it would rewrite connections of
    every process on this machine (other test runs' included) to the test's lab frontends."""
    before = _host_socket_programs()
    yield
    added = _host_socket_programs() - before
    if added:
        pytest.fail(f"the test left programs on the host's cgroup v2 root at {sorted(added)}: run agents "
                    "with --cgroup-root (a lab or scratch cgroup) or --no-socket-lb", pytrace=False)
