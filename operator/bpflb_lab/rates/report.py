"""The rate benchmark's report: the tables (forwarding, node1's derived cost, connections), the goals as
ratios of figures measured in the same run, the method note, the machine, and the PNG chart."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from bpflb_lab.rates.measure import _drops
from bpflb_lab.rates.workload import DATAPATHS, Cell


def _fmt(value: float | None, cell: Cell, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "n/a" if cell.note else "-"
    return f"{value / scale:,.{digits}f}"


def _grid(title: str, cells: list[Cell], counts: tuple[int, ...], value: Callable[[Cell], str],
          last: Callable[[list[Cell]], str] | None = None, last_head: str = "") -> list[str]:
    head = f"{title:<30}" + "".join(f"{c:>11,} svc" for c in counts) + (f"{last_head:>12}" if last else "")
    lines = [head, "-" * len(head)]
    for dp in DATAPATHS:
        row = [next((c for c in cells if c.datapath == dp and c.services == n), None) for n in counts]
        if all(r is None for r in row):
            continue
        text = "".join(f"{(value(r) if r else '-'):>15}" for r in row)
        present = [r for r in row if r is not None]
        lines.append(f"{dp:<30}{text}" + (f"{last(present):>12}" if last else ""))
    return lines


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v]
    return float(statistics.median(present)) if present else None


def _paired(a: list[float], b: list[float]) -> float | None:
    """The median of window-by-window ratios (windows of the same round, or a window and the reference right
    before it): on a shared machine far steadier than a ratio of two medians."""
    pairs = [x / y for x, y in zip(a, b, strict=False) if x and y]
    return float(statistics.median(pairs)) if pairs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _growth(attr: str) -> Callable[[list[Cell]], str]:
    def fn(row: list[Cell]) -> str:
        first, final = getattr(row[0], attr), getattr(row[-1], attr)
        return f"{final / first:.2f}x" if first and final else "n/a"
    return fn


def _get(cells: list[Cell], dp: str, n: int) -> Cell | None:
    return next((c for c in cells if c.datapath == dp and c.services == n), None)


def goals(cells: list[Cell], counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """The issue's goals, as ratios of figures measured in this run."""
    out: list[dict[str, Any]] = []
    at = 1_000 if 1_000 in counts else counts[-1]
    whats = (("udp_pps", "forwarding"), ("conn_per_s", "connections"))

    def value(dp: str, n: int, attr: str) -> float | None:
        c = _get(cells, dp, n)
        return getattr(c, attr) if c else None

    for dp, goal in (("bpflb XDP", 3.0), ("bpflb tc", 1.5)):
        for attr, what in (*whats, ("node1_ns", "node1 ns/packet")):
            mine, theirs = value(dp, at, attr), value("kube-proxy iptables", at, attr)
            r = _ratio(theirs, mine) if attr == "node1_ns" else _ratio(mine, theirs)   # cost: lower is better
            out.append({"goal": f"{dp} vs iptables, {what}, {at:,} svc", "target": f">= {goal:g}x",
                        "ratio": r, "met": None if r is None else r >= goal})
    # Issue 11's connection goals, and whether the path itself allows them: the forwarded reference is what
    # node1 does with no load balancer at all.  The cells of a Service count took turns, so each ratio is the
    # median of the rounds' own ratios.
    def conns(dp: str, n: int, attr: str = "conn_samples") -> list[float]:
        c = _get(cells, dp, n)
        return list(getattr(c, attr)) if c else []

    lo = counts[0]
    for dp in ("bpflb tc", "bpflb XDP"):
        r = _paired(conns(dp, lo), conns("kube-proxy iptables", lo))
        out.append({"goal": f"{dp} vs iptables, connections/s, {lo:,} svc (rounds)", "target": ">= 1.5x",
                    "ratio": r, "met": None if r is None else r >= 1.5})
    r = _paired(conns("kube-proxy iptables", lo, "conn_forwarded_samples"), conns("kube-proxy iptables", lo))
    out.append({"goal": f"forwarded reference vs iptables, {lo:,} svc (its cell)", "target": ">= 1.5x",
                "ratio": r, "met": None if r is None else r >= 1.5})
    for dp in ("bpflb tc", "bpflb XDP"):
        for n in counts:
            r = _paired(conns(dp, n), conns("kube-proxy nftables", n))
            out.append({"goal": f"{dp} vs nftables, connections/s, {n:,} svc (rounds)", "target": ">= 1.0x",
                        "ratio": r, "met": None if r is None else r >= 1.0})
    hi = counts[-1]
    if hi > lo:
        for dp in ("bpflb XDP", "bpflb tc"):
            for attr, what in whats:
                r = _ratio(value(dp, hi, attr), value(dp, lo, attr))
                out.append({"goal": f"{dp} flat, {what}, {hi:,} / {lo:,} svc", "target": "within 10%",
                            "ratio": r, "met": None if r is None else abs(r - 1) <= 0.1})
        for attr, what in whats:
            r = _ratio(value("kube-proxy iptables", hi, attr), value("kube-proxy iptables", lo, attr))
            out.append({"goal": f"iptables degrades, {what}, {hi:,} / {lo:,} svc", "target": "< 0.9x",
                        "ratio": r, "met": None if r is None else r < 0.9})
    return out


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    virt = ""
    with contextlib.suppress(OSError):
        if "hypervisor" in Path("/proc/cpuinfo").read_text():
            virt = " under a hypervisor"
    return (f"{date.today().isoformat()}, {os.cpu_count()} vCPU {model}{virt}, Linux {platform.release()}, "
            f"{_iptables_version()}")


