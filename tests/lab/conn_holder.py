"""A lab test tool: many TCP connections held open by one process inside a lab namespace, driven by JSON
lines on stdin, one JSON answer line each on stdout (so a test keeps them open while it does other things).

    {"cmd": "open", "addr": A, "port": P, "count": N, "bind": [ADDR, PORT] (optional), "concurrency": C}
        -> {"opened": n, "failed": m, "errors": {why: k}}
    {"cmd": "ask", "path": "/clientip", "body_size": 0}
        -> {"answered": n, "failed": m, "errors": {...}, "replies": [[local, pod, client_seen, body_ok], ...]}
    {"cmd": "close"} -> {"closed": n}, and the process exits.

Each connection keeps its socket (HTTP/1.1 keep-alive): "ask" sends one request on every open connection at once
and reads the answer; a failed connection is reported and dropped.

    python -m tests.lab.conn_holder
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
from collections import Counter
from typing import Any, Self


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.local = f"{host}:{port}"

    async def ask(self, path: str, body: bytes) -> tuple[str, str, str, bool]:
        method = "POST" if body else "GET"
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if " 200 " not in lines[0] + " ":
            raise ConnectionError(f"HTTP status {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        answer = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return self.local, headers.get("x-pod-name", ""), headers.get("x-client-addr", ""), \
            (answer == body) if body else True


def why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    return type(exc).__name__


class Holder:
    def __init__(self) -> None:
        self.conns: list[Conn] = []

    async def open(self, addr: str, port: int, count: int, bind: list[Any] | None, concurrency: int,
                   timeout: float) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()

        async def one() -> None:
            async with sem:
                try:
                    local = (bind[0], int(bind[1])) if bind else None
                    r, w = await asyncio.wait_for(asyncio.open_connection(addr, port, local_addr=local), timeout)
                    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.conns.append(Conn(r, w))
                except (TimeoutError, OSError) as exc:
                    errors[why(exc)] += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return {"opened": count - sum(errors.values()), "failed": sum(errors.values()), "errors": dict(errors),
                "open": len(self.conns)}

    async def ask(self, path: str, body_size: int, timeout: float, concurrency: int) -> dict[str, Any]:
        body = bytes(i % 251 for i in range(body_size))
        sem = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()
        replies: list[tuple[str, str, str, bool]] = []
        dead: list[Conn] = []

        async def one(conn: Conn) -> None:
            async with sem:
                try:
                    replies.append(await asyncio.wait_for(conn.ask(path, body), timeout))
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    errors[why(exc)] += 1
                    dead.append(conn)

        await asyncio.gather(*(one(c) for c in self.conns))
        for conn in dead:
            self.conns.remove(conn)
            conn.writer.close()
        return {"answered": len(replies), "failed": len(dead), "errors": dict(errors), "replies": replies}

    def close(self) -> dict[str, Any]:
        for conn in self.conns:
            conn.writer.close()
        return {"closed": len(self.conns)}


def raise_fd_limit() -> None:
    """Every held connection is a file: as many as allowed (the hard limit, or more with CAP_SYS_RESOURCE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/sys/fs/nr_open") as f:
        ceiling = int(f.read())
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main() -> None:
    raise_fd_limit()
    holder = Holder()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        if req["cmd"] == "open":
            out = await holder.open(req["addr"], req["port"], req["count"], req.get("bind"),
                                    req.get("concurrency", 200), req.get("timeout", 5.0))
        elif req["cmd"] == "ask":
            out = await holder.ask(req.get("path", "/clientip"), req.get("body_size", 0), req.get("timeout", 10.0),
                                   req.get("concurrency", 2000))
        else:
            print(json.dumps(holder.close()), flush=True)
            break
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())


class HolderProcess:
    """The tool above running in a lab host's namespace, for a test to drive (a context manager)."""

    def __init__(self, lab: Any, host: str) -> None:
        import os
        import subprocess
        from pathlib import Path

        from bpflb_lab.lab import netns

        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "operator")])}
        self.proc = subprocess.Popen(netns.nsenter_argv(lab.netns(host), [sys.executable, "-m", "tests.lab.conn_holder"]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)

    def call(self, timeout: float = 120.0, **request: Any) -> dict[str, Any]:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"conn_holder: no answer to {request['cmd']} within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"conn_holder exited (code {self.proc.wait()}) on {request['cmd']}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        import subprocess

        try:
            self.call(timeout=30, cmd="close")
            self.proc.wait(timeout=30)
        except (OSError, TimeoutError, RuntimeError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
