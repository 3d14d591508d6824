"""Helpers of the lab tests, the one home of them (fixtures are in conftest.py): unique names, what the root
namespace holds, condition waits, captures on the wire (TCP, UDP and ICMP), counters scoped to a test's
own traffic, and the client-side probes the tests share."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab, netns

NODE1 = "198.18.0.11"
T = TypeVar("T")


def unique_lab_name() -> str:
    return f"bpflb-t{secrets.token_hex(3)}"


def root_netns_snapshot() -> dict[str, str]:
    """What the root network namespace looks like (addresses, routes, rules, links)."""
    out = {}
    for key, argv in {"addr": ["ip", "-o", "addr"], "route": ["ip", "route", "show", "table", "all"],
                      "rule": ["ip", "rule"], "link": ["ip", "-o", "link"]}.items():
        out[key] = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return out


def wait_until(what: str, check: Callable[[], T | None | Literal[False]], timeout: float = 15.0,
               interval: float = 0.05) -> T:
    """Poll check() until it returns something truthy and return that; fail naming what was awaited. A check
    may say "not yet" with None or False (`cond and value`): what it returns is then never either."""
    deadline = time.monotonic() + timeout
    last: T | None | Literal[False] = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def counters(lab: Lab, node: str) -> dict[str, int]:
    """A node's datapath counters (from its pinned lb_stats)."""
    return dict(collect(lab.pin_root / node)["counters"])


@contextmanager
def counted(lab: Lab, *nodes: str) -> Iterator[dict[str, dict[str, int]]]:
    """The counters' growth on nodes during the block only: a test's own traffic, not earlier tests'."""
    before = {n: counters(lab, n) for n in nodes}
    delta: dict[str, dict[str, int]] = {}
    yield delta
    for n in nodes:
        after = counters(lab, n)
        delta[n] = {k: v - before[n].get(k, 0) for k, v in after.items()}


def frontend(lab: Lab, node: str, name: str) -> dict[str, Any] | None:
    """A node's programmed frontend ("198.18.0.11:30080/TCP"), as `bpflb inspect` reads it, or None."""
    return next((f for f in collect(lab.pin_root / node)["frontends"] if f["frontend"] == name), None)


def wait_programmed(lab: Lab, nodes: tuple[str, ...], name: str, check: Callable[[dict[str, Any] | None], bool],
                    what: str, timeout: float = 15.0) -> None:
    """Wait until every node's agent has programmed frontend `name` so that check(it) holds."""
    for n in nodes:
        wait_until(f"{n}: {name} {what}", lambda n=n: check(frontend(lab, n, name)), timeout)  # type: ignore[misc]


def backends_of(lab: Lab, node: str, name: str) -> set[str]:
    fe = frontend(lab, node, name)
    return set(fe["backends"]) if fe else set()


def affinity_idle(lab: Lab, node: str, client: str, seconds: float) -> bool:
    """Whether client's session-affinity entry on node was last used more than `seconds` ago (the kernel's
    monotonic clock, which Python's time.monotonic_ns reads too), or is gone."""
    from ipaddress import IPv4Address

    from bpflb.inspect import open_pinned

    m = open_pinned(lab.pin_root / node, "lb_affinity")
    try:
        now = time.monotonic_ns()
        for raw_key, raw in m.items_raw():
            key, value = m.decode_key(raw_key), m.decode_value(raw)
            if IPv4Address(int(key.client_addr).to_bytes(4, "little")) == IPv4Address(client) and \
                    now - int(value.last_used) <= seconds * 1e9:
                return False
        return True
    finally:
        m.close()


# --- packet captures inside lab namespaces -------------------------------------------------------------

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


_ICMP = re.compile(r"(?P<smac>[0-9a-f:]{17}) > (?P<dmac>[0-9a-f:]{17}), .*?: (?P<src>[\d.]+) > (?P<dst>[\d.]+): "
                   r"ICMP (?P<what>.*)")


@dataclass(frozen=True)
class IcmpFrame:
    """One captured ICMP message: who sent it, to whom, and tcpdump's reading of it
    ("198.18.0.12 tcp port 30400 unreachable, length 68")."""

    smac: str
    src: str
    dst: str
    what: str


@dataclass
class Capture:
    frames: list[Frame]
    lines: list[str] | None = None      # every line tcpdump printed (frames of any kind)
    icmp: list[IcmpFrame] = field(default_factory=list)

    def port_unreachable(self, *, src: str, dst: str, port: int, proto: str = "tcp") -> list[IcmpFrame]:
        """ICMP port-unreachable messages from src to dst about a packet that was sent to port."""
        return [f for f in self.icmp if f.src == src and f.dst == dst
                and f"{proto} port {port} unreachable" in f.what]

    def matching(self, *, src: str | None = None, dst: str | None = None, sport: int | None = None,
                 dport: int | None = None, ports: set[int] | None = None) -> list[Frame]:
        """Frames with these addresses and ports; `ports`: only frames of the test's own connections (their
        client-side ports, own_ports()) count."""
        return [f for f in self.frames if (src is None or f.src == src) and (dst is None or f.dst == dst)
                and (sport is None or f.sport == sport) and (dport is None or f.dport == dport)
                and (ports is None or f.sport in ports or f.dport in ports)]


