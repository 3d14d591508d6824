"""A client process for the socket LB's BPF tests (tests/bpf/test_sock_lb.py, `python -m bpflb_lab.sockclient
CGROUP`): it moves itself into the cgroup given as argv[1] before it opens any socket (a socket belongs to its
creator's cgroup), then runs the operations read as JSON from stdin and prints their outcomes as JSON.  Run
it inside the client's network namespace (`nsenter --net=...`; `ip netns exec` would hide the cgroup
hierarchy).

Operations (each a dict with "op", "addr", "port", "count"; every outcome is a dict, "errno" on failure):
  tcp        connect, getpeername, read the server's line            -> peer, reply
  udp        connect, getpeername, send, recvfrom                    -> peer, source, reply
  udp_unconn one socket: sendto the address `count` times, recvfrom  -> source, reply (per datagram)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

TIMEOUT = 5.0


def _tcp(addr: str, port: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((addr, port))
        peer = s.getpeername()
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        return {"peer": list(peer), "reply": data.decode().strip()}


def _udp(addr: str, port: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.connect((addr, port))
        peer = s.getpeername()
        s.send(b"hello\n")
        data, source = s.recvfrom(256)
        return {"peer": list(peer), "source": list(source), "reply": data.decode().strip()}


def _udp_unconnected(addr: str, port: int, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), sys.byteorder)   # SO_COOKIE
        for _ in range(count):
            try:
                s.sendto(b"hello\n", (addr, port))
                data, source = s.recvfrom(256)
                out.append({"source": list(source), "reply": data.decode().strip(), "cookie": cookie})
            except OSError as exc:
                out.append({"errno": exc.errno, "cookie": cookie})
    return out


def run(op: dict[str, Any]) -> list[dict[str, Any]]:
    kind, addr, port, count = op["op"], op["addr"], int(op["port"]), int(op.get("count", 1))
    if kind == "udp_unconn":
        return _udp_unconnected(addr, port, count)
    out: list[dict[str, Any]] = []
    for _ in range(count):
        try:
            out.append(_tcp(addr, port) if kind == "tcp" else _udp(addr, port))
        except OSError as exc:
            out.append({"errno": exc.errno})
    return out


def main() -> None:
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    json.dump([run(op) for op in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
