"""`bpflb bench --quick` as CI runs it: the per-packet part and the rates against kube-proxy finish within two
minutes, every row of the rate table has a figure (a number; "n/a" only for bpflb XDP when this build has no
XDP acceleration, and then with the reason), the results are written, and nothing is left behind: no lab,
no rule or address in the root namespace."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bpflb.cli import main
from bpflb_lab.bench_rates import DATAPATHS, NA_ACCELERATION, QUICK_SERVICE_COUNTS
from tests.lab.lab_helpers import root_netns_snapshot
from tests.lab.test_kubeproxy import root_rules

pytestmark = pytest.mark.privileged


def bench_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("bpflb-rates-")]


def test_quick_bench_fills_every_row_within_two_minutes(tmp_path: Path, privileged: None) -> None:
    root_before, rules_before, labs_before = root_netns_snapshot(), root_rules(), bench_namespaces()
    start = time.monotonic()
    rc = main(["bench", "--quick", "--out", str(tmp_path)])
    took = time.monotonic() - start
    assert rc == 0
    assert took < 120, f"bpflb bench --quick took {took:.0f}s"

    assert (tmp_path / "bench-datapath.json").exists()          # the per-packet part ran too
    data = json.loads((tmp_path / "bench-rates.json").read_text())
    cells = {(c["datapath"], c["services"]): c for c in data["cells"]}
    assert set(cells) == {(dp, n) for dp in DATAPATHS for n in QUICK_SERVICE_COUNTS}
    for (dp, n), cell in cells.items():
        if cell["note"]:
            assert dp == "bpflb XDP" and cell["note"].startswith(NA_ACCELERATION[:-1]), (dp, n, cell["note"])
            continue
        for figure in ("udp_pps", "reference_pps", "conn_per_s"):
            assert isinstance(cell[figure], float) and cell[figure] > 0, (dp, n, figure, cell[figure])
        assert cell["udp_pps"] <= cell["sent_pps"] * 1.01, (dp, n)   # nothing counted that was not sent

    text = (tmp_path / "bench-rates.txt").read_text()
    for dp in DATAPATHS:
        rows = [line for line in text.splitlines() if line.startswith(dp)]
        assert len(rows) == 3, (dp, rows)               # forwarding, node1 ns/packet, connections
        for row in rows:
            figures = row[len(dp):].split()[:len(QUICK_SERVICE_COUNTS)]
            assert all(f == "n/a" if dp == "bpflb XDP" and cells[(dp, 10)]["note"] else
                       f.replace(",", "").lstrip("-").isdigit() for f in figures), row
    assert "goals (ratios of figures measured in this run)" in text
    assert (tmp_path / "bench-rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert bench_namespaces() == labs_before
    assert root_netns_snapshot() == root_before and root_rules() == rules_before