@contextmanager
def capture(lab: Lab, host: str, bpf_filter: str, device: str = "eth0") -> Iterator[Capture]:
    """tcpdump on a lab host's device for the duration of the block (frames in both directions).  The block
    starts only once tcpdump listens, and the capture ends only once a marker frame, sent on the device after
    the block, has come out of tcpdump: every frame the device carried before it is in the result, so a check
    that something is absent is not vacuous.  Fails when tcpdump does not start, the marker never comes, or
    the kernel dropped frames of the capture."""
    ethertype = 0x88B5                  # IEEE 802 local experimental: no datapath or stack acts on it
    # A multicast source MAC: no bridge learns or forwards it; sent to the device's own MAC, the peer ignores it.
    marker = "03:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    direction = [] if device == "any" else ["-Q", "inout"]
    # Immediate mode: each frame reaches tcpdump at once (not when a 1 s block times out); a short snapshot
    # and a 16 MiB buffer keep a burst of thousands of frames from being dropped.
    argv = netns.nsenter_argv(lab.netns(host), ["tcpdump", "-i", device, "-nn", "-e", "-l", "--immediate-mode",
                                                "-s", "512", "-B", "16384", *direction,
                                                f"({bpf_filter}) or (ether proto 0x{ethertype:04x})"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    listening, marked = threading.Event(), threading.Event()

    def read(stream: IO[str], into: list[str], event: threading.Event, sign: str) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if sign in line:
                event.set()

    assert proc.stdout is not None and proc.stderr is not None
    readers = [threading.Thread(target=read, args=(proc.stdout, out, marked, marker), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, err, listening, "listening on"), daemon=True)]
    for t in readers:
        t.start()

    def send_marker(dev: str, src: str) -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((dev, 0))
            own = bytes(s.getsockname()[4])[:6].ljust(6, b"\0")
            s.send(own + bytes.fromhex(src.replace(":", "")) + ethertype.to_bytes(2, "big") + bytes(46))

    what = f"tcpdump on {host} {device} ({bpf_filter})"
    result = Capture([])
    try:
        deadline = time.monotonic() + 10
        while not listening.wait(0.05):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start listening: {' / '.join(err) or 'no output'}")
        yield result
        deadline = time.monotonic() + 10
        while not marked.is_set():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} never showed its end marker (sent on {device}): the capture may be incomplete")
            lab.run_in(host, send_marker, "lo" if device == "any" else device, marker, in_cgroup=False)
            marked.wait(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=5)
        lines, skip = [], False
        for line in out:
            if f"(0x{ethertype:04x})" in line:
                skip = True            # a marker frame and its hex dump
                continue
            if skip and (line.startswith("\t") or not line.strip()):
                continue
            skip = False
            lines.append(line)
        result.lines = lines
        for line in lines:
            icmp = _ICMP.search(line)
            if icmp:
                result.icmp.append(IcmpFrame(icmp["smac"], icmp["src"], icmp["dst"], icmp["what"]))
                continue
            m = _LINE.search(line)
            if m:
                result.frames.append(Frame(m["smac"], m["dmac"], m["src"], int(m["sport"]), m["dst"],
                                           int(m["dport"]), line))
    dropped = next((int(line.split()[0]) for line in err if line.endswith("packets dropped by kernel")), 0)
    if dropped:
        pytest.fail(f"{what}: the kernel dropped {dropped} frames of the capture, which is incomplete")


def own_ports(results: list[Any]) -> set[int]:
    """The client-side ports of probe results (ProbeResult.local "ip:port"): a capture's frames of exactly
    those connections."""
    return {int(r.local.rsplit(":", 1)[1]) for r in results if r.local}


def mac_of(lab: Lab, host: str, device: str = "eth0") -> str:
    """A lab device's MAC, through netlink (under nsenter /sys is still the root namespace's)."""
    link = lab.exec(host, ["ip", "-o", "link", "show", device], check=True).stdout
    return link.split("link/ether ")[1].split()[0]


def seen_ip(body: str | None) -> str | None:
    return body.rsplit(":", 1)[0] if body else None


def long_lived(stop_after: float, progress: str | None = None) -> list[str]:
    """In the client: one TCP connection, a GET /hostname every 0.2 s for stop_after seconds; the number of
    answers so far is written to the file `progress` after each one (answers() reads it)."""
    pods: list[str] = []
    with socket.create_connection((NODE1, 30080), timeout=2) as s:
        deadline = time.monotonic() + stop_after
        buf = b""
        while time.monotonic() < deadline:
            s.sendall(f"GET /hostname HTTP/1.1\r\nHost: {NODE1}\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf:
                buf += s.recv(4096)
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                         .split(b":")[1])
            while len(rest) < length:
                rest += s.recv(4096)
            pods.append(rest[:length].decode())
            buf = rest[length:]
            if progress is not None:
                with open(progress + ".tmp", "w") as f:
                    f.write(str(len(pods)))
                os.replace(progress + ".tmp", progress)
            time.sleep(0.2)
    return pods


