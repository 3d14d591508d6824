"""Test-suite wide rules: privileged tests fail (never skip) when root, namespaces or BPF are missing."""

from __future__ import annotations

import os
import subprocess
import uuid
from functools import cache

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
