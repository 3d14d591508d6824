"""Prometheus metrics (the prometheus-client package) and health probes of the agent and the operator, and
the small HTTP server that serves them (GET /metrics, /healthz, /readyz).

The agent's datapath metrics are read at scrape time through the datapath seam, never kept twice: packet
counters by name as lb_structs.h's STAT_* define them (drops as bpflb_drop_count_total{reason}, every
other counter as bpflb_datapath_packets_total{counter}), and each bounded map's fill level as
bpflb_map_pressure{map_name} (entries / max_entries, Cilium's name). Its own loop adds sync durations, sync
outcomes and the time of the last successful sync. The probes mean something: the agent is live while its
loop turns (a heartbeat no older than a bound) and ready once its first full sync is done."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from bpflb.datapath.base import Datapath, MapFill

log = logging.getLogger("bpflb.metrics")

AGENT_METRICS_PORT = 9962       # Cilium's agent metrics port
OPERATOR_METRICS_PORT = 9963    # Cilium's operator metrics port
LIVENESS_STALE = 60.0           # the agent is not live when its loop has not turned for this long
FILL_INTERVAL = 5.0             # map fill levels are counted at most this often (a scrape storm costs nothing)
DROP_PREFIX = "drop_"

Check = Callable[[], tuple[bool, str]]


def split_listen(listen: str) -> tuple[str, int]:
    """'ADDR:PORT' (or ':PORT'; port 0: any free one) -> (addr, port); ValueError naming what was expected."""
    addr, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"listen address {listen!r}: expected ADDR:PORT with a port 0-65535")
    return addr.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """GET /metrics (the registry, in the format the scraper asks for), /healthz and /readyz (200 when the
    check passes, 503 with its reason when not), on a thread of its own."""

    def __init__(self, listen: str, registry: CollectorRegistry, *, name: str,
                 live: Check | None = None, ready: Check | None = None) -> None:
        self.addr, self.port = split_listen(listen)
        self.registry = registry
        self.name = name
        self.checks: dict[str, Check] = {"/healthz": live or (lambda: (True, "ok")),
                                         "/readyz": ready or (lambda: (True, "ok"))}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        encoder, content_type = choose_encoder(self.headers.get("Accept") or "")
                        self._answer(HTTPStatus.OK, encoder(owner.registry), content_type)
                    elif path in owner.checks:
                        ok, why = owner.checks[path]()
                        self._answer(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                                     (why + "\n").encode(), "text/plain; charset=utf-8")
                    else:
                        self._answer(HTTPStatus.NOT_FOUND, b"GET /metrics, /healthz or /readyz\n", "text/plain")
                except Exception as exc:
                    log.exception("%s metrics: GET %s failed", owner.name, path)
                    self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc}\n".encode(), "text/plain")

            def _answer(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:   # probes every few seconds: not for the log
                log.debug("%s metrics: " + fmt, owner.name, *args)

        try:
            self._server = ThreadingHTTPServer((self.addr, self.port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.name} metrics and probes: cannot listen on {self.addr}:{self.port}: "
                                     f"{exc.strerror}") from exc
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{self.name}-metrics", daemon=True)
        self._thread.start()
        log.info("%s: metrics on http://%s:%d/metrics, probes /healthz and /readyz", self.name, self.addr, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- the agent ------------------------------------------------------------------------------------------


class AgentView(Protocol):
    """What the metrics read of an agent (bpflb.agent.Agent): its datapath and its loop's bookkeeping."""

    datapath: Datapath
    heartbeat: float                  # monotonic time the loop last turned
    synced: bool                      # the first full sync is done
    uninstalled: bool


class DatapathCollector(Collector):
    """The datapath's counters and map fill levels, read when scraped."""

    def __init__(self, agent: AgentView, fill_interval: float = FILL_INTERVAL) -> None:
        self.agent = agent
        self.fill_interval = fill_interval
        self._fills: tuple[float, Mapping[str, MapFill]] = (0.0, {})
        self._lock = threading.Lock()

    def _fill_levels(self) -> Mapping[str, MapFill]:
        with self._lock:
            at, fills = self._fills
            if not fills or time.monotonic() - at >= self.fill_interval:
                fills = self.agent.datapath.fill_levels()
                self._fills = (time.monotonic(), fills)
            return fills

    def collect(self) -> Iterator[Any]:
        if self.agent.uninstalled:
            return
        try:
            counters = self.agent.datapath.counters()
            fills = self._fill_levels()
        except (AssertionError, OSError) as exc:      # not loaded yet, or maps gone (uninstall)
            log.debug("datapath metrics not readable now: %s", exc)
            return
        drops = CounterMetricFamily("bpflb_drop_count", "Packets the datapath dropped, by reason "
                                    "(STAT_DROP_* of lb_structs.h)", labels=["reason"])
        packets = CounterMetricFamily("bpflb_datapath_packets", "Datapath packet counters other than drops, "
                                      "by name (STAT_* of lb_structs.h)", labels=["counter"])
        for name, value in sorted(counters.items()):
            if name.startswith(DROP_PREFIX):
                drops.add_metric([name[len(DROP_PREFIX):]], value)
            else:
                packets.add_metric([name], value)
        pressure = GaugeMetricFamily("bpflb_map_pressure", "Fill level of a BPF map: entries / max_entries",
                                     labels=["map_name"])
        entries = GaugeMetricFamily("bpflb_map_entries", "Entries in a BPF map", labels=["map_name"])
        capacity = GaugeMetricFamily("bpflb_map_capacity", "max_entries of a BPF map", labels=["map_name"])
        for name, fill in sorted(fills.items()):
            pressure.add_metric([name], fill.pressure)
            entries.add_metric([name], fill.entries)
            capacity.add_metric([name], fill.capacity)
        yield from (drops, packets, pressure, entries, capacity)
        neigh = self.agent.datapath.node_neighbour_counts()
        if neigh:
            requests = CounterMetricFamily("bpflb_node_neighbour_arp_requests", "ARP requests the agent sent to "
                                           "verify peer nodes' neighbour entries, by kind (unicast, broadcast)",
                                           labels=["kind"])
            for kind in ("unicast", "broadcast"):
                requests.add_metric([kind], neigh.get(kind, 0))
            yield requests
            yield CounterMetricFamily("bpflb_node_neighbour_mac_changes", "Peer nodes found answering from a new "
                                      "MAC (the kernel's neighbour entry now holds it)",
                                      value=neigh.get("mac_changes", 0))


