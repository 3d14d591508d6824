"""Helpers shared by the lab tests (kept out of conftest.py so test modules can import them)."""

from __future__ import annotations

import secrets
import subprocess


def unique_lab_name() -> str:
    return f"bpflb-t{secrets.token_hex(3)}"


def root_netns_snapshot() -> dict[str, str]:
    """What the root network namespace looks like (addresses, routes, rules, links)."""
    out = {}
    for key, argv in {"addr": ["ip", "-o", "addr"], "route": ["ip", "route", "show", "table", "all"],
                      "rule": ["ip", "rule"], "link": ["ip", "-o", "link"]}.items():
        out[key] = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return out


# --- packet captures inside lab namespaces -------------------------------------------------------------

import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bpflb_lab.lab import Lab, netns

_LINE = re.compile(r"(?P<smac>[0-9a-f:]{17}) > (?P<dmac>[0-9a-f:]{17}), .*?: "
                   r"(?P<src>[\d.]+)\.(?P<sport>\d+) > (?P<dst>[\d.]+)\.(?P<dport>\d+): (?P<rest>.*)")


@dataclass(frozen=True)
class Frame:
    """One captured IPv4 TCP/UDP frame: who sent it (MAC) and its addresses as on the wire."""

    smac: str
    dmac: str
    src: str
    sport: int
    dst: str
    dport: int
    line: str


@dataclass
class Capture:
    frames: list[Frame]
    lines: list[str] | None = None      # every line tcpdump printed (frames of any kind)

    def matching(self, *, src: str | None = None, dst: str | None = None, sport: int | None = None,
                 dport: int | None = None) -> list[Frame]:
        return [f for f in self.frames if (src is None or f.src == src) and (dst is None or f.dst == dst)
                and (sport is None or f.sport == sport) and (dport is None or f.dport == dport)]


@contextmanager
def capture(lab: Lab, host: str, bpf_filter: str, device: str = "eth0") -> Iterator[Capture]:
    """tcpdump on a lab host's device for the duration of the block (frames in both directions)."""
    direction = [] if device == "any" else ["-Q", "inout"]
    argv = netns.nsenter_argv(lab.netns(host), ["tcpdump", "-i", device, "-nn", "-e", "-l", *direction,
                                                bpf_filter])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = Capture([])
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 5
        while "listening on" not in (proc.stderr.readline() or "") and time.monotonic() < deadline:
            pass
        yield result
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        result.lines = out.splitlines()
        for line in out.splitlines():
            m = _LINE.search(line)
            if m:
                result.frames.append(Frame(m["smac"], m["dmac"], m["src"], int(m["sport"]), m["dst"],
                                           int(m["dport"]), line))


def mac_of(lab: Lab, host: str, device: str = "eth0") -> str:
    """A lab device's MAC, through netlink (under nsenter /sys is still the root namespace's)."""
    link = lab.exec(host, ["ip", "-o", "link", "show", device], check=True).stdout
    return link.split("link/ether ")[1].split()[0]
