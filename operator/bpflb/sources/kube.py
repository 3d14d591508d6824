"""A Source reading the Kubernetes API: list+watch of Services, EndpointSlices, Nodes and the agent
ConfigMap, one thread per resource, behind the same interface as the file source.

Failure handling is the point of this module:
- the first snapshot() waits until every resource has been listed once, so the agent never programs a
  datapath from a partial view;
- lists come in pages (limit/continue); a watch resumes from the last resourceVersion it saw (bookmarks
  keep that current on a quiet resource), so a watch the server ended, or one that broke, picks up where
  it was without listing again; only 410 Gone (that version was compacted away) lists again;
- when the API goes away the objects last seen are kept (the datapath stays as programmed) and each
  watcher retries with exponential backoff and jitter (agents on every node must not come back in step);
  a re-list replaces its resource's objects whole (a resync: the agent then writes only what differs);
- a failed request is never an empty list: objects are only ever replaced by a list that succeeded;
- the first list of Services starts once the EndpointSlices are in, and partial_snapshot() hands over the
  Services listed so far with every other resource complete, so the agent translates and programs them as
  the pages come (what a Service needs is all there) and only the last pages are left at list-complete.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bpflb.kubeapi import ApiError, KubeClient, KubeObject, backoff_delays
from bpflb.sources.base import (
    AGENT_CONFIG_NAME,
    AGENT_CONFIG_NAMESPACE,
    Changes,
    Snapshot,
    new_origin,
    object_key,
)

log = logging.getLogger("bpflb.sources.kube")

BACKOFF_FIRST = 0.2          # seconds before the first retry after an error
BACKOFF_MAX = 10.0           # seconds between retries at most
WATCH_TIMEOUT = 300          # the server ends each watch after this many seconds; the watcher re-watches


def _node_view(obj: KubeObject) -> KubeObject:
    """What the agent uses of a Node (name, labels, pod CIDRs, addresses): heartbeats do not change it."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {},
                     "resourceVersion": meta.get("resourceVersion")},
        "spec": {k: spec[k] for k in ("podCIDR", "podCIDRs") if k in spec},
        "status": {"addresses": status.get("addresses") or []},
    }


# What the translation reads of a Service's metadata and status; the rest (managedFields, conditions) is never
# kept: the agent holds 10,000 Services between syncs.
_SERVICE_METADATA = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels", "annotations")


# Values most Services repeat, held once each rather than once per Service (JSON decoding shares only keys).
_SPEC_WORDS = ("type", "externalTrafficPolicy", "internalTrafficPolicy", "sessionAffinity", "ipFamilyPolicy")
_PORT_WORDS = ("name", "protocol")


