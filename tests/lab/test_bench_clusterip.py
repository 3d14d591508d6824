"""`bpflb bench --clusterip --quick` runs end to end: every row has figures from every round, the socket LB
row really went through the socket LB (the command refuses to report otherwise), the results are written, and
nothing is left behind: no namespace, no cgroup, no rule in the root namespace.  The figures themselves are
the benchmark's business, not this test's (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bpflb.bench_clusterip import ROWS, run_tag
from bpflb.cli import main
from bpflb.datapath.cgroup import cgroup2_mountpoint
from tests.lab.test_kubeproxy import root_rules

pytestmark = pytest.mark.privileged


def leftovers() -> list[str]:
    """This process's benchmark namespaces and cgroups (a run beside it in another worktree has its own)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.startswith(f"bpflb-cb-{run_tag()}")]
    mnt = cgroup2_mountpoint(Path("/sys/fs/cgroup/unified"))
    if mnt is not None:
        names += [p.name for p in mnt.iterdir() if p.name.startswith(f"bpflb-bench-{run_tag()}")]
    return names


def test_quick_clusterip_bench_reports_every_row_and_cleans_up(tmp_path: Path) -> None:
    rules = root_rules()
    rc = main(["bench", "--clusterip", "--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench-clusterip.json").read_text())
    assert rc == (0 if data["socket_vs_iptables"] >= data["goal"] else 1)
    assert set(data["rates"]) == set(ROWS)
    assert all(len(v) == 2 and min(v) > 0 for v in data["rates"].values()), data["rates"]
    assert "socket LB / iptables" in (tmp_path / "bench-clusterip.txt").read_text()
    assert leftovers() == []
    assert root_rules() == rules
