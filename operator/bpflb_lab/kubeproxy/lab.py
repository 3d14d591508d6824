"""kube-proxy in the lab: generate a node's rule set from the lab's cluster directory (the objects the
agents read) and load it into that node's namespace with iptables-restore or nft -f. Nothing here
runs outside a lab node's namespace."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from bpflb.sources.base import Snapshot
from bpflb.sources.files import FileSource
from bpflb_lab.kubeproxy import iptables, nftables
from bpflb_lab.kubeproxy.model import node_view
from bpflb_lab.lab import Lab, topology
from bpflb_lab.lab.errors import LabError

EMPTY_IPTABLES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""


@dataclass
class Installed:
    """One node's rule set, loaded."""

    node: str
    mode: str
    summary: str        # "1,234 nat rules in 567 chains, 3 filter rules"
    text: str           # what was loaded
    seconds: float      # how long iptables-restore / nft took


def render(snapshot: Snapshot, node: str, mode: str) -> tuple[str, str]:
    """(rule set text, one-line summary) kube-proxy in `mode` would load on node."""
    view = node_view(snapshot, node)
    if mode == "iptables":
        ipt = iptables.render(view)
        return ipt.text, (f"{ipt.nat_rules:,} nat rules in {ipt.nat_chains:,} KUBE chains, "
                          f"{ipt.filter_rules:,} filter rules")
    if mode == "nftables":
        nft = nftables.render(view)
        return nft.text, (f"{nft.chains:,} chains, {nft.service_ips:,} service-ips and "
                          f"{nft.service_nodeports:,} service-nodeports elements")
    raise ValueError(f"kube-proxy mode {mode!r}: expected iptables or nftables")


def load_command(mode: str) -> list[str]:
    """The command that reads a rule set of `mode` on stdin (iptables-restore replaces the tables it
    names; the nft script replaces table ip kube-proxy)."""
    return ["iptables-restore", "-w", "5"] if mode == "iptables" else ["nft", "-f", "-"]


def _load(lab: Lab, node: str, mode: str, text: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{lab.netns(node)}", "--", *load_command(mode)],
                          input=text, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise LabError(f"{node}: {' '.join(load_command(mode))} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[:2000]}")
    return time.monotonic() - start


def install(lab: Lab, mode: str, nodes: list[str] | None = None) -> list[Installed]:
    """Generate and load kube-proxy's rules on each node (default: every node of the lab) from the
    objects in the lab's cluster directory."""
    snapshot = FileSource(lab.paths.cluster).snapshot()
    names = nodes or [topology.node_name(k) for k in range(1, lab.state().nodes + 1)]
    done = []
    for node in names:
        text, summary = render(snapshot, node, mode)
        done.append(Installed(node, mode, summary, text, _load(lab, node, mode, text)))
    return done


def uninstall(lab: Lab, mode: str, nodes: list[str] | None = None) -> None:
    """Remove what install loaded: empty filter and nat tables, or no kube-proxy table."""
    names = nodes or [topology.node_name(k) for k in range(1, lab.state().nodes + 1)]
    for node in names:
        if mode == "iptables":
            _load(lab, node, mode, EMPTY_IPTABLES)
        else:
            _load(lab, node, mode, f"add table ip {nftables.TABLE}\ndelete table ip {nftables.TABLE}\n")
