"""Client-side probes that run inside a lab namespace (through netns.run_in_netns): HTTP requests on new
or kept-alive connections, UDP exchanges, ICMP ping, many of them concurrently from one process.

Every probe returns a ProbeResult instead of raising, with errors named the way people say them
("connection refused", "timeout", "no route to host").
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import itertools
import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bpflb_lab.lab.echo import CLIENT_HEADER, POD_HEADER


@dataclass(frozen=True)
class HttpProbe:
    """GET each path in turn on one new TCP connection (several paths: HTTP/1.1 keep-alive)."""

    addr: str
    port: int
    paths: tuple[str, ...] = ("/hostname",)
    timeout: float = 1.0


@dataclass(frozen=True)
class UdpProbe:
    """Send each message in turn from one new (connected) UDP socket, waiting for each reply."""

    addr: str
    port: int
    messages: tuple[str, ...] = ("hostname",)
    timeout: float = 1.0
    local_port: int = 0     # the socket's own port; 0: the kernel's choice (or when that port is busy)


Probe = HttpProbe | UdpProbe


@dataclass
class ProbeResult:
    """What one probe got back. replies[i] answers request i; pod/client come from the echo server."""

    probe: HttpProbe | UdpProbe
    replies: list[str] = field(default_factory=list)
    status: list[int] = field(default_factory=list)   # HTTP status per reply
    pod: str | None = None       # who answered (X-Pod-Name, or the UDP "hostname" reply)
    client: str | None = None    # "ip:port" the server saw (X-Client-Addr, or the UDP "clientip" reply)
    local: str | None = None     # "ip:port" of the probe's own socket
    error: str | None = None     # None when every request was answered
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def client_ip(self) -> str | None:
        return self.client.rsplit(":", 1)[0] if self.client else None


def describe_error(exc: BaseException) -> str:
    """A short human name for a socket error."""
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "timeout"
    names = {errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "no route to host",
             errno.ENETUNREACH: "network unreachable", errno.ECONNRESET: "connection reset",
             errno.EPIPE: "connection reset", errno.ETIMEDOUT: "timeout"}
    if isinstance(exc, OSError) and exc.errno in names:
        return names[exc.errno]
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    return f"{type(exc).__name__}: {exc}"


def http_probe(probe: HttpProbe) -> ProbeResult:
    result = ProbeResult(probe)
    start = time.monotonic()
    conn = http.client.HTTPConnection(probe.addr, probe.port, timeout=probe.timeout)
    try:
        conn.connect()
        if conn.sock is not None:
            host, port = conn.sock.getsockname()[:2]
            result.local = f"{host}:{port}"
        for i, path in enumerate(probe.paths):
            last = i == len(probe.paths) - 1
            conn.request("GET", path, headers={"Connection": "close" if last else "keep-alive"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            result.replies.append(body)
            result.status.append(resp.status)
            # agnhost semantics first (the body of /hostname and /clientip), the echo headers otherwise
            if resp.status == 200 and path.startswith("/hostname"):
                result.pod = result.pod or body
            if resp.status == 200 and path.startswith("/clientip"):
                result.client = result.client or body
            result.pod = result.pod or resp.getheader(POD_HEADER)
            result.client = result.client or resp.getheader(CLIENT_HEADER)
            if resp.status != 200 and result.error is None:
                result.error = f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        result.error = describe_error(exc)
    finally:
        conn.close()
        result.elapsed = time.monotonic() - start
    return result


def udp_probe(probe: UdpProbe) -> ProbeResult:
    result = ProbeResult(probe)
    start = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(probe.timeout)
        if probe.local_port:
            with contextlib.suppress(OSError):
                sock.bind(("0.0.0.0", probe.local_port))
        sock.connect((probe.addr, probe.port))  # connected: ICMP port unreachable surfaces as ECONNREFUSED
        host, port = sock.getsockname()[:2]
        result.local = f"{host}:{port}"
        for message in probe.messages:
            sock.send(message.encode())
            reply = sock.recv(65535).decode(errors="replace")
            result.replies.append(reply)
            if message == "hostname":
                result.pod = result.pod or reply
            elif message == "clientip":
                result.client = result.client or reply
    except OSError as exc:
        result.error = describe_error(exc)
    finally:
        sock.close()
        result.elapsed = time.monotonic() - start
    return result


def run_probe(probe: Probe) -> ProbeResult:
    return http_probe(probe) if isinstance(probe, HttpProbe) else udp_probe(probe)


def run_probes(probes: list[Probe], parallel: int = 32) -> list[ProbeResult]:
    """Run probes, up to `parallel` at a time (1: strictly one after another); results in probe order."""
    if parallel <= 1 or len(probes) <= 1:
        return [run_probe(p) for p in probes]
    with ThreadPoolExecutor(max_workers=min(parallel, len(probes))) as pool:
        return list(pool.map(run_probe, probes))


_ping_ids = itertools.count(os.getpid() & 0xFFFF)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def ping(addr: str, timeout: float = 1.0) -> float | None:
    """ICMP echo to addr; the round-trip time in seconds, None when no reply came within timeout."""
    ident = next(_ping_ids) & 0xFFFF
    payload = b"bpflb-lab-ping"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1) + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        start = time.monotonic()
        try:
            sock.sendto(packet, (addr, 0))
        except OSError:  # no route: as unanswered as a lost packet
            return None
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                return None
            ihl = (data[0] & 0x0F) * 4
            icmp_type, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if icmp_type == 0 and rid == ident and peer[0] == addr:
                return time.monotonic() - start