def answers(progress: Path) -> int:
    """How many answers long_lived has had (0 before the first)."""
    try:
        return int(progress.read_text() or 0)
    except (OSError, ValueError):
        return 0


def root_rules() -> dict[str, str]:
    """The root namespace's iptables and nftables rule sets (read only), without the dated comments."""
    out = {}
    for name, argv in {"iptables": ["iptables-save"], "iptables-legacy": ["iptables-legacy-save"],
                       "nft": ["nft", "list", "ruleset"]}.items():
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        out[name] = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))
    return out




_HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("open", *s.getsockname(), flush=True)
buf = b""
for line in sys.stdin:
    try:
        s.sendall(b"GET /clientip HTTP/1.1\r\nHost: x\r\n\r\n")
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed by the peer")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        fields = dict(h.split(b": ", 1) for h in head.split(b"\r\n")[1:])
        length = int(fields[b"Content-Length"])
        while len(rest) < length:
            rest += s.recv(4096)
        buf = rest[length:]
        print(fields[b"X-Pod-Name"].decode(), rest[:length].decode(), flush=True)
    except Exception as exc:
        print("ERROR", type(exc).__name__, exc, flush=True)
"""


class HeldConnection:
    """One TCP connection from a lab host, kept open by a process of its own: ask() sends a request on it and
    returns "<pod> <client address as the pod saw it>", or "ERROR ..." when the connection broke. Proves a
    flow survived whatever happened between two asks (its conntrack entries, on every node it crosses)."""

    def __init__(self, lab: Lab, host: str, addr: str, port: int) -> None:
        self.proc = subprocess.Popen(netns.nsenter_argv(lab.netns(host), [sys.executable, "-c", _HOLD, addr, str(port)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.local = self._line(5.0)

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return "ERROR timeout: no answer"
        return self.proc.stdout.readline().strip() or "ERROR the holder exited"

    def ask(self, timeout: float = 5.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("ask\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

# --- in-cluster traffic (ClusterIP) ----------------------------------------------------------------------


def node_rules(lab: Lab, node: str) -> dict[str, list[str]]:
    """A lab node's packet-filter rules: iptables (nft and legacy backends) and the nftables rule set, as the
    lines that would make a rule (kube-proxy's would be here); empty lists for a node without any."""
    out = {}
    for name, argv in {"iptables": ["iptables-save"], "iptables-legacy": ["iptables-legacy-save"],
                       "nft": ["nft", "list", "ruleset"]}.items():
        proc = lab.exec(node, argv, in_cgroup=False)
        assert proc.returncode == 0, (name, proc.stderr)
        out[name] = [line for line in proc.stdout.splitlines()
                     if line.strip() and not line.startswith(("#", "*", ":", "COMMIT"))]
    return out


def pod_path_on(lab: Lab, pod: str) -> bool:
    """Whether the pod's host-side veth carries the pod-facing path (lb_pod_ingress and lb_pod_egress)."""
    rec = next(p for p in lab.pods() if p.name == pod)
    shown = [lab.exec(rec.node, ["tc", "filter", "show", "dev", rec.veth, hook], in_cgroup=False).stdout
             for hook in ("ingress", "egress")]
    return "lb_pod_ingress" in shown[0] and "lb_pod_egress" in shown[1]


def cluster_ip(lab: Lab, service: str) -> str:
    """A lab Service's clusterIP ("default/echo")."""
    return str(next(s for s in lab.status()["services"] if s["name"] == service)["clusterIP"])


# --- client-side requests that say what happened (run with lab.run_in in the client's namespace) ----------


def http_from(addr: str, port: int, path: str = "/hostname", src: str | None = None,
              timeout: float = 1.0) -> tuple[int | None, str]:
    """One GET on a new connection (from source address src when given): (status, body), or (None, why) when
    no answer came ("timeout": dropped; "refused": a RST)."""
    try:
        with socket.socket() as s:
            s.settimeout(timeout)
            if src is not None:
                s.bind((src, 0))
            s.connect((addr, port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except TimeoutError:
        return None, "timeout"
    except ConnectionRefusedError:
        return None, "refused"
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/") else b"0"
    return int(status), body.decode(errors="replace")


def http_many(targets: list[tuple[str, int, str, str | None]], timeout: float = 1.0) -> list[tuple[int | None, str]]:
    """http_from for each (addr, port, path, src), one after the other."""
    return [http_from(a, p, path, src, timeout) for a, p, path, src in targets]


def udp_flow(addr: str, port: int, sport: int, progress: str, stop: str, limit: float) -> list[str]:
    """One UDP flow (a fixed source port): "hostname" every 0.1 s until `stop` exists or `limit` seconds pass;
    every answer (the pod's name) is appended to the file `progress` as it comes."""
    answers: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", sport))
        s.settimeout(0.2)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not os.path.exists(stop):
            s.sendto(b"hostname", (addr, port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            answers.append(data.decode().strip())
            with open(progress, "a") as f:
                f.write(answers[-1] + "\n")
            time.sleep(0.1)
    return answers
