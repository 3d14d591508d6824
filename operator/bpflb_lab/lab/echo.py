"""The lab's pod workload: a subset of agnhost netexec (the server Kubernetes e2e tests use).

    python -m bpflb_lab.lab.echo --name POD [--http-port 8080 ...] [--udp-port 8081 ...] [--ready-file F]

HTTP (HTTP/1.1, keep-alive): GET /hostname -> the pod name; GET /clientip -> "ip:port" of the peer as the
socket sees it; GET /echo?msg=x -> x; GET /healthz -> ok. Every response also carries the headers
X-Pod-Name and X-Client-Addr, so a single request tells both who answered and whom it saw.
UDP: "hostname" -> pod name; "clientip" -> "ip:port"; "echo x" -> x.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from urllib.parse import parse_qs, urlsplit

POD_HEADER = "X-Pod-Name"
CLIENT_HEADER = "X-Client-Addr"


class EchoHTTPServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, port: int, pod: str, verbose: bool) -> None:
        self.pod = pod
        self.verbose = verbose
        super().__init__(("0.0.0.0", port), EchoHandler)


class EchoHandler(BaseHTTPRequestHandler):
    server: EchoHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "bpflb-echo"
    sys_version = ""
    wbufsize = -1                 # headers and body leave in one write (no Nagle/delayed-ACK stall)
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        client = f"{self.client_address[0]}:{self.client_address[1]}"
        if url.path == "/hostname":
            self._reply(200, self.server.pod, client)
        elif url.path == "/clientip":
            self._reply(200, client, client)
        elif url.path == "/echo":
            self._reply(200, parse_qs(url.query).get("msg", [""])[0], client)
        elif url.path == "/healthz":
            self._reply(200, "ok", client)
        else:
            self._reply(404, f"404 page not found: {url.path}\n", client)

    def _reply(self, code: int, body: str, client: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header(POD_HEADER, self.server.pod)
        self.send_header(CLIENT_HEADER, client)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.client_address[0]}:{self.client_address[1]} {format % args}\n")


def udp_answer(message: bytes, pod: str, peer: tuple[str, int]) -> bytes | None:
    """The reply to one datagram, None for an unknown command."""
    text = message.decode(errors="replace").strip()
    if text == "hostname":
        return pod.encode()
    if text == "clientip":
        return f"{peer[0]}:{peer[1]}".encode()
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
    try:
        servers = [EchoHTTPServer(p, args.name, args.verbose) for p in http_ports]
        sockets = [udp_socket(p) for p in udp_ports]
    except OSError as exc:
        print(f"echo {args.name}: cannot listen: {exc}", file=sys.stderr)
        return 1
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for sock in sockets:
        threading.Thread(target=serve_udp, args=(sock, args.name, args.verbose), daemon=True).start()
    print(f"echo {args.name}: HTTP on {http_ports}, UDP on {udp_ports}", file=sys.stderr, flush=True)
    if args.ready_file:
        tmp = args.ready_file.with_name(f".{args.ready_file.name}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, args.ready_file)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