class AgentMetrics:
    """The agent's registry: the datapath's (read at scrape) and its sync loop's (observed after each sync)."""

    def __init__(self, agent: AgentView, *, stale_after: float = LIVENESS_STALE,
                 fill_interval: float = FILL_INTERVAL) -> None:
        self.agent = agent
        self.stale_after = stale_after
        self.registry = CollectorRegistry()
        self.registry.register(DatapathCollector(agent, fill_interval))
        self.sync_seconds = Histogram(
            "bpflb_sync_duration_seconds", "Time one sync took: read the source, translate, program the maps",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.syncs = Counter("bpflb_syncs", "Sync attempts by result (ok, error, waiting: nothing to program yet)",
                             ["result"], registry=self.registry)
        self.last_success = Gauge("bpflb_last_successful_sync_timestamp_seconds",
                                  "Unix time of the last sync that programmed the datapath", registry=self.registry)
        self.frontends = Gauge("bpflb_frontends", "Frontends programmed in the datapath", registry=self.registry)
        self.ready_gauge = Gauge("bpflb_agent_ready", "1 once the first full sync is done", registry=self.registry)
        for result in ("ok", "error", "waiting"):
            self.syncs.labels(result)

    def observe_sync(self, seconds: float, result: str, frontends: int) -> None:
        """One sync attempt of the agent's loop: its duration and result (ok, error, waiting)."""
        self.sync_seconds.observe(seconds)
        self.syncs.labels(result).inc()
        if result == "ok":
            self.last_success.set(time.time())
            self.frontends.set(frontends)
        self.ready_gauge.set(1 if self.agent.synced else 0)

    def live(self) -> tuple[bool, str]:
        age = time.monotonic() - self.agent.heartbeat
        if age > self.stale_after:
            return False, f"the agent's loop has not turned for {age:.0f}s (bound {self.stale_after:.0f}s)"
        return True, f"the loop turned {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        if self.agent.uninstalled:
            return True, "uninstalled, as the configuration says"
        if not self.agent.synced:
            return False, "the first full sync is not done yet"
        return True, "synced"

    def serve(self, listen: str) -> MetricsServer:
        server = MetricsServer(listen, self.registry, name="agent", live=self.live, ready=self.ready)
        server.start()
        return server


# -- the operator ---------------------------------------------------------------------------------------


class OperatorMetrics:
    """The operator's registry: leadership, reconciliations, status rounds, node counts, reports removed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.leader = Gauge("bpflb_operator_leader", "1 while this replica holds the Lease and acts",
                            registry=self.registry)
        self.reconciles = Counter("bpflb_operator_reconciles", "Reconciliations of the cni-cilium ModuleConfig "
                                  "by result (ok, pending, invalid, error)", ["result"], registry=self.registry)
        self.rounds = Counter("bpflb_operator_status_rounds", "Turns of the status loop", registry=self.registry)
        self.last_round = Gauge("bpflb_operator_last_status_round_timestamp_seconds",
                                "Unix time the status loop last turned", registry=self.registry)
        self.nodes = Gauge("bpflb_operator_nodes", "Nodes of the cluster (total) and those running the current "
                           "configuration (current)", ["state"], registry=self.registry)
        self.condition = Gauge("bpflb_operator_condition", "The ModuleConfig's conditions (1: True)",
                               ["type"], registry=self.registry)
        self.reports_removed = Counter("bpflb_operator_node_reports_removed",
                                       "Node reports removed because their Node is gone", registry=self.registry)
        for result in ("ok", "pending", "invalid", "error"):
            self.reconciles.labels(result)

    def leading(self, on: bool) -> None:
        self.leader.set(1 if on else 0)

    def reconciled(self, result: str) -> None:
        self.reconciles.labels(result).inc()

    def status_round(self, acting: bool) -> None:
        self.rounds.inc()
        self.last_round.set(time.time())
        self.leader.set(1 if acting else 0)

    def module_status(self, status: Mapping[str, Any]) -> None:
        nodes = status.get("nodes") or {}
        self.nodes.labels("total").set(int(nodes.get("total") or 0))
        self.nodes.labels("current").set(int(nodes.get("current") or 0))
        for cond in status.get("conditions") or []:
            self.condition.labels(str(cond.get("type"))).set(1 if cond.get("status") == "True" else 0)

    def report_removed(self) -> None:
        self.reports_removed.inc()
