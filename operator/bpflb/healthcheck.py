"""kube-proxy's two health servers, served by the agent as kube-proxy serves them (kubernetes
pkg/proxy/healthcheck): every eTP Local LoadBalancer Service's healthCheckNodePort on the node's addresses
(200 while the node has a ready endpoint of it, else 503, with kube-proxy's JSON body), and the node's proxy
health server (port 10256: /healthz and /livez), which cloud load balancers probe for eTP Cluster Services.

Health, as kube-proxy defines it: a change noticed (queued_update) must be synced (updated) within the
timeout (twice the resync interval, as kube-proxy's twice its sync period); before the first sync the
proxy counts as healthy. /healthz also fails while the Node is being deleted or is tainted
ToBeDeletedByClusterAutoscaler; /livez ignores the Node.

One asyncio loop on a thread of its own serves every listener, so hundreds of health check ports cost one
thread; each answer is one HTTP/1.1 response on a closed connection, like Go's server to a probe."""

from __future__ import annotations

import asyncio
import datetime
import errno
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.types import HealthCheck

log = logging.getLogger("bpflb.health")

PROXY_HEALTH_PORT = 10256                       # kube-proxy's --healthz-bind-address port
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}
_MAX_REQUEST = 8192                             # a probe's request line and headers; more is cut off


def go_time(t: float | None) -> str:
    """A time as Go's time.Time prints it (the format kube-proxy's bodies carry), UTC; None is Go's zero."""
    if t is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.datetime.fromtimestamp(t, tz=datetime.UTC)
    fraction = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{fraction}" if fraction else "") + " +0000 UTC"


def node_eligible(node: Mapping[str, Any] | None) -> bool:
    """kube-proxy's SyncNode: a Node being deleted, or tainted by the cluster autoscaler for deletion, makes
    /healthz fail so load balancers drain it first. An unknown Node is eligible (as while starting up)."""
    if not isinstance(node, Mapping):
        return True
    meta = node.get("metadata") or {}
    if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
        return False
    spec = node.get("spec") or {}
    taints = spec.get("taints") if isinstance(spec, Mapping) else None
    return not any(isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT for t in taints or [])


