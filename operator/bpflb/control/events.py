"""Warning Events on the Services an agent refuses (they do not fit its datapath's maps, or the kernel refused
their entries): `kubectl describe service` then says why the Service is not served, from every node that
refused it. Written from a thread of its own, once per Service and reason, so a slow API never holds up the
datapath; the one API call is write_event(), the place to port to another client."""

from __future__ import annotations

import datetime
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Mapping

from bpflb.kubeapi import ApiError, KubeClient, KubeObject, resource_path
from bpflb.model.types import Problem

log = logging.getLogger("bpflb.events")

COMPONENT = "bpflb-agent"
REASON = "ServiceRefused"


def write_event(client: KubeClient, event: KubeObject) -> None:
    """Create one core/v1 Event (the only API call of this module)."""
    client.create(resource_path("v1", "events", event["metadata"]["namespace"]), event)


def refusal_event(service: str, problem: Problem, node: str, uid: str | None, now: datetime.datetime) -> KubeObject:
    """The Warning Event that says a node refused a Service, and why."""
    namespace, name = service.split("/", 1)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: KubeObject = {"apiVersion": "v1", "kind": "Service", "namespace": namespace, "name": name}
    if uid:
        involved["uid"] = uid
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": involved,
        "type": "Warning", "reason": REASON,
        "message": f"node {node}: {problem.field}: {problem.reason}"[:1024],
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT, "reportingInstance": node,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


class ServiceEvents:
    """Posts an Event for every Service newly refused by this node (and again when the reason changes)."""

    def __init__(self, client: KubeClient, node: str, uid_of: Callable[[str], str | None] = lambda key: None,
                 write: Callable[[KubeClient, KubeObject], None] = write_event) -> None:
        self.client = client
        self.node = node
        self.uid_of = uid_of
        self.write = write
        self.posted: dict[str, Problem] = {}          # what this agent said of each refused Service
        self._queue: queue.Queue[KubeObject | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="service-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def update(self, refused: Mapping[str, Problem]) -> None:
        """The Services refused after a sync: an Event for each one not told yet (or told another reason)."""
        for service in [s for s in self.posted if s not in refused]:
            del self.posted[service]         # admitted again: a later refusal is news
        now = datetime.datetime.now(tz=datetime.UTC)
        for service, problem in refused.items():
            if self.posted.get(service) == problem:
                continue
            self.posted[service] = problem
            self._queue.put(refusal_event(service, problem, self.node, self.uid_of(service), now))

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self.write(self.client, event)
            except ApiError as exc:
                log.warning("cannot post the Event about %s/%s: %s", event["metadata"]["namespace"],
                            event["involvedObject"]["name"], exc)
