"""Per-node reports: each agent writes what its datapath runs into a small ConfigMap of its own,
<namespace>/bpflb-node-<node> (bpflb's namespace: kube-system, or the Helm release's), and the operator
aggregates them into the ModuleConfig status, and removes the reports of Nodes that are gone.

A ConfigMap per node (not Node annotations) keeps the agents' write access away from Node objects, keeps
the report readable (`kubectl -n <namespace> get cm -l app.kubernetes.io/component=node-report -o yaml`)
and lets the operator watch only its namespace. The agent writes it from a thread of its own, only when
something changed plus a heartbeat, so a slow or absent API never holds up the datapath.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from bpflb.kubeapi import ApiError, KubeClient, resource_path
from bpflb.model.cluster import parse_network_settings
from bpflb.model.settings import CONFIG_GENERATION_KEY
from bpflb.sources.base import AGENT_CONFIG_NAMESPACE

if TYPE_CHECKING:
    from bpflb.agent import Agent
    from bpflb.datapath.lbmaps import SyncReport
    from bpflb.sources.kube import KubeSource

log = logging.getLogger("bpflb.report")

REPORT_NAMESPACE = AGENT_CONFIG_NAMESPACE   # the default; reports live in bpflb's namespace
REPORT_PREFIX = "bpflb-node-"
LABELS = {"app.kubernetes.io/name": "bpflb", "app.kubernetes.io/component": "node-report"}
HEARTBEAT = 30.0             # seconds between two writes of an unchanged report
STALE_AFTER = 120.0          # the operator ignores reports older than this
IGNORED_SHOWN = 20           # fields not acted on listed in a report (all of them are in the agent's log)

REFUSED_KEY = "refused"      # the Services this node refused (do not fit its maps), comma-separated
REFUSED_LISTED = 50          # listed at most (the message says how many there are)

# The states an agent reports.
READY = "Ready"              # the datapath is programmed from the configuration named by configGeneration
WAITING = "Waiting"          # not programmed yet (API not listed yet, or the Node has no address)
UNINSTALLED = "Uninstalled"  # told to uninstall: programs detached, pinned maps removed
ERROR = "Error"              # the last sync failed; the datapath keeps its previous state


def report_name(node: str) -> str:
    return f"{REPORT_PREFIX}{node}"


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 timestamp written by now_rfc3339 (None when unreadable)."""
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return None


def orphaned(reports: Mapping[str, Mapping[str, str]], nodes: Collection[str], now: float,
             after: float = STALE_AFTER) -> list[str]:
    """The nodes whose report is garbage: no such Node any more, and no heartbeat for `after` seconds (an
    agent still writing keeps its report, and a Node list not seen yet deletes nothing fresh)."""
    out = []
    for node, report in reports.items():
        updated = parse_time(report.get("updated"))
        if node not in nodes and (updated is None or now - updated > after):
            out.append(node)
    return sorted(out)


class NodeReporter:
    """Keeps <namespace>/bpflb-node-<node> equal to the latest report, from a background thread."""

    def __init__(self, client: KubeClient, node: str, heartbeat: float = HEARTBEAT,
                 namespace: str = REPORT_NAMESPACE) -> None:
        self.client = client
        self.node = node
        self.namespace = namespace
        self.heartbeat = heartbeat
        self._wanted: dict[str, str] | None = None
        self._written: dict[str, str] | None = None
        self._written_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-report", daemon=True)
        self._failing = False

    @property
    def path(self) -> str:
        return resource_path("v1", "configmaps", self.namespace, report_name(self.node))

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after one last attempt to write the latest report."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def update(self, data: Mapping[str, str]) -> None:
        """Ask for this report to be written (only what differs from the last one is sent)."""
        self._wanted = {"node": self.node, **data}
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.5
        while True:
            self._wake.wait(self.heartbeat)
            self._wake.clear()
            stopping = self._stop.is_set()
            wanted = self._wanted
            due = time.monotonic() - self._written_at >= self.heartbeat
            if wanted is not None and (wanted != self._written or due):
                try:
                    self._write(wanted)
                    backoff = 0.5
                except ApiError as exc:
                    if not self._failing:
                        log.warning("cannot write the node report %s/%s: %s; retrying", self.namespace,
                                    report_name(self.node), exc)
                    self._failing = True
                    if not stopping:
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, 10.0)
                        self._wake.set()
            if stopping:
                return

    def _write(self, data: dict[str, str]) -> None:
        body = {"metadata": {"labels": LABELS}, "data": {**data, "updated": now_rfc3339()}}
        try:
            self.client.merge_patch(self.path, body)
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.client.create(resource_path("v1", "configmaps", self.namespace), {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": report_name(self.node), "namespace": self.namespace, "labels": LABELS},
                "data": body["data"]})
        if self._failing or self._written is None or data.get("state") != (self._written or {}).get("state"):
            log.info("node report %s/%s: %s", self.namespace, report_name(self.node),
                     ", ".join(f"{k}={v}" for k, v in data.items() if k != "node"))
        self._failing = False
        self._written = data
        self._written_at = time.monotonic()


def agent_report(agent: Agent, source: KubeSource, report: SyncReport | None) -> dict[str, str]:
    """What an agent reports after a sync attempt: state, the mode its datapath runs for new flows, the
    tunnel it runs, the configuration generation it applied, and counts."""
    config = source.last_config or {}
    generation = config.get(CONFIG_GENERATION_KEY, "")
    tunnel = parse_network_settings(config)[0].tunnel.label
    frontends = len(agent.state.frontends) if agent.state is not None else 0
    problems = len(agent.state.problems) if agent.state is not None else 0
    notes = [str(n) for n in agent.state.notes] if agent.state is not None else []
    if len(notes) > IGNORED_SHOWN:
        notes = notes[:IGNORED_SHOWN] + [f"... and {len(notes) - IGNORED_SHOWN} more in the agent's log"]
    if getattr(agent, "uninstalled", False):
        state, message = UNINSTALLED, "programs detached and pinned maps removed, as the configuration says"
    elif getattr(agent, "last_error", None):
        state, message = ERROR, f"last sync failed: {agent.last_error}; the datapath keeps its previous state"
    elif report is None or agent.mode is None:
        state, message = WAITING, "not programmed yet: " + ("; ".join(source.errors()) or
                                                              "waiting for this Node's address")
    else:
        state, message = READY, f"{frontends} frontends programmed"
    refused = dict(getattr(agent, "refused", {}) or {})
    if refused and state == READY:
        message += (f"; {len(refused)} Service{'s' if len(refused) != 1 else ''} refused, each alone (the rest is "
                    f"programmed): " + "; ".join(f"{svc}: {p.field}" for svc, p in sorted(refused.items())[:5])
                    + (f"; and {len(refused) - 5} more" if len(refused) > 5 else ""))
    if not source.connected:
        message += "; the API is unreachable: " + "; ".join(source.errors())
    return {
        "state": state,
        "bpfLBMode": agent.mode.label if agent.mode is not None and state != UNINSTALLED else "",
        "tunnelMode": tunnel if state != UNINSTALLED else "",
        CONFIG_GENERATION_KEY: generation,
        "frontends": str(frontends),
        "problems": str(problems),
        REFUSED_KEY: ",".join(sorted(refused)[:REFUSED_LISTED]),
        # Fields of Services this node does not act on, one per line (loadBalancerSourceRanges while
        # svcSourceRangeCheck is false, a loadBalancerClass, ...); empty when there are none.
        "notActedOn": "\n".join(notes),
        "message": message,
    }
