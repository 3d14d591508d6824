"""The rate benchmark's measurement: UDP forwarding through node1 against a reference that skips it, and new
TCP connections per second, in one cell's lab; node1's datapath counters say whether XDP did the work."""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import traceback
from collections import Counter
from collections.abc import Iterator

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


class Windows:
    """One cell's measurement in windows, so that the cells of a Service count can take turns: every
    window of every cell sits between windows of the others, and the machine's load hits them alike."""

    def __init__(self, lab: Lab, plan: Plan, cell: Cell) -> None:
        self.lab, self.plan, self.cell = lab, plan, cell
        client_mac = _mac(lab, "client")
        self.to_node1 = tg.udp_frame(client_mac, _mac(lab, "node1"), str(topology.CLIENT_IP), lab.node_ip(1),
                                     UDP_PORT)
        self.direct = tg.udp_frame(client_mac, _mac(lab, "node2"), str(topology.CLIENT_IP), lab.pod_ip("echo-a"),
                                   8081)
        self.sent: list[float] = []
        self.errors = Counter[str]()
        self.fwd_packets = self.fwd_conns = 0

    def udp(self) -> None:
        """A reference window straight to echo-a, then one through node1."""
        self.cell.reference_samples.append(_udp(self.lab, self.direct, ["echo-a"], self.plan.udp_seconds)[0])
        got, out = _udp(self.lab, self.to_node1, ["echo-a", "echo-b"], self.plan.udp_seconds)
        self.cell.udp_samples.append(got)
        self.sent.append(out)

    def tcp(self) -> None:
        """The two references' windows, then one through node1's load balancer."""
        lab, cell = self.lab, self.cell
        cell.conn_reference_samples.append(self._storm(lab.pod_ip("echo-a"), REFERENCE_PORT).rate)
        before = forwarded_packets(lab)
        fwd = self._storm(lab.pod_ip("echo-a"), FORWARDED_PORT)
        self.fwd_packets += forwarded_packets(lab) - before
        self.fwd_conns += fwd.ok
        cell.conn_forwarded_samples.append(fwd.rate)
        r = self._storm(lab.node_ip(1), TCP_PORT)
        cell.conn_samples.append(r.rate)
        cell.conn_failed += r.failed
        self.errors.update(r.errors)

    def _storm(self, addr: str, port: int) -> tg.ConnResult:
        return self.lab.run_in("client", functools.partial(tg.connection_storm_in_ns, addr, port,
                                                           self.plan.tcp_seconds, CONCURRENCY),
                               timeout=self.plan.tcp_seconds + 60)

    def finish(self) -> None:
        """Medians, node1's counters, and whether the forwarded reference really crossed node1 both ways."""
        cell = self.cell
        if cell.udp_samples:
            cell.udp_pps = statistics.median(cell.udp_samples)
            cell.sent_pps = statistics.median(self.sent)
            cell.reference_pps = statistics.median(cell.reference_samples)
        if cell.conn_samples:
            cell.conn_per_s = statistics.median(cell.conn_samples)
            cell.conn_reference = statistics.median(cell.conn_reference_samples)
            cell.conn_forwarded = statistics.median(cell.conn_forwarded_samples)
        cell.conn_errors = dict(self.errors)
        cell.forwarded_per_conn = self.fwd_packets / self.fwd_conns if self.fwd_conns else None
        if cell.datapath.startswith("bpflb"):
            cell.node1_stats = _node1_stats(self.lab)
            if cell.datapath == "bpflb XDP" and not cell.node1_stats.get("xdp_tx"):
                cell.note = "XDP forwarded nothing on node1 (counter xdp_tx is 0): this cell measured tc"
        if cell.forwarded_per_conn is not None and cell.forwarded_per_conn < 3.9:
            # SYN, ACK and RST one way and the SYN-ACK the other: fewer means the replies went around node1.
            raise RuntimeError(f"node1 forwarded {cell.forwarded_per_conn:.1f} packets per connection of the "
                               "forwarded reference (at least 4 when both directions cross it)")


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


def measure_cells(datapaths: tuple[str, ...], services: int, plan: Plan, acceleration: str) -> list[Cell]:
    """The cells of one Service count, their labs up side by side, measured in turns: each round gives
    every cell a UDP and a TCP window (with their references), in an order that rotates round by round."""
    cells = [Cell(dp, services) for dp in datapaths]
    running: list[Windows] = []
    with contextlib.ExitStack() as stack:
        for cell in cells:
            with _failure(cell):
                lab = stack.enter_context(_cell_lab(cell.datapath, services, acceleration, cell,
                                                         plan.kube_proxy_nodes))
                running.append(Windows(lab, plan, cell))
        for k in range(max(plan.udp_repeats, plan.tcp_repeats)):
            order = running[k % len(running):] + running[:k % len(running)] if running else []
            for w in order:
                if w.cell.failed:
                    continue
                with _failure(w.cell):
                    if k < plan.udp_repeats:
                        w.udp()
                    if k < plan.tcp_repeats:
                        w.tcp()
            _progress(f"{services:,} Services: round {k + 1} of {max(plan.udp_repeats, plan.tcp_repeats)} done")
        for w in running:
            if not w.cell.failed:
                with _failure(w.cell):
                    w.finish()
    for cell in cells:
        _report(cell)
    return cells


@contextlib.contextmanager
def _failure(cell: Cell) -> Iterator[None]:
    """A cell that cannot be measured says why; one broken cell must not lose the others' figures."""
    try:
        yield
    except Unavailable as exc:
        cell.note = str(exc)
    except Exception as exc:  # noqa: BLE001
        cell.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        cell.failed = True
        traceback.print_exc(file=sys.stderr)


def _report(cell: Cell) -> None:
    _progress(f"{cell.datapath}, {cell.services:,} Services: " + (cell.note or (
        f"UDP {(cell.udp_pps or 0) / 1e3:,.0f} kpps at the pods (sent {(cell.sent_pps or 0) / 1e3:,.0f}, "
        f"reference {(cell.reference_pps or 0) / 1e3:,.0f}); TCP {cell.conn_per_s or 0:,.0f} conn/s (forwarded reference "
        f"{cell.conn_forwarded or 0:,.0f}, {cell.forwarded_per_conn or 0:.1f} packets/conn via node1; "
        f"direct reference {cell.conn_reference or 0:,.0f})"
        + (f", {cell.conn_failed} failed {cell.conn_errors}" if cell.conn_failed else "")
        + (f"; node1 drops {_drops(cell)}" if _drops(cell) else "")
        + (f"; node1 xdp_tx {cell.node1_stats.get('xdp_tx', 0):,}" if cell.datapath == "bpflb XDP" else ""))))
