"""Flow state under load and under attack, on the wire (a lab with real agents): 20,000 TCP connections from
the client through node1:30080 to the remote pods, all held open at once and all answered; and spoofed SYN
floods from the client's namespace -- one beyond the old 4,536-port pool, one beyond the whole SNAT range --
after which a legitimate client connects: at once after the first, within seconds (the conntrack GC's early
drop of pending handshakes) after the second."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb.inspect import collect
from bpflb_lab.lab import Lab, netns
from tests.lab.conftest import lab_running
from tests.lab.conn_holder import HolderProcess

pytestmark = pytest.mark.privileged

NODE1 = "198.18.0.11"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running() as shared:
        # The client is one address: 20,000 connections to one frontend need that many source ports.
        netns.write_sysctls(shared.netns("client"), {"net.ipv4.ip_local_port_range": "1024 65535"})
        yield shared


def node1(lab: Lab) -> dict[str, Any]:
    return collect(lab.pin_root / "node1")


def test_20000_concurrent_connections_are_all_answered_while_held_open(lab: Lab) -> None:
    """Two client processes of 10,000 connections each (a process may hold fewer than 20,000 files here)."""
    with HolderProcess(lab, "client") as first, HolderProcess(lab, "client") as second:
        for client in (first, second):
            opened = client.call(cmd="open", addr=NODE1, port=30080, count=10_000, concurrency=256, timeout=10)
            assert opened["opened"] == 10_000, opened
        replies = []
        for client in (first, second):
            answers = client.call(cmd="ask", path="/clientip", timeout=60, concurrency=4000)
            assert answers["answered"] == 10_000, {k: v for k, v in answers.items() if k != "replies"}
            replies += answers["replies"]
        pods = Counter(pod for _, pod, _, _ in replies)
        assert set(pods) == {"echo-a", "echo-b"}, pods
        seen = {(pod, client_seen) for _, pod, client_seen, _ in replies}
        assert len(seen) == 20_000 and all(s.startswith(f"{NODE1}:") for _, s in seen), \
            "every connection reached its pod from node1 with a port of its own towards that pod"
        by_port = Counter(s for _, s in seen)
        assert max(by_port.values()) == 2, "a port is unique per backend, not per node: both pods use many"
        ct = node1(lab)["conntrack"]
        assert ct["ct_fwd"]["established"] >= 20_000 and ct["ct_rev"]["established"] >= 20_000
        pool = {p["backend"]: p["ports_used"] for p in ct["nat_pool"]}
        assert pool["10.244.2.10:8080/TCP"] + pool["10.244.3.10:8080/TCP"] >= 20_000
        shown = subprocess.run([sys.executable, "-m", "bpflb", "inspect", "--pin-root", str(lab.pin_root / "node1")],
                               capture_output=True, text=True, check=True).stdout
        assert "ct_fwd" in shown and "ct_rev" in shown and "SNAT port pool: ports 32768-65535" in shown
        assert "10.244.2.10:8080/TCP" in shown and "10.244.3.10:8080/TCP" in shown
        # Still held: a second round on the same 20,000 connections.
        for client in (first, second):
            assert client.call(cmd="ask", path="/hostname", timeout=60, concurrency=4000)["answered"] == 10_000
    counters = node1(lab)["counters"]
    assert counters["drop_nat_exhausted"] == 0 and counters["ct_insert_failed"] == 0


def _csum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def spoofed_syns(dst: str, dport: int, count: int, seed: int) -> int:
    """count SYNs to dst:dport from distinct spoofed sources in 198.51.100.0/24 (run in the client's
    namespace); returns how many were sent."""
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent = 0
    daddr = socket.inet_aton(dst)
    try:
        for i in range(count):
            saddr = socket.inet_aton(f"198.51.100.{1 + i % 254}")
            sport = 1024 + (i // 254) % 64000
            seq = rng.getrandbits(32)
            tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
            pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, i & 0xFFFF, 0, 64, socket.IPPROTO_TCP, 0, saddr, daddr)
            ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
            sock.sendto(ip + tcp, (dst, 0))
            sent += 1
    finally:
        sock.close()
    return sent


def connect_until_answered(lab: Lab, within: float) -> tuple[float, list[str]]:
    """A legitimate client's new connections until one is answered: (seconds it took, errors before).
    An attempt answers in about 0.1 s here; each is given 2.5 s, room for one SYN retransmission (1 s): a
    port given back early can still be held by the backend's half-open handshake with a spoofed source (the
    pods hold about 3,900 each after the floods), which costs the new flow its first SYN (docs/datapath.md,
    garbage collection), and a loaded machine can be slow to start the probe."""
    start = time.monotonic()
    errors: list[str] = []
    while time.monotonic() - start < within:
        body, err = lab.http_get("client", f"http://{NODE1}:30080/hostname", timeout=2.5)
        if body in ("echo-a", "echo-b"):
            return time.monotonic() - start, errors
        errors.append(err or f"answer {body!r}")
        time.sleep(0.2)
    pytest.fail(f"no connection answered within {within:.0f}s of the flood; errors: {Counter(errors)}")


def test_a_spoofed_syn_flood_never_keeps_a_legitimate_client_out(lab: Lab) -> None:
    before = node1(lab)["counters"]
    # 30,000 spoofed SYNs: 6.6 times the old pool of 4,536 ports per backend, half of today's range.
    sent = lab.run_in("client", spoofed_syns, NODE1, 30080, 30_000, 1, timeout=120)
    took, errors = connect_until_answered(lab, within=30)
    assert errors == [], f"the flood kept the client out for {took:.1f}s: {Counter(errors)}"
    after = node1(lab)["counters"]
    assert after["new_flow"] - before["new_flow"] >= sent, "every spoofed SYN got a flow (and a port)"
    assert after["drop_nat_exhausted"] == before["drop_nat_exhausted"]

    # 80,000 more: beyond the whole range of both backends (2 x 32,768 ports). The overflow is answered
    # with RSTs; pending handshakes give their ports back early under this pressure, so the client gets
    # in within seconds, not after the 60 s handshake limit.
    lab.run_in("client", spoofed_syns, NODE1, 30080, 80_000, 2, timeout=300)
    flooded = time.monotonic()
    exhausted = node1(lab)["counters"]
    assert exhausted["reset_nat_exhausted"] > after["reset_nat_exhausted"], "the overflow is answered, not dropped"
    took, errors = connect_until_answered(lab, within=60)
    assert time.monotonic() - flooded < 45, f"the client got in only after {took:.1f}s"
    assert set(errors) <= {"connection refused"}, f"refused with a RST while full, never silently: {errors}"
    # The collection that let the client in says so once it is through (it logs at its end).
    deadline = time.monotonic() + 30
    while "whose TCP handshake was pending" not in lab.paths.agent_log("node1").read_text():
        assert time.monotonic() < deadline, "the agent says when it drops pending handshakes early"
        time.sleep(0.2)