def _intern_words(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        value = obj.get(k)
        if type(value) is str:
            obj[k] = sys.intern(value)


# What stands for a Service's selector: the translation asks only whether there is one (a selector-less Service
# without EndpointSlices is skipped), so its labels are not kept. Shared, never changed.
SELECTOR_KEPT: dict[str, str] = {"(bpflb)": "a selector; its labels are not kept"}
_IPV4_FAMILIES = ["IPv4"]          # spec.ipFamilies of nearly every Service, held once (never changed)


def service_view(obj: KubeObject) -> KubeObject:
    """What the agent keeps of a Service: its spec, status.loadBalancer and the identity part of its metadata,
    the words most Services repeat (namespace, type, port names and protocols, policies) held once each, and
    only whether it has a selector (SELECTOR_KEPT). A field of the wrong type is kept as it came (the
    translation reports it)."""
    out: KubeObject = {"spec": obj["spec"]} if "spec" in obj else {}
    spec = out.get("spec")
    if type(spec) is dict:
        _intern_words(spec, _SPEC_WORDS)
        ports = spec.get("ports")
        for port in ports if type(ports) is list else ():
            if type(port) is dict:
                _intern_words(port, _PORT_WORDS)
        selector = spec.get("selector")
        if type(selector) is dict and selector:
            spec["selector"] = SELECTOR_KEPT
        if spec.get("ipFamilies") == _IPV4_FAMILIES:
            spec["ipFamilies"] = _IPV4_FAMILIES
        cluster_ip, cluster_ips = spec.get("clusterIP"), spec.get("clusterIPs")
        if type(cluster_ips) is list and cluster_ips and cluster_ips[0] == cluster_ip:
            cluster_ips[0] = cluster_ip         # one string for both fields
    meta = obj.get("metadata")
    if meta is not None:
        out["metadata"] = {k: meta[k] for k in _SERVICE_METADATA if k in meta} if type(meta) is dict else meta
        if type(meta) is dict:
            _intern_words(out["metadata"], ("namespace",))
    status = obj.get("status")
    if status is not None:
        out["status"] = ({"loadBalancer": status["loadBalancer"]} if "loadBalancer" in status else {}) \
            if type(status) is dict else status
    return out


@dataclass
class _Resource:
    """One watched resource: where it is, which objects count, and what was last seen."""

    name: str                                    # for messages: "Services"
    path: str
    params: dict[str, str] = field(default_factory=dict)
    keep: Callable[[KubeObject], bool] = lambda obj: True
    view: Callable[[KubeObject], Any] = lambda obj: obj     # what is kept of each object (the raw dict is not)
    objects: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)   # each object's resourceVersion
    listed: bool = False                         # one list succeeded since start
    partial: dict[str, Any] = field(default_factory=dict)   # the first list's records so far
    # The keys whose object a watch event changed since the last snapshot(); None: not known (never handed
    # over yet, or a list replaced the objects since).
    changed: set[str] | None = None
    version: str | None = None                   # where the watch resumes; None: list first
    connected: bool = False
    error: str | None = None
    outage_since: float | None = None