class ProxyHealth:
    """The proxy's health state (kube-proxy's ProxyHealthServer without its HTTP part)."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._last_updated: float | None = None
        self._oldest_pending: float | None = None
        self._eligible = True

    def queued_update(self) -> None:
        """A change the datapath does not hold yet was noticed."""
        with self._lock:
            if self._oldest_pending is None:
                self._oldest_pending = self.clock()

    def updated(self) -> None:
        """The datapath holds everything noticed so far."""
        with self._lock:
            self._oldest_pending = None
            self._last_updated = self.clock()

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._eligible = eligible

    def state(self) -> tuple[bool, float | None, float, bool]:
        """(healthy, last updated, now, node eligible)."""
        with self._lock:
            now = self.clock()
            last, pending, eligible = self._last_updated, self._oldest_pending, self._eligible
        if last is None or pending is None or now - pending < self.timeout:
            return True, last, now, eligible
        return False, last, now, eligible

    def healthy(self) -> bool:
        return self.state()[0]

    def answer(self, path: str) -> tuple[int, str]:
        """/healthz and /livez as kube-proxy answers them (status, JSON body)."""
        healthy, last, now, eligible = self.state()
        if path == "/healthz":
            healthy = healthy and eligible
        elif path != "/livez":
            return 404, "404 page not found\n"
        if healthy:
            last = now          # kube-proxy: a healthy server's lastUpdated is recent, as it used to be
        body = f'{{"lastUpdated": "{go_time(last)}","currentTime": "{go_time(now)}"'
        body += f', "nodeEligible": {str(eligible).lower()}}}' if path == "/healthz" else "}"
        return (200 if healthy else 503), body


def service_answer(check: HealthCheck, proxy_healthy: bool) -> tuple[int, str]:
    """A healthCheckNodePort's answer: kube-proxy's status and body (tab-indented JSON)."""
    body = json.dumps({"service": {"namespace": check.namespace, "name": check.name},
                       "localEndpoints": check.local_endpoints, "serviceProxyHealthy": proxy_healthy},
                      indent="\t")
    return (200 if check.local_endpoints and proxy_healthy else 503), body


@dataclass(frozen=True)
class _Listener:
    addr: str
    port: int


class HealthServers:
    """The node's health HTTP servers: the proxy health server (when proxy_listen is set) and one listener per
    (node address, healthCheckNodePort), kept equal to the latest sync."""

    def __init__(self, health: ProxyHealth, proxy_listen: tuple[str, int] | None = ("0.0.0.0", PROXY_HEALTH_PORT)):
        self.health = health
        self.proxy_listen = proxy_listen
        self._checks: dict[int, HealthCheck] = {}
        self._servers: dict[_Listener, asyncio.Server] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Start the loop and the proxy health server; returns problems (an address in use, say)."""
        if self._thread is not None:
            return []
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="health", daemon=True)
        self._thread.start()
        if self.proxy_listen is None:
            return []
        problems: list[str] = self._call(self._open({_Listener(*self.proxy_listen)}))
        return problems

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._close_all())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- what to serve ---------------------------------------------------------------------------
    def sync(self, checks: Mapping[int, HealthCheck], addrs: Sequence[IPv4Address]) -> list[str]:
        """Serve exactly these health checks on these addresses; counts change at once, listeners open and
        close as needed. Returns what could not be opened (retried at the next sync)."""
        if self._thread is None:
            self.start()
        self._checks = dict(checks)                 # read by the handlers: one reference swap
        want = {_Listener(str(a), port) for port in checks for a in addrs}
        if self.proxy_listen is not None:
            want.add(_Listener(*self.proxy_listen))
        if want == self._servers.keys():
            return []           # (the loop's thread changes _servers only in a _call, which is not running)
        return list(self._call(self._reconcile(want)))

    @property
    def listening(self) -> set[tuple[str, int]]:
        return {(lst.addr, lst.port) for lst in self._servers}

    async def _reconcile(self, want: set[_Listener]) -> list[str]:
        for gone in [lst for lst in self._servers if lst not in want]:
            server = self._servers.pop(gone)
            server.close()
            await server.wait_closed()
            log.info("health check %s:%d closed", gone.addr, gone.port)
        return await self._open(want - set(self._servers))

    async def _open(self, listeners: set[_Listener]) -> list[str]:
        problems = []
        for lst in sorted(listeners, key=lambda x: (x.port, x.addr)):
            try:
                self._servers[lst] = await asyncio.start_server(
                    functools.partial(self._serve, lst), lst.addr, lst.port, reuse_address=True)
            except OSError as exc:
                reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                # Returned, not logged: the agent says it once (and retries at every sync).
                problems.append(f"health check {lst.addr}:{lst.port}: cannot listen ({reason}: {exc.strerror}); "
                                "retried at every sync")
                continue
            what = "proxy health server (/healthz, /livez)" if lst.port not in self._checks else "health check"
            log.info("%s listening on %s:%d", what, lst.addr, lst.port)
        return problems

    async def _close_all(self) -> None:
        for server in self._servers.values():
            server.close()
        for server in self._servers.values():
            await server.wait_closed()
        self._servers.clear()

    # -- HTTP --------------------------------------------------------------------------------------
    def answer(self, port: int, path: str) -> tuple[int, str, dict[str, str]]:
        """What a GET on this port answers: status, body and the extra headers."""
        headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"}
        check = self._checks.get(port)
        if self.proxy_listen is not None and port == self.proxy_listen[1] and check is None:
            status, body = self.health.answer(path.split("?", 1)[0])
            if status == 404:
                headers = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
            return status, body, headers
        if check is None:
            return 503, "", headers             # closing: kube-proxy answers nothing useful either
        status, body = service_answer(check, self.health.healthy())
        headers["X-Load-Balancing-Endpoint-Weight"] = str(check.local_endpoints)
        return status, body, headers

    async def _serve(self, lst: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) >= 2 else "/"
            status, body, headers = self.answer(lst.port, path)
            data = body.encode()
            lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", *(f"{k}: {v}" for k, v in headers.items()),
                     f"Date: {datetime.datetime.now(tz=datetime.UTC).strftime('%a, %d %b %Y %H:%M:%S GMT')}",
                     f"Content-Length: {len(data)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + (data if not head.startswith(b"HEAD ") else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
