"""`bpflb bench`, rates: forwarding rate and new-connection rate through node1 of a lab built for the run,
for bpflb with XDP acceleration, bpflb at tc, and the same Services as kube-proxy's iptables and nftables
rules (bpflb_lab.kubeproxy; on every node, as bpflb's agents), at 10, 1,000 and 10,000 Services; a table,
JSON and a PNG chart.

Every (datapath, Service count) cell gets a lab of its own (unique name, always taken down): the state one
measurement leaves (conntrack, NAT ports) never leaks into the next. The labs of one Service count are up
side by side and take turns, window by window (this machine is shared: its load moves within seconds). Each lab holds echo-a on node2 and
echo-b on node3 behind Service default/echo (NodePort 30080/TCP to an accept-and-close listener on 8090,
30081/UDP to 8081), plus N-1 LoadBalancer Services pointed at the same two pods.

- Forwarding rate: 60-byte UDP frames sent to node1:30081 by an XDP live-frames sender in the client
  (bpf_objects/bpf_gen.c, 256 flows), counted and dropped by an XDP sink on both pods' eth0. The
  sender and the whole path run on one CPU (the sender's softirq carries every frame to the pods), so
  a rate is the inverse of the path's total cost. A reference run in the same lab sends the frames
  straight to echo-a through node2, skipping node1; node1's cost per packet is derived from the two.
- Connection rate: TCP connections to node1:30080, 32 in flight from one client process (bpflb-connstorm,
  C), each counted once its handshake completes and then closed with a RST (no TIME_WAIT, as load generators
  do). Two reference runs right before each window, both to accept listeners of echo-a that no Service
  names: one straight via node2, skipping node1 (the ceiling of the client, the bridge and the pods on this
  machine), one forwarded by node1's kernel with no load balancer, its replies routed back through node1
  too (client -> node1 -> node2 -> pod and back, the hops of a connection SNAT'd by node1): the ceiling of
  any load balancer on node1 in this lab.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bpflb_lab.rates.measure import measure_cells
from bpflb_lab.rates.report import NOTE, chart, goals, machine, table
from bpflb_lab.rates.workload import DATAPATHS, FULL, NA_ACCELERATION, QUICK, QUICK_SERVICE_COUNTS, Cell

__all__ = ["DATAPATHS", "NA_ACCELERATION", "QUICK_SERVICE_COUNTS", "Cell", "run_rate_bench"]


def run_rate_bench(quick: bool = False, out_dir: Path | None = None, *, acceleration: str = "Native",
                   datapaths: tuple[str, ...] = DATAPATHS, counts: tuple[int, ...] | None = None,
                   tcp_rounds: int | None = None, kube_proxy_nodes: tuple[str, ...] = ()) -> int:
    """Measure every cell, print the table, write bench-rates.{txt,json,png}; 0 when every cell has its
    figures (a datapath that is not available counts as having them: its cells say n/a and why)."""
    plan = QUICK if quick else FULL
    if tcp_rounds:
        plan = dataclasses.replace(plan, tcp_repeats=tcp_rounds)
    plan = dataclasses.replace(plan, kube_proxy_nodes=kube_proxy_nodes)
    counts = counts or plan.counts
    started = time.monotonic()
    print(f"bpflb bench: rates, {len(datapaths)} datapaths x {len(counts)} Service counts, one lab each",
          file=sys.stderr)
    # Service count by Service count, the datapaths' labs up side by side and measured in turns: the cells
    # compared with each other share the machine's load, window by window.
    cells = [c for n in counts for c in measure_cells(datapaths, n, plan, acceleration)]
    text = table(cells, counts)
    print(text)
    print()
    print(NOTE)
    out = out_dir or Path("results")
    out.mkdir(parents=True, exist_ok=True)
    where = machine()
    (out / "bench-rates.txt").write_text(f"{where}\n\n{text}\n\n{NOTE}\n")
    (out / "bench-rates.json").write_text(json.dumps({
        "machine": where, "quick": quick, "counts": list(counts), "seconds": round(time.monotonic() - started, 1),
        "cells": [{**asdict(c), "node1_ns": c.node1_ns} for c in cells], "goals": goals(cells, counts)}, indent=2))
    chart(cells, counts, out / "bench-rates.png")
    print(f"\nwritten: {out / 'bench-rates.txt'}, {out / 'bench-rates.json'}, {out / 'bench-rates.png'} "
          f"({time.monotonic() - started:.0f}s)", file=sys.stderr)
    missing = [c for c in cells if c.failed or (not c.note and (c.udp_pps is None or c.conn_per_s is None))]
    return 1 if missing else 0
