"""Traffic in the lab: commands and Python run as a host (inside its namespace, and a node's or a pod's in
the node's cgroup unless told otherwise), probes (HTTP and UDP requests, connections, ping) from any host,
and the check of every frontend against the mode's expected behaviour."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from bpflb.model.types import Mode
from bpflb_lab.lab import cgroups, netns, probe
from bpflb_lab.lab.check import CheckReport, evaluate, plan
from bpflb_lab.lab.errors import LabError
from bpflb_lab.lab.parts import LabParts
from bpflb_lab.lab.probe import HttpProbe, Probe, ProbeResult, UdpProbe
from bpflb_lab.lab.state import atomic_write

T = TypeVar("T")
CHECK_UDP_PORTS = (10000, 20000)   # UDP source ports of lab.check and lab.connections, taken in turn (Traffic.fresh_udp_ports)


class Traffic(LabParts):
    """Probing a lab (mixed into lab.core.Lab)."""

    def exec(self, host: str, argv: Sequence[str], *, capture: bool = True, timeout: float | None = None,
             check: bool = False, stdin: IO[Any] | int | None = None,
             in_cgroup: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command as a host: inside its namespace (nsenter; /sys and bpffs stay the root namespace's)
        and, for a node or a pod, its node's cgroup (in_cgroup=False: outside it, unseen by the socket LB)."""
        cgroup = self.cgroup(host) if in_cgroup else None
        argv = list(argv) if cgroup is None else cgroups.join_argv(cgroup, argv)
        return subprocess.run(netns.nsenter_argv(self.netns(host), argv), capture_output=capture, text=True,
                              timeout=timeout, check=check, stdin=stdin)

    def run_in(self, host: str, fn: Callable[..., T], *args: Any, timeout: float = 10.0,
               in_cgroup: bool = True) -> T:
        """fn(*args) in a forked child as the host (its namespace; a node's or a pod's cgroup unless
        in_cgroup=False); its result pickled back."""
        return netns.run_in_netns(self.netns(host), fn, *args, timeout=timeout,
                                  cgroup=self.cgroup(host) if in_cgroup else None)

    def probe(self, host: str, probes: Sequence[Probe], *, parallel: int = 32,
              in_cgroup: bool = True) -> list[ProbeResult]:
        """Run probes from host (one process for all of them, up to `parallel` at once); a node's or a pod's
        from its node's cgroup (the socket LB's) unless in_cgroup=False."""
        if not probes:
            return []
        longest = max(p.timeout for p in probes) * max(
            len(p.paths) if isinstance(p, HttpProbe) else len(p.messages) for p in probes) + 1
        rounds = -(-len(probes) // max(1, parallel))
        return self.run_in(host, probe.run_probes, list(probes), parallel, timeout=longest * rounds + 10,
                           in_cgroup=in_cgroup)

    def http_get(self, host: str, url: str, timeout: float = 1.0) -> tuple[str | None, str | None]:
        """GET url from host on a new connection: (body, None), or (None, error) e.g. "connection refused"."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if not parts.hostname:
            raise LabError(f"URL {url!r} has no host")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        [result] = self.probe(host, [HttpProbe(parts.hostname, parts.port or 80, (path,), timeout)])
        return (result.replies[0], None) if result.ok else (None, result.error)

    def http_session(self, host: str, addr: str, port: int, paths: Sequence[str],
                     timeout: float = 1.0) -> ProbeResult:
        """Several GETs on one kept-alive TCP connection (replies in order; result.local is the source)."""
        [result] = self.probe(host, [HttpProbe(addr, port, tuple(paths), timeout)])
        return result

    def udp_request(self, host: str, addr: str, port: int, message: str = "hostname",
                    timeout: float = 1.0) -> tuple[str | None, str | None]:
        """One datagram from host, one reply: (reply, None) or (None, error)."""
        [result] = self.probe(host, [UdpProbe(addr, port, (message,), timeout)])
        return (result.replies[0], None) if result.ok else (None, result.error)

    def connections(self, host: str, addr: str, port: int, count: int, *, proto: str = "TCP",
                    request: str | None = None, timeout: float = 1.0, parallel: int = 1) -> list[ProbeResult]:
        """count new connections (TCP: GET request, default /hostname; UDP: a new socket sending request,
        default "hostname") from host, all from one process; results in order."""
        probes: list[Probe]
        if proto.upper() == "TCP":
            probes = [HttpProbe(addr, port, (request or "/hostname",), timeout) for _ in range(count)]
        else:       # each from a port no flow of an earlier test holds (fresh_udp_ports)
            probes = self.fresh_udp_ports([UdpProbe(addr, port, (request or "hostname",), timeout)
                                           for _ in range(count)])
        return self.probe(host, probes, parallel=parallel)

    def ping(self, host: str, addr: str, timeout: float = 1.0) -> float | None:
        """ICMP echo from host to addr: round-trip seconds, or None."""
        return self.run_in(host, probe.ping, addr, timeout, timeout=timeout + 10)

    def check(self, timeout: float = 1.0) -> CheckReport:
        """Probe every NodePort / LoadBalancer / externalIP frontend from the client against the expected
        behaviour of the lab's mode."""
        state = self.state()
        start = time.monotonic()
        scenarios = plan(self.services(), self.endpoint_slices(), state.nodes, Mode.parse(state.mode), timeout)
        probes = self.fresh_udp_ports([p for sc in scenarios for p in sc.probes])
        results = self.probe("client", probes, parallel=64)
        return CheckReport(self.name, state.mode, evaluate(scenarios, results), time.monotonic() - start)

    def fresh_udp_ports(self, probes: list[Probe]) -> list[Probe]:
        """The UDP probes of a check or of connections(), each from a port no earlier one of this lab used
        lately.  A datagram on a tuple whose flow is alive (60 s) continues that flow, in the mode it started
        with (set_mode: open flows keep theirs): a port the kernel happened to pick again right after a mode
        switch would get the old mode's answer, and the test would judge the new mode by it.  TCP needs none
        of this: a new connection's SYN starts a new flow on its closed tuple.  The ports come in turn from
        CHECK_UDP_PORTS (below the ephemeral range), the next one kept in the lab's run directory."""
        cursor = self.paths.run / "check-udp-port"
        low, high = CHECK_UDP_PORTS
        try:
            nxt = int(cursor.read_text())
        except (OSError, ValueError):
            nxt = low
        out: list[Probe] = []
        for p in probes:
            if isinstance(p, UdpProbe):
                nxt = nxt if low <= nxt < high else low
                p = replace(p, local_port=nxt)
                nxt += 1
            out.append(p)
        atomic_write(cursor, f"{nxt}\n")
        return out
