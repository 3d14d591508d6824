"""The rate benchmark's measurement: UDP forwarding through node1 against a reference that skips it, and new
TCP connections per second, in one cell's lab; node1's datapath counters say whether XDP did the work."""

from __future__ import annotations

import functools
import os
import statistics
import sys
import traceback
from collections import Counter

from bpflb_lab import trafficgen as tg
from bpflb_lab.lab import Lab, topology
from bpflb_lab.rates.workload import (
    CONCURRENCY,
    FLOWS,
    FORWARDED_PORT,
    REFERENCE_PORT,
    TCP_PORT,
    UDP_PORT,
    Cell,
    Plan,
    Unavailable,
    _cell_lab,
    _progress,
    forwarded_packets,
)


def _udp(lab: Lab, frame: bytes, sinks: list[str], seconds: float) -> tuple[float, float]:
    """(pps received by the sinks, pps sent) over one sender run."""
    pin = lab.pin_root / "bench"
    before = sum(tg.read_sink(pin / s) for s in sinks)
    sent = lab.run_in("client", functools.partial(tg.live_send_in_ns, frame, seconds, flows=FLOWS,
                                                  cpu=(os.cpu_count() or 1) - 1), timeout=seconds + 60)
    got = sum(tg.read_sink(pin / s) for s in sinks) - before
    return got / sent.seconds, sent.rate


def _measure(lab: Lab, plan: Plan, cell: Cell) -> None:
    client_mac = _mac(lab, "client")
    to_node1 = tg.udp_frame(client_mac, _mac(lab, "node1"), str(topology.CLIENT_IP), lab.node_ip(1), UDP_PORT)
    direct = tg.udp_frame(client_mac, _mac(lab, "node2"), str(topology.CLIENT_IP), lab.pod_ip("echo-a"), 8081)
    refs, rates, sent = [], [], []
    for _ in range(plan.udp_repeats):
        refs.append(_udp(lab, direct, ["echo-a"], plan.udp_seconds)[0])
        got, out = _udp(lab, to_node1, ["echo-a", "echo-b"], plan.udp_seconds)
        rates.append(got)
        sent.append(out)
    cell.udp_samples = rates
    cell.reference_samples = refs
    cell.udp_pps = statistics.median(rates)
    cell.sent_pps = statistics.median(sent)
    cell.reference_pps = statistics.median(refs)
    failed, errors = 0, Counter[str]()
    conns, conn_refs, forwarded = [], [], []
    fwd_packets, fwd_conns = 0, 0

    def storm(addr: str, port: int) -> tg.ConnResult:
        return lab.run_in("client", functools.partial(tg.connection_storm_in_ns, addr, port, plan.tcp_seconds,
                                                      CONCURRENCY), timeout=plan.tcp_seconds + 60)

    for _ in range(plan.tcp_repeats):
        conn_refs.append(storm(lab.pod_ip("echo-a"), REFERENCE_PORT).rate)
        before = forwarded_packets(lab)
        fwd = storm(lab.pod_ip("echo-a"), FORWARDED_PORT)
        fwd_packets += forwarded_packets(lab) - before
        fwd_conns += fwd.ok
        forwarded.append(fwd.rate)
        r = storm(lab.node_ip(1), TCP_PORT)
        conns.append(r.rate)
        failed += r.failed
        errors.update(r.errors)
    cell.conn_samples = conns
    cell.conn_per_s = statistics.median(conns)
    cell.conn_reference_samples = conn_refs
    cell.conn_reference = statistics.median(conn_refs)
    cell.conn_forwarded_samples = forwarded
    cell.conn_forwarded = statistics.median(forwarded)
    cell.forwarded_per_conn = fwd_packets / fwd_conns if fwd_conns else None
    if cell.forwarded_per_conn is not None and cell.forwarded_per_conn < 3.9:
        # SYN, ACK and RST one way and the SYN-ACK the other: fewer means the replies went around node1.
        raise RuntimeError(f"node1 forwarded {cell.forwarded_per_conn:.1f} packets per connection of the "
                           "forwarded reference (at least 4 when both directions cross it)")
    cell.conn_failed = failed
    cell.conn_errors = dict(errors)
    if cell.datapath.startswith("bpflb"):
        cell.node1_stats = _node1_stats(lab)
        if cell.datapath == "bpflb XDP" and not cell.node1_stats.get("xdp_tx"):
            cell.note = "XDP forwarded nothing on node1 (counter xdp_tx is 0): this cell measured tc"


def _node1_stats(lab: Lab) -> dict[str, int]:
    """node1's datapath counters that are not zero (whether XDP forwarded, why connections failed)."""
    from bpflb.datapath.lbmaps import read_stats
    from bpflb.inspect import open_pinned

    stats = open_pinned(lab.pin_root / "node1", "lb_stats")
    try:
        return {k: v for k, v in read_stats(stats).items() if v}
    finally:
        stats.close()


def _drops(cell: Cell) -> dict[str, int]:
    return {k: v for k, v in cell.node1_stats.items() if k.startswith("drop")}


def _mac(lab: Lab, host: str) -> str:
    link = lab.exec(host, ["ip", "-o", "link", "show", "eth0"], check=True).stdout
    return link.split("link/ether ")[1].split()[0]


def measure_cell(datapath: str, services: int, plan: Plan, acceleration: str) -> Cell:
    cell = Cell(datapath, services)
    try:
        with _cell_lab(datapath, services, acceleration, cell) as lab:
            _measure(lab, plan, cell)
    except Unavailable as exc:
        cell.note = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others' figures
        cell.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        cell.failed = True
        traceback.print_exc(file=sys.stderr)
    _progress(f"{datapath}, {services:,} Services: " + (cell.note or (
        f"UDP {(cell.udp_pps or 0) / 1e3:,.0f} kpps at the pods (sent {(cell.sent_pps or 0) / 1e3:,.0f}, "
        f"reference {(cell.reference_pps or 0) / 1e3:,.0f}); TCP {cell.conn_per_s:,.0f} conn/s (forwarded reference "
        f"{cell.conn_forwarded or 0:,.0f}, {cell.forwarded_per_conn or 0:.1f} packets/conn via node1; "
        f"direct reference {cell.conn_reference or 0:,.0f})"
        + (f", {cell.conn_failed} failed {cell.conn_errors}" if cell.conn_failed else "")
        + (f"; node1 drops {_drops(cell)}" if _drops(cell) else "")
        + (f"; node1 xdp_tx {cell.node1_stats.get('xdp_tx', 0):,}" if cell.datapath == "bpflb XDP" else ""))))
    return cell