def _key(obj: KubeObject) -> str:
    """An object's namespace/name (sources.base.object_key), as the source indexes it."""
    meta = obj.get("metadata") or {}
    return object_key(str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _own_key(key: str, record: Any) -> str:
    """key, or the same string a record holds already (a ServiceRecord's, a SliceEntry's: one string each)."""
    held = getattr(record, "key", None)
    return held if held == key and type(held) is str else key


def _version(obj: KubeObject) -> str | None:
    meta = obj.get("metadata")
    version = meta.get("resourceVersion") if type(meta) is dict else None
    return version if isinstance(version, str) and version else None


class KubeSource:
    """Services, EndpointSlices, Nodes and the agent ConfigMap from the API, kept current by watches.

    Each object is reduced as it arrives (a list page, a watch event) to what the agent uses of it, and the
    decoded dict is dropped: Services to service_view, then to what service_record makes of that (the agent
    passes the model's, a record holding the view packed; by default the view itself), EndpointSlices to what
    slice_view makes of them (the agent passes the model's reader, whose records the translation takes as
    they are; by default the dict).
    An object whose resourceVersion did not change keeps the record made before (the same object), so a
    re-list of unchanged objects costs the translation nothing."""

    def __init__(self, client: KubeClient, node_name: str, *, namespace: str = AGENT_CONFIG_NAMESPACE,
                 backoff_first: float = BACKOFF_FIRST, backoff_max: float = BACKOFF_MAX,
                 watch_timeout: int = WATCH_TIMEOUT,
                 slice_view: Callable[[KubeObject], Any] | None = None,
                 service_record: Callable[[KubeObject], Any] | None = None, paced: bool = False) -> None:
        self.client = client
        self.node_name = node_name
        self.namespace = namespace
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.watch_timeout = watch_timeout
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._listed = threading.Condition(self._lock)    # notified when a resource's first list is in
        self._progress = threading.Condition(self._lock)  # notified as the first list's pages come in
        self._partial_seen = 0                            # Services the last partial_snapshot() held
        # The first list of Services waits for a consumer of partial snapshots (the agent, once its datapath
        # is loaded) from the start when paced, else from its first partial_snapshot(); end_partial() ends it.
        self._pacing = paced
        self.synced_at: float | None = None               # monotonic time every resource was first listed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_config: dict[str, str] | None = None   # the agent ConfigMap data of the last snapshot
        self.relists = 0                # lists after the first one (410 Gone, or an outage's resync)
        self._origin = new_origin()     # snapshot() numbers its snapshots and says what each changed (Changes)
        self._seq = 0
        self.resources = [
            _Resource("Services", "/api/v1/services",
                      view=service_view if service_record is None else lambda obj: service_record(service_view(obj))),
            _Resource("EndpointSlices", "/apis/discovery.k8s.io/v1/endpointslices",
                      view=slice_view if slice_view is not None else lambda obj: obj),
            _Resource("Nodes", "/api/v1/nodes", view=_node_view),
            _Resource(f"ConfigMap {namespace}/{AGENT_CONFIG_NAME}",
                      f"/api/v1/namespaces/{namespace}/configmaps",
                      params={"fieldSelector": f"metadata.name={AGENT_CONFIG_NAME}"},
                      keep=lambda obj: (obj.get("metadata") or {}).get("name") == AGENT_CONFIG_NAME),
        ]
        self._services, self._slices, self._nodes, self._config = self.resources

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start one watcher thread per resource (snapshot() starts them when needed)."""
        if self._threads:
            return
        for res in self.resources:
            thread = threading.Thread(target=self._run, args=(res,), name=f"watch-{res.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the watchers (they end at their next event or error; they are daemon threads)."""
        self._stop.set()
        self._changed.set()
        with self._lock:
            self._listed.notify_all()
            self._progress.notify_all()

    @property
    def synced(self) -> bool:
        """Every resource has been listed at least once."""
        with self._lock:
            return all(res.listed for res in self.resources)

    @property
    def connected(self) -> bool:
        with self._lock:
            return all(res.connected for res in self.resources)

    def errors(self) -> list[str]:
        """The current error of each resource that has one."""
        with self._lock:
            return [f"{res.name}: {res.error}" for res in self.resources if res.error]

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until every resource was listed once (True), the timeout passed or close() was called."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        last_note = time.monotonic()
        with self._lock:
            # Woken by each first list (and by close()), not by every change: a busy wait here took the
            # GIL from the threads decoding the lists.
            while not all(res.listed for res in self.resources):
                now = time.monotonic()
                if self._stop.is_set() or (deadline is not None and now > deadline):
                    return False
                if now - last_note > 10:
                    errors = "; ".join(f"{res.name}: {res.error}" for res in self.resources if res.error)
                    log.warning("still waiting for the first list of every resource from %s: %s",
                                self.client.server, errors or "no answer yet")
                    last_note = now
                self._listed.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - now)))
        return True

    def partial_snapshot(self, timeout: float) -> Snapshot | None:
        """Before the first sync: the Services listed so far (at least one more than the last call's), with
        the EndpointSlices, Nodes and the agent ConfigMap complete, so each Service in it is whole. None after
        timeout, once every resource is listed (then snapshot() is the one to call) or when closed."""
        self.start()
        deadline = time.monotonic() + timeout
        services, slices = self._services, self._slices
        with self._lock:
            self._pacing = True
            while True:
                if self._stop.is_set() or services.listed:
                    return None
                ready = all(res.listed for res in self.resources if res is not services)
                if ready and len(services.partial) > self._partial_seen:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._progress.wait(left)
            records = list(services.partial.values())
            self._partial_seen = len(records)
            self._progress.notify_all()             # the list may go on
            snap = Snapshot(services=records, endpointslices=list(slices.objects.values()),
                            nodes=list(self._nodes.objects.values()), config_namespace=self.namespace,
                            partial=True)
        self._config_into(snap)
        return snap

    def end_partial(self) -> None:
        """The consumer of partial snapshots is done (or failed): the first list goes on at its own pace."""
        with self._lock:
            self._pacing = False
            self._progress.notify_all()

    # -- the Source interface ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The objects as last seen; the first call waits until every resource has been listed once.
        Raises RuntimeError when closed before that (a view whose deletions could be wrong is never handed
        over: partial_snapshot() says what it is)."""
        if not self.wait_synced():
            raise RuntimeError("the Kubernetes source was closed before every resource was listed; "
                               "nothing to program")
        self._changed.clear()
        with self._lock:
            services, slices = self._services, self._slices
            changes = None
            if services.changed is not None and slices.changed is not None:
                changes = Changes(self._origin, self._seq, self._seq + 1,
                                  {k: services.objects.get(k) for k in services.changed},
                                  {k: slices.objects.get(k) for k in slices.changed})
            self._seq += 1
            services.changed, slices.changed = set(), set()
            snap = Snapshot(services=list(services.objects.values()), endpointslices=list(slices.objects.values()),
                            nodes=list(self._nodes.objects.values()), config_namespace=self.namespace,
                            changes=changes)
        self._config_into(snap)
        self.last_config = snap.config
        return snap

    def _config_into(self, snap: Snapshot) -> None:
        """The agent ConfigMap's data as the snapshot's config (a problem when it is not a mapping)."""
        with self._lock:
            config = next(iter(self._config.objects.values()), None)
        if config is not None:
            data = config.get("data")
            if isinstance(data, dict):
                snap.config = {str(k): v if isinstance(v, str) else str(v) for k, v in data.items()}
            elif data is None:
                snap.config = {}
            else:
                snap.problems.append(f"ConfigMap {self.namespace}/{AGENT_CONFIG_NAME}: data must be a "
                                     f"mapping of strings; got a {type(data).__name__}")
                snap.config = {}

    def wait_for_change(self, timeout: float) -> bool:
        """True as soon as a watched object changed since the last snapshot (False after timeout)."""
        self.start()
        return self._changed.wait(max(timeout, 0.0)) and not self._stop.is_set()

    # -- watchers ---------------------------------------------------------------------------------------

    def _run(self, res: _Resource) -> None:
        delays = backoff_delays(self.backoff_first, self.backoff_max)
        if res is self._services:
            self._after_first_list(self._slices)
        while not self._stop.is_set():
            try:
                if res.version is None:             # list (again) before watching
                    if res.listed:
                        self.relists += 1
                    res.version = self._list(res) or ""
                    self._reachable(res, f"listed {len(res.objects)} objects")
                self._watch(res)                    # until the server ends the stream; raises when it breaks
                delays = backoff_delays(self.backoff_first, self.backoff_max)
            except ApiError as exc:
                if exc.status == 410:               # the version to resume from was compacted away
                    log.info("%s: resourceVersion %s expired (410 Gone); listing again", res.name, res.version)
                    res.version = None
                    continue
                self._unreachable(res, exc)
                self._stop.wait(next(delays))
            except Exception:       # a bug must not silently kill the watcher: log it, list again
                log.exception("%s: watcher failed; listing again in %.1fs", res.name, self.backoff_max)
                res.version = None
                self._stop.wait(self.backoff_max)

    def _after_first_list(self, first: _Resource) -> None:
        """Wait for first's first list (or close()): a Service listed before its EndpointSlices could only
        be programmed without endpoints, so the Services' pages come once every slice is known."""
        with self._lock:
            while not first.listed and not self._stop.is_set():
                self._listed.wait(1.0)

    def _reachable(self, res: _Resource, what: str) -> None:
        with self._lock:
            res.connected, res.error = True, None
            since, res.outage_since = res.outage_since, None
        if since is not None:
            log.info("%s: API reachable again after %.1fs; %s", res.name, time.monotonic() - since, what)

    def _unreachable(self, res: _Resource, exc: ApiError) -> None:
        with self._lock:
            res.connected, res.error = False, str(exc)
            first, res.outage_since = res.outage_since is None, res.outage_since or time.monotonic()
        if first:
            log.warning("%s: %s; keeping the %d objects last seen (the datapath stays as programmed) and "
                        "retrying with backoff", res.name, exc, len(res.objects))
        else:
            log.debug("%s: still failing: %s", res.name, exc)

    def _list(self, res: _Resource) -> str | None:
        objects, versions = res.objects, res.versions     # only this resource's thread writes them

        def reduce(obj: KubeObject) -> tuple[str, str | None, Any, bool] | None:
            """Each item as its page arrives: (key, resourceVersion, the record, whether it is new)."""
            if not res.keep(obj):
                return None
            key, version = _key(obj), _version(obj)
            old = objects.get(key)
            if old is not None and version is not None and versions.get(key) == version:
                return _own_key(key, old), version, old, False
            record = res.view(obj)
            key = _own_key(key, record)
            if first:
                with self._lock:
                    # Paced while the agent programs the pages as they come: the list runs at most a page
                    # ahead of it, so at list-complete about a page is left to do.
                    while self._pacing and not self._stop.is_set() and \
                            len(res.partial) - self._partial_seen >= self.client.page_size:
                        self._progress.wait(1.0)
                    res.partial[key] = record
                    self._progress.notify_all()
            return key, version, record, True

        first = not res.listed and res is self._services     # what partial_snapshot() hands over

        items, version = self.client.list(res.path, reduce=reduce, **res.params)
        fresh = {key: record for key, _, record, _ in items}
        with self._lock:
            changed = not res.listed or fresh.keys() != objects.keys() or any(new for *_, new in items)
            res.objects = fresh
            res.versions = {key: v for key, v, _, _ in items}
            if changed:
                res.changed = None          # the next snapshot says nothing of what changed: compare the lists
            res.listed = True
            res.partial = {}
            if self.synced_at is None and all(r.listed for r in self.resources):
                self.synced_at = time.monotonic()
            self._listed.notify_all()
            self._progress.notify_all()
        if changed:
            self._changed.set()
        return version

    def _watch(self, res: _Resource) -> None:
        """Follow one watch stream from res.version, keeping res.version at the last one seen (a bookmark's
        too), until the server ends it. ApiError when it breaks, 410 when that version expired."""
        for event in self.client.watch(res.path, res.version or None, timeout_seconds=self.watch_timeout,
                                       stop=self._stop, params=res.params,
                                       opened=lambda: self._reachable(res, f"resumed the watch from "
                                                                           f"resourceVersion {res.version}")):
            kind = event.get("type")
            obj = event.get("object")
            if not isinstance(obj, dict):
                continue
            if kind == "ERROR":
                code = int(obj.get("code") or 0)
                raise ApiError(code, "WATCH", res.path, str(obj.get("message") or obj), str(obj.get("reason") or ""))
            res.version = (obj.get("metadata") or {}).get("resourceVersion") or res.version
            if kind == "BOOKMARK" or not res.keep(obj):
                continue
            self._apply(res, kind, obj)

    def _apply(self, res: _Resource, kind: Any, obj: KubeObject) -> None:
        key, version = _key(obj), _version(obj)
        old = res.objects.get(key)
        if kind in ("ADDED", "MODIFIED") and old is not None and version is not None and \
                res.versions.get(key) == version:
            return                                  # a replay of what was seen (the same resourceVersion)
        view = res.view(obj) if kind in ("ADDED", "MODIFIED") else None
        with self._lock:
            if kind == "DELETED":
                changed = res.objects.pop(key, None) is not None
                res.versions.pop(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                changed = old is None or view != old
                if changed and old is not None and view is not None and res.view is _node_view:
                    changed = {**view, "metadata": {**view["metadata"], "resourceVersion": None}} != \
                        {**old, "metadata": {**old["metadata"], "resourceVersion": None}}
                res.objects[key] = view if changed else old
                res.versions[key] = version
            else:
                changed = False
            if changed and res.changed is not None:
                res.changed.add(key)
        if changed:
            self._changed.set()
