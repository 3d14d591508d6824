"""The lab's pod workload: a subset of agnhost netexec (the server Kubernetes e2e tests use).

    python -m bpflb_lab.lab.echo --name POD [--http-port 8080 ...] [--udp-port 8081 ...] [--ready-file F]

HTTP (HTTP/1.1, keep-alive): GET /hostname -> the pod name; GET /clientip -> "ip:port" of the peer as the
socket sees it; GET /echo?msg=x -> x; POST /echo -> the request body; GET /healthz -> ok. Every response also
carries the headers X-Pod-Name and X-Client-Addr, so a single request tells both who answered and whom it saw.
The HTTP server is one asyncio event loop: it holds tens of thousands of idle connections at once (the
file-descriptor limit is raised to what the namespace allows).
UDP: "hostname" -> pod name; "clientip" -> "ip:port"; "clientip x" -> "ip:port x" (an answer as large as the
request: the lab's fragmented datagrams); "echo x" -> x; anything else gets no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from urllib.parse import parse_qs, urlsplit

POD_HEADER = "X-Pod-Name"
CLIENT_HEADER = "X-Client-Addr"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_MAX_HEAD = 64 * 1024


class EchoHTTP(asyncio.Protocol):
    """One HTTP/1.1 connection: requests parsed as they arrive, answered in order, kept alive."""

    def __init__(self, pod: str, verbose: bool) -> None:
        self.pod = pod
        self.verbose = verbose
        self.buf = b""
        self.client = "?"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.client = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self._reply(400, "request head too large\n", close=True)
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            parts = lines[0].split()
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            length = headers.get("content-length", "0")
            if len(parts) != 3 or not length.isdigit():
                self._reply(400, "bad request\n", close=True)
                return
            if len(self.buf) < end + 4 + int(length):
                return                      # the body is still coming
            body = self.buf[end + 4:end + 4 + int(length)]
            self.buf = self.buf[end + 4 + int(length):]
            method, target, version = parts
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if self.verbose:
                sys.stderr.write(f"{self.client} {method} {target}\n")
            self._answer(method, target, body, close)

    def _answer(self, method: str, target: str, body: bytes, close: bool) -> None:
        url = urlsplit(target)
        if method == "POST" and url.path == "/echo":
            self._reply(200, body, close)
        elif method not in ("GET", "HEAD"):
            self._reply(405, f"405 method not allowed: {method}\n", close)
        elif url.path == "/hostname":
            self._reply(200, self.pod, close)
        elif url.path == "/clientip":
            self._reply(200, self.client, close)
        elif url.path == "/echo":
            self._reply(200, parse_qs(url.query).get("msg", [""])[0], close)
        elif url.path == "/healthz":
            self._reply(200, "ok", close)
        else:
            self._reply(404, f"404 page not found: {url.path}\n", close)

    def _reply(self, code: int, body: str | bytes, close: bool) -> None:
        assert self.transport is not None
        data = body.encode() if isinstance(body, str) else body
        head = (f"HTTP/1.1 {code} {_REASONS[code]}\r\nServer: bpflb-echo\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
                f"{POD_HEADER}: {self.pod}\r\n{CLIENT_HEADER}: {self.client}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n")
        self.transport.write(head.encode() + data)
        if close:
            self.transport.close()


def raise_fd_limit() -> int:
    """As many open files as this namespace allows (every idle connection holds one)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def http_servers(ports: list[int], pod: str, verbose: bool) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    return [await loop.create_server(lambda: EchoHTTP(pod, verbose), "0.0.0.0", p, reuse_address=True,
                                     backlog=4096) for p in ports]


def udp_answer(message: bytes, pod: str, peer: tuple[str, int]) -> bytes | None:
    """The reply to one datagram, None for an unknown command."""
    text = message.decode(errors="replace").strip()
    if text == "hostname":
        return pod.encode()
    if text == "clientip":
        return f"{peer[0]}:{peer[1]}".encode()
    if message.startswith(b"clientip "):
        return f"{peer[0]}:{peer[1]}".encode() + message[8:]
    if text == "echo" or text.startswith("echo "):
        return text[5:].encode()
    return None


def serve_udp(sock: socket.socket, pod: str, verbose: bool) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            reply = udp_answer(data, pod, peer)
            if verbose:
                sys.stderr.write(f"udp {peer[0]}:{peer[1]} {data[:60]!r}\n")
            if reply is not None:
                sock.sendto(reply, peer)
        except OSError as exc:  # e.g. ICMP errors surfacing on the socket: keep serving
            if verbose:
                sys.stderr.write(f"udp: {exc}\n")


def udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpflb_lab.lab.echo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the pod name /hostname answers")
    parser.add_argument("--http-port", type=int, action="append", help="TCP port(s) for HTTP (default 8080)")
    parser.add_argument("--udp-port", type=int, action="append", help="UDP port(s) (default 8081)")
    parser.add_argument("--ready-file", type=Path, help="written once every socket listens")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    http_ports = args.http_port if args.http_port is not None else [8080]
    udp_ports = args.udp_port if args.udp_port is not None else [8081]

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    files = raise_fd_limit()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(http_servers(http_ports, args.name, args.verbose))
        sockets = [udp_socket(p) for p in udp_ports]
    except OSError as exc:
        print(f"echo {args.name}: cannot listen: {exc}", file=sys.stderr)
        return 1
    for sock in sockets:
        threading.Thread(target=serve_udp, args=(sock, args.name, args.verbose), daemon=True).start()
    print(f"echo {args.name}: HTTP on {http_ports}, UDP on {udp_ports}, up to {files} open files", file=sys.stderr,
          flush=True)
    if args.ready_file:
        tmp = args.ready_file.with_name(f".{args.ready_file.name}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, args.ready_file)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