def _iptables_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    return "iptables unknown"


def table(cells: list[Cell], counts: tuple[int, ...]) -> str:
    lines = _grid("UDP forwarding (kpps at pods)", cells, counts,
                  lambda c: _fmt(c.udp_pps, c, 1e3), _growth("udp_pps"), "growth")
    lines.append(f"{'reference: straight to echo-a':<30}" + "".join(
        f"{_fmt(statistics.median(refs) if refs else None, Cell('', 0), 1e3):>15}"
        for refs in ([c.reference_pps for c in cells if c.services == n and c.reference_pps] for n in counts)))
    lines.append("")
    lines += _grid("node1 ns/packet (derived)", cells, counts, lambda c: _fmt(c.node1_ns, c), _growth("node1_ns"),
                   "growth")
    lines.append("")
    lines += _grid("new TCP connections/s", cells, counts, lambda c: _fmt(c.conn_per_s, c),
                   _growth("conn_per_s"), "growth")
    for label, attr in (("reference: straight to echo-a", "conn_reference"),
                        ("reference: forwarded, no LB", "conn_forwarded")):
        lines.append(f"{label:<30}" + "".join(
            f"{_fmt(_median([getattr(c, attr) for c in cells if c.services == n]), Cell('', 0)):>15}"
            for n in counts))
    lines.append("")
    lines += _grid("/ forwarded reference (windows)", cells, counts,
                   lambda c: f"{r:.2f}" if (r := _paired(c.conn_samples, c.conn_forwarded_samples)) else "n/a")
    troubled = [c for c in cells if c.conn_failed or _drops(c)]
    if troubled:
        lines.append("connection windows with failed attempts (conn/s per window; failures; node1's drop counters):")
        for c in troubled:
            parts = [" then ".join(f"{v:,.0f}" for v in c.conn_samples)]
            if c.conn_failed:
                parts.append(f"{c.conn_failed} failed (" + ", ".join(f"{k} {v}" for k, v in c.conn_errors.items()) + ")")
            if _drops(c):
                parts.append(", ".join(f"{k} {v:,}" for k, v in _drops(c).items()))
            lines.append(f"  {c.datapath} at {c.services:,}: " + "; ".join(parts))
    notes = sorted({c.note for c in cells if c.note})
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    lines.append("")
    lines.append("goals (ratios of figures measured in this run):")
    for g in goals(cells, counts):
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "NOT met")
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        lines.append(f"  {g['goal']:<58}{ratio:>7}   goal {g['target']:<11} {verdict}")
    return "\n".join(lines)


NOTE = """\
Method: one lab per cell (namespaces: client, fabric bridge, node1..3, echo-a on node2, echo-b on
node3), so no conntrack or NAT state carries over. UDP: 60-byte frames, 256 flows, from an XDP
live-frames sender (BPF_PROG_TEST_RUN, BPF_F_TEST_XDP_LIVE_FRAMES, XDP_TX out of the client's eth0) to
node1:30081, counted and dropped by XDP sinks on the pods' eth0. The sender's CPU carries every frame
through the bridge, node1, node2 and into the pods, so a rate is 1 / the whole path's cost on one CPU.
'reference' sends the same frames straight to echo-a via node2; node1 ns/packet = 1e9/rate -
1e9/reference (node1 and one more bridge crossing; the median over the windows, each paired with the
reference run just before it). TCP: one client process (bpflb-connstorm, C; the Python client it
replaced capped every row near 25k/s here), 32 connects in flight, each closed by RST once established,
to an accept-and-close listener in the pods (the Python echo server would cap every row at ~2.5k/s);
two references, each right before every window, to accept listeners of echo-a that no Service names:
'straight to echo-a' via node2, skipping node1 (the client's, the bridge's and the pods' ceiling), and
'forwarded, no LB': client -> node1 -> node2 -> pod and the replies back through node1 (policy routes on
that port in the client and node2), forwarded by node1's kernel with no load balancer and no conntrack
(raw NOTRACK in kube-proxy's cells) - the hops of a connection SNAT'd by node1, so the ceiling of any load
balancer on node1 here; '/ forwarded reference' is the median of each window's rate over the forwarded
window right before it. The labs of one Service count are up together and take turns window by window
(order rotating), so goals compare datapaths by the median of the rounds' own ratios.
A 2-vCPU VM runs the client, the 'network' and all nodes: compare rows, not absolute
numbers; the reference row shows how much the machine's speed moved between cells."""


def chart(cells: list[Cell], counts: tuple[int, ...], path: Path) -> None:
    """A PNG of UDP kpps and TCP connections/s against the number of Services, one line per datapath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, attr, scale, label in ((axes[0], "udp_pps", 1e3, "UDP forwarding via node1 (kpps at the pods)"),
                                   (axes[1], "conn_per_s", 1.0, "new TCP connections/s via node1")):
        for dp in DATAPATHS:
            pts = [(c.services, getattr(c, attr) / scale) for n in counts
                   if (c := _get(cells, dp, n)) is not None and getattr(c, attr)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=dp)
        ax.set_xscale("log")
        ax.set_xticks(list(counts), [f"{n:,}" for n in counts])
        ax.set_xlabel("Services")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bpflb vs kube-proxy, {machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
