"""An emulated Kubernetes API for tests, benchmarks and the lab: kmock's KubernetesEmulator (a real HTTP server
keeping objects in memory) with the resources bpflb uses declared for discovery, and what a real API server
does that clients depend on: object metadata (uid, resourceVersion, creationTimestamp, generation,
generateName, status-subresource separation), lists in pages (limit/continue), watches that resume from a
resourceVersion (410 Gone once it was compacted away), bookmarks, the server-side watch timeout, and
optimistic concurrency (a patch naming a stale resourceVersion is a 409 Conflict). EmulatedAPI runs it on a
thread of its own, over http or https, and keeps every request's method, path and Authorization for tests
to look at; `python -m bpflb_lab.apiserver` runs it as the lab's control-plane process.

What kubectl needs of it is there too (bpflb_lab.apitables): discovery with short names, categories and the
subresources as kube-apiserver lists them, typed lists, server-side tables (kube-apiserver's columns for
built-in kinds, a stored CRD's printer columns for its resources), label and field selectors on lists and
watches, the end of a watch's initial events bookmarked, strategic merge and JSON patches, and the OpenAPI
kubectl apply's field validation and explain look up.

It is not a kube-apiserver: no admission webhooks, no garbage collection, no PUT, no server-side apply, no
authentication (credentials are recorded, not checked).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import copy
import datetime
import ipaddress
import json
import re
import signal
import ssl
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kmock._internal import aiobus
from kmock._internal import k8s as _kmock_k8s
from kmock._internal import parsing as _kmock_parsing
from kmock._internal.rendering import Response as _Response

from bpflb.kubeapi import write_kubeconfig
from bpflb_lab import apitables

T = TypeVar("T")

# (api group/version, plural) -> (kind, namespaced, subresources, short names); categories as kube-apiserver's
RESOURCES: dict[tuple[str, str], tuple[str, bool, frozenset[str], frozenset[str]]] = {
    ("v1", "namespaces"): ("Namespace", False, frozenset({"status"}), frozenset({"ns"})),
    ("v1", "nodes"): ("Node", False, frozenset({"status"}), frozenset({"no"})),
    ("v1", "services"): ("Service", True, frozenset({"status"}), frozenset({"svc"})),
    ("v1", "pods"): ("Pod", True, frozenset({"status"}), frozenset({"po"})),
    ("v1", "configmaps"): ("ConfigMap", True, frozenset(), frozenset({"cm"})),
    ("v1", "events"): ("Event", True, frozenset(), frozenset({"ev"})),
    ("discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", True, frozenset(), frozenset()),
    ("apps/v1", "daemonsets"): ("DaemonSet", True, frozenset({"status"}), frozenset({"ds"})),
    ("coordination.k8s.io/v1", "leases"): ("Lease", True, frozenset(), frozenset()),
    ("deckhouse.io/v1alpha1", "moduleconfigs"): ("ModuleConfig", False, frozenset({"status"}), frozenset({"mc"})),
    ("apiextensions.k8s.io/v1", "customresourcedefinitions"):
        ("CustomResourceDefinition", False, frozenset({"status"}), frozenset({"crd", "crds"})),
    ("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations"):
        ("ValidatingWebhookConfiguration", False, frozenset(), frozenset()),
}
CATEGORIES = {"services": ["all"], "pods": ["all"], "daemonsets": ["all"]}
NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
VERBS = frozenset({"get", "list", "watch", "create", "patch", "delete"})


_parse_path = _kmock_parsing.parse_path


def _parse_path_with_namespaces(path: str) -> Any:
    """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix and fails; read it as the
    cluster-scoped resource `namespaces` (kopf lists it to follow namespace patterns)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"] and len(parts) >= 3 and parts[2] == "namespaces" and \
            (len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) > 3 else None,
                                         parts[4] if len(parts) > 4 else None)
    return _parse_path(path)


_kmock_parsing.parse_path = _parse_path_with_namespaces


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


HISTORY_MAX = 200_000          # watch events kept for resuming watches; older ones are compacted away


def _object_key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _revision(obj: Any) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _gone(message: str) -> Any:
    return _kmock_k8s.KubernetesError(status=410, reason="Expired", message=message, details={})


@attrs.mutable(weakref_slot=True)
class _RecordingBus(aiobus.Bus[Any]):
    """A resource's event bus that hands each event to the emulator's history first (which gives a
    deletion its own resourceVersion, as etcd does)."""

    record: Any = None

    async def put(self, *items: Any) -> None:
        await super().put(*(self.record(item) if self.record is not None else item for item in items))


class _Buses(dict[Any, Any]):
    def __init__(self, emulator: ClusterEmulator) -> None:
        super().__init__()
        self.emulator = emulator

    def __missing__(self, resource: Any) -> _RecordingBus:
        bus = _RecordingBus(record=lambda event: self.emulator._record(resource, event))
        self[resource] = bus
        return bus


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the metadata bookkeeping, paging, resumable watches and optimistic concurrency
    of a real API server."""

    _revision_now: int = attrs.field(default=0, init=False)
    _history: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _compacted: int = attrs.field(default=0, init=False)   # resuming from below this revision: 410 Gone
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _buses: Any = attrs.field(default=attrs.Factory(lambda self: _Buses(self), takes_self=True), init=False)
    bookmark_interval: float = 10.0      # seconds between BOOKMARK events on a quiet watch that asked for them

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for (api_version, plural), (kind, namespaced, subresources, short) in RESOURCES.items():
            self.resources[f"{api_version}/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=set(VERBS), subresources=set(subresources),
                shortnames=set(short), singular=kind.lower())
        self.fallback["get", re.compile(r"^/openapi/v3/.+")] << self._serve_openapi
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.preload("v1", "namespaces", ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                                           "status": {"phase": "Active"}} for name in NAMESPACES))

    def next_revision(self) -> str:
        self._revision_now += 1
        return str(self._revision_now)

    # -- the event history (resumable watches) --------------------------------------------------------

    def _record(self, resource: Any, event: Any) -> Any:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            return event
        if event.get("type") == "DELETED":
            obj = event["object"]
            event = {"type": "DELETED", "object": {**obj, "metadata": {**(obj.get("metadata") or {}),
                                                                        "resourceVersion": self.next_revision()}}}
        self._history.append((_revision(event["object"]), resource, copy.deepcopy(event)))
        if len(self._history) > HISTORY_MAX:
            self.compact(keep=HISTORY_MAX // 2)
        return event

    def compact(self, keep: int = 0) -> None:
        """Forget the history but its last `keep` events, as etcd's compaction does: a watch from an older
        resourceVersion, or a list continued from one, then gets 410 Gone."""
        dropped = self._history[:len(self._history) - keep]
        self._history = self._history[len(dropped):]
        # Resuming from the newest forgotten event still misses nothing; from before it would.
        self._compacted = dropped[-1][0] if dropped and keep else self._revision_now

    # -- requests ---------------------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE,
                                                              kmock.action.DELETE):
            return await super()._handle(request)
        # One write at a time: the resourceVersion precondition and the write it guards are one step.
        async with self._write_lock:
            if request.data is not None:
                try:
                    self._as_merge_patch(request)
                    self._stamp(request)
                except _kmock_k8s.KubernetesError as exc:
                    return await self._render_error(exc)
            return await super()._handle(request)

    async def _list_page(self, request: kmock.Request) -> Any:
        """The objects its selectors select, in a stable order, a page of them when limit is given (continue:
        the next page)."""
        answer: Any = await super()._serve_list(request)
        selected = self._selected(request)
        items = sorted((i for i in answer.get("items") or [] if selected(i)), key=_object_key)
        version = self._revision_now
        params = request.params or {}
        token = params.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token))
                version, after = int(state["rv"]), tuple(state["after"])
            except (ValueError, KeyError, TypeError):
                raise _kmock_k8s.KubernetesError(status=400, reason="BadRequest",
                                                 message=f"invalid continue token {token!r}") from None
            if version < self._compacted:
                raise _gone(f"The provided continue parameter is too old to display a consistent list result "
                            f"(resourceVersion {version} was compacted)")
            items = [i for i in items if _object_key(i) > after]
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        limit = int(params.get("limit") or 0)
        if limit and len(items) > limit:
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"rv": version, "after": list(_object_key(items[-1]))}).encode()).decode()
        return {"kind": "List", "apiVersion": "v1", "metadata": meta, "items": items}

    def _matches(self, request: kmock.Request, resource: Any, obj: Any) -> bool:
        namespace, name = _object_key(obj)
        return bool(resource == request.resource and (request.namespace is None or namespace == request.namespace)
                    and (request.name is None or name == request.name))

    async def _watch_stream(self, request: kmock.Request) -> Any:
        """From resourceVersion on (the history since), else every object as ADDED first (then, with
        sendInitialEvents, the bookmark that ends them); then live events, BOOKMARKs when asked for, until
        timeoutSeconds."""
        yield b""
        params = request.params or {}
        since = params.get("resourceVersion") or ""
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params.get("timeoutSeconds") or 0)
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        assert request.resource is not None
        bus = self._buses[request.resource]
        marker = await bus.mark()         # live events from here on; replayed ones are skipped below
        try:
            if since and since != "0":
                if not since.isdigit() or int(since) < self._compacted:
                    yield {"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": "Expired", "code": 410,
                        "message": f"too old resource version: {since} ({self._compacted})"}}
                    return
                replay = [copy.deepcopy(e) for rv, res, e in self._history
                          if rv > int(since) and self._matches(request, res, e["object"])]
            else:
                replay = [{"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                          for (res, _ns, _name), obj in list(self.objects.items())
                          if not obj.deleted and self._matches(request, res, obj.raw)]
            seen = max([int(since) if since.isdigit() else 0] + [_revision(e["object"]) for e in replay])
            for event in replay:
                yield event
            if params.get("sendInitialEvents") == "true":     # a WatchList (client-go's reflector, kubectl wait)
                info = self.resources.get(request.resource)
                yield {"type": "BOOKMARK", "object": {
                    "kind": info.kind if isinstance(info, kmock.ResourceInfo) else "",
                    "metadata": {"resourceVersion": str(max(seen, self._revision_now)),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}}
            while True:
                now = asyncio.get_running_loop().time()
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    if now >= deadline:
                        return
                    wait = min(wait, deadline - now) if wait is not None else deadline - now
                try:
                    # get() with the marker: a timeout cancels this one wait, never the stream's position.
                    event = await asyncio.wait_for(bus.get(since=marker), wait)
                except TimeoutError:
                    if bookmarks:
                        info = self.resources.get(request.resource)
                        kind = info.kind if isinstance(info, kmock.ResourceInfo) else ""
                        # Not past a write in progress: its event may not be on the bus yet.
                        now_rv = seen if self._write_lock.locked() else max(seen, self._revision_now)
                        yield {"type": "BOOKMARK", "object": {"kind": kind, "metadata": {
                            "resourceVersion": str(now_rv)}}}
                    continue
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(obj, dict) or _revision(obj) <= seen and _revision(obj) != 0:
                    continue
                if self._matches(request, request.resource, obj):
                    seen = max(seen, _revision(obj))
                    yield event
        finally:
            with contextlib.suppress(Exception):
                await bus.unmark(marker)

    def _as_merge_patch(self, request: kmock.Request) -> None:
        """Strategic merge patches (kubectl apply on built-in kinds) and JSON patches (kubectl patch --type
        json) become the JSON merge patches the emulator stores."""
        kind = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if request.action != kmock.action.UPDATE or kind not in ("application/strategic-merge-patch+json",
                                                                 "application/json-patch+json"):
            return
        current = self._current(request) or {}
        if request.subresource == "status":
            current = {"status": current.get("status")}
        if kind == "application/json-patch+json" and isinstance(request.data, list):
            data = apitables.json_patch_to_merge(current, request.data)
        else:
            data = apitables.strategic_to_merge(current, request.data)
        object.__setattr__(request, "data", data)

    # -- what kubectl reads ---------------------------------------------------------------------------------

    async def _serve_api(self, request: kmock.Request) -> Any:
        host = request.url.host or "127.0.0.1"
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                "serverAddress": f"{host}:{request.url.port}"}]}

    async def _serve_version(self, request: kmock.Request) -> Any:
        """An APIResourceList as kube-apiserver gives it: group/version ("v1" for the core group), short names,
        categories and verbs on the resources, subresources listed bare."""
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        resources = []
        for (api_version, plural), (kind, namespaced, subresources, short) in RESOURCES.items():
            g, _, v = api_version.rpartition("/")
            if (g, v) != (group, version):
                continue
            resources.append({"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                              "verbs": sorted(VERBS), "shortNames": sorted(short),
                              "categories": CATEGORIES.get(plural, [])})
            resources += [{"name": f"{plural}/{sub}", "singularName": "", "namespaced": namespaced, "kind": kind,
                           "verbs": ["get", "patch"]} for sub in sorted(subresources)]
        if not resources:
            raise kmock.KubernetesResourceNotFoundError()
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    def _kind(self, request: kmock.Request) -> str:
        assert request.resource is not None
        info = self.resources.get(request.resource)
        kind = getattr(info, "kind", None)
        return str(kind or str(request.resource.plural).capitalize())

    def _api_version(self, request: kmock.Request) -> str:
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        return f"{group}/{version}" if group else str(version)

    def _printer(self, request: kmock.Request) -> apitables.Printer:
        assert request.resource is not None
        kind = self._kind(request)
        if kind in apitables.BUILTIN and request.resource.group in ("", "discovery.k8s.io", "apps",
                                                                   "coordination.k8s.io", "apiextensions.k8s.io",
                                                                   "admissionregistration.k8s.io"):
            return apitables.BUILTIN[kind]
        crds = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
        for (res, _ns, _name), obj in self.objects.items():
            if res != crds or obj.deleted:
                continue
            spec = obj.raw.get("spec") or {}
            if spec.get("group") == request.resource.group and \
                    (spec.get("names") or {}).get("plural") == request.resource.plural:
                printer = apitables.crd_printer(obj.raw, str(request.resource.version))
                if printer is not None:
                    return printer
        return apitables.DEFAULT

    def _selected(self, request: kmock.Request) -> Any:
        labels = apitables.label_matcher(request.params.get("labelSelector"))
        fields = apitables.field_matcher(request.params.get("fieldSelector"))
        return lambda obj: isinstance(obj, dict) and labels(obj) and fields(obj)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """A typed list (kind <Kind>List), or a Table when kubectl asks for one."""
        page: Any = await self._list_page(request)
        if apitables.is_table_request(request.headers.get("Accept")):
            table = apitables.table(page["items"], self._printer(request), page["metadata"]["resourceVersion"],
                                    request.params.get("includeObject"))
            table["metadata"] = page["metadata"]
            return table
        return {**page, "kind": f"{self._kind(request)}List", "apiVersion": self._api_version(request)}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj: Any = await super()._serve_fetch(request)
        if apitables.is_table_request(request.headers.get("Accept")):
            return apitables.table([obj], self._printer(request), str(self._revision_now), request.params.get("includeObject"))
        return obj

    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        """The watch stream, filtered by the selectors, as application/json (client-go refuses a stream it
        has no serializer for)."""
        return _Response(headers={"Content-Type": "application/json"}, payload=self._watch_events(request))

    async def _watch_events(self, request: kmock.Request) -> Any:
        """The watch stream with the selectors applied, and Table rows when kubectl asks for a table
        (`get -w`)."""
        selected = self._selected(request)
        printer = self._printer(request) if apitables.is_table_request(request.headers.get("Accept")) else None
        include = request.params.get("includeObject")
        async for event in self._watch_stream(request):
            if not isinstance(event, dict) or event.get("type") in ("BOOKMARK", "ERROR"):
                yield event
            elif selected(event.get("object")):
                yield event if printer is None else {**event, "object": apitables.table(
                    [event["object"]], printer, str(self._revision_now), include)}

    # -- OpenAPI v3: what kubectl apply's field validation and kubectl explain look up ------------------------

    def _group_versions(self) -> dict[str, list[tuple[str, str, bool]]]:
        """"api/v1", "apis/GROUP/VERSION" -> (plural, kind, namespaced) of every resource served."""
        out: dict[str, list[tuple[str, str, bool]]] = {}
        for (api_version, plural), (kind, namespaced, _sub, _short) in RESOURCES.items():
            key = f"apis/{api_version}" if "/" in api_version else f"api/{api_version}"
            out.setdefault(key, []).append((plural, kind, namespaced))
        return out

    async def _serve_openapi_root(self, request: kmock.Request) -> Any:
        return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._revision_now}"}
                          for gv in self._group_versions()}}

    async def _serve_openapi(self, request: kmock.Request) -> Any:
        """One group/version's document: a PATCH operation per resource that takes fieldValidation (so kubectl
        lets the server validate instead of downloading schemas), and the schemas stored CRDs declare."""
        gv = request.url.path.removeprefix("/openapi/v3/").strip("/")
        resources = self._group_versions().get(gv)
        if resources is None:
            raise kmock.KubernetesNotFoundError()
        group, _, version = gv.removeprefix("apis/").removeprefix("api/").rpartition("/")
        paths: dict[str, Any] = {}
        for plural, kind, namespaced in resources:
            where = f"/{gv}/namespaces/{{namespace}}/{plural}/{{name}}" if namespaced else f"/{gv}/{plural}/{{name}}"
            paths[where] = {"patch": {
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]}}
        schemas: dict[str, Any] = {}
        crds = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
        for (res, _ns, _name), obj in self.objects.items():
            spec = obj.raw.get("spec") or {} if res == crds and not obj.deleted else {}
            if spec.get("group") != group:
                continue
            kind = str((spec.get("names") or {}).get("kind"))
            for v in spec.get("versions") or []:
                schema = (v.get("schema") or {}).get("openAPIV3Schema")
                if v.get("name") == version and schema:
                    name = ".".join(reversed(str(group).split("."))) + f".{version}.{kind}"
                    schemas[name] = {**schema, "x-kubernetes-group-version-kind": [
                        {"group": group, "version": version, "kind": kind}]}
        return {"openapi": "3.0.0", "info": {"title": "bpflb lab (emulated)", "version": "v0"}, "paths": paths,
                "components": {"schemas": schemas}}

    def _stamp(self, request: kmock.Request) -> None:
        """Fill in what the API server owns before the emulator stores the object."""
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
            meta["resourceVersion"] = self.next_revision()
        elif request.action == kmock.action.UPDATE and isinstance(data, dict):
            info = self.resources.get(request.resource) if request.resource is not None else None
            has_status = isinstance(info, kmock.ResourceInfo) and "status" in info.subresources
            if request.subresource == "status":
                for key in [k for k in data if k not in ("status", "metadata")]:
                    del data[key]
            elif has_status:
                data.pop("status", None)
            meta = data.setdefault("metadata", {})
            if not isinstance(meta, dict):
                return
            for owned in ("uid", "creationTimestamp", "generation"):
                meta.pop(owned, None)
            current = self._current(request)
            wanted = meta.get("resourceVersion")
            if wanted and current is not None and str(wanted) != str((current.get("metadata") or {})
                                                                     .get("resourceVersion")):
                raise _kmock_k8s.KubernetesError(
                    status=409, reason="Conflict", details={"name": request.name},
                    message=f"Operation cannot be fulfilled on {request.resource} {request.name!r}: the object has "
                            "been modified; please apply your changes to the latest version and try again")
            if current is not None and "spec" in data and request.subresource is None and \
                    data["spec"] != current.get("spec"):
                meta["generation"] = int((current.get("metadata") or {}).get("generation") or 1) + 1
            meta["resourceVersion"] = self.next_revision()
        elif request.action == kmock.action.UPDATE and isinstance(data, list):
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": self.next_revision()})

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        if request.resource is None or request.name is None:
            return None
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except (KeyError, ValueError, TypeError):
            return None
        if obj.deleted:
            return None
        raw: dict[str, Any] = obj.raw
        return raw

    def preload(self, api_version: str, plural: str, objects: Iterable[dict[str, Any]]) -> int:
        """Store objects directly (no HTTP round trip), with full metadata; for large benchmark setups.
        Call only while no client is connected, or from the server's own thread."""
        res = kmock.resource(f"{api_version}/{plural}")
        count = 0
        for obj in objects:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = self.next_revision()
            self.objects[res, meta.get("namespace"), meta["name"]] = obj
            self._history.append((int(meta["resourceVersion"]), res, {"type": "ADDED", "object": copy.deepcopy(obj)}))
            count += 1
        return count


@dataclass(frozen=True)
class TLSFiles:
    """A CA and a server certificate it signed (PEM files), for serving the emulated API over https."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


def make_tls(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A fresh CA and a server certificate for hosts (IP addresses or DNS names), written into directory."""
    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(tz=datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bpflb-lab-ca")).issuer_name(name("bpflb-lab-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("bpflb-lab-apiserver")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(pem_key(key))
    files.key.chmod(0o600)
    return files


def _tls_server(context: ssl.SSLContext) -> type[aiohttp.test_utils.RawTestServer]:
    class TLSServer(aiohttp.test_utils.RawTestServer):
        async def __aenter__(self) -> Self:
            await self.start_server(loop=self._loop, ssl=context)
            return self
    return TLSServer


@dataclass(frozen=True)
class Seen:
    """One request the emulated API answered (for tests: who wrote what, with which credentials)."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    user_agent: str | None


class EmulatedAPI:
    """A ClusterEmulator served over http (https with tls) from a background thread; stop() and start() again
    keep the objects (an API outage), close() ends everything."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: TLSFiles | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.emulator = ClusterEmulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulated-api", daemon=True)
        self._thread.start()
        self._server: kmock.Server | None = None
        self._entered = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> str:
        """Start serving (on the same port as before after a stop()); return the URL."""
        self.call(self._start())
        return self.url

    async def _start(self) -> None:
        if not self._entered:
            await self.emulator.__aenter__()
            self._entered = True
        if self.tls is not None:
            server = kmock.Server(self.emulator, host=self.host, port=self.port or None,
                                  server_cls=_tls_server(self.tls.server_context()))
        else:
            server = kmock.Server(self.emulator, host=self.host, port=self.port or None)
        await server.__aenter__()
        self.port = server.port
        self._server = server

    def stop(self) -> None:
        """Stop serving: open connections (watches included) are closed; the objects stay."""
        if self._server is not None:
            self.call(self._stop())

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        raw = server.server
        # Stop accepting first, then cut the live connections (watch streams included): a graceful shutdown
        # would wait for them. In the other order a client reconnecting in between (a watcher's retry)
        # gets a fresh stream that the shutdown then waits for, up to aiohttp's 60 s.
        with contextlib.suppress(Exception):
            runner = raw.runner
            if runner is not None:
                for site in list(runner.sites):
                    await site.stop()
                await asyncio.sleep(0)          # connections accepted just before: let them register
                if runner.server is not None:
                    for proto in list(runner.server.connections):
                        proto.force_close()
        await server.__aexit__(None, None, None)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        if self._entered:
            with contextlib.suppress(Exception):
                self.call(self.emulator.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()          # its selector and self-pipe: file descriptors, not to leak per test

    # -- object access from other threads ------------------------------------------------------------

    def objects(self, api_version: str, plural: str) -> list[dict[str, Any]]:
        """Current (not deleted) objects of a resource, deep-copied."""
        async def read() -> list[dict[str, Any]]:
            res = kmock.resource(f"{api_version}/{plural}")
            return [copy.deepcopy(obj.raw) for (r, _ns, _n), obj in self.emulator.objects.items()
                    if r == res and not obj.deleted]
        return self.call(read())

    def requests(self) -> list[Seen]:
        """Every request answered so far, in order."""
        async def read() -> list[Seen]:
            return [Seen(str(r.method.value if hasattr(r.method, "value") else r.method).upper(), r.url.path,
                         dict(r.params), r.headers.get("Authorization"), r.headers.get("User-Agent"))
                    for r in self.emulator._requests]
        return self.call(read())

    def compact(self) -> None:
        """Compact the history away: every watch resumed from before now gets 410 Gone."""
        async def run() -> None:
            self.emulator.compact()
        self.call(run())

    def preload(self, api_version: str, plural: str, objects: Iterable[dict[str, Any]]) -> int:
        async def load() -> int:
            return self.emulator.preload(api_version, plural, objects)
        return self.call(load(), timeout=600)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Serve the emulated API until SIGTERM/SIGINT (the lab's control-plane host runs this)."""
    parser = argparse.ArgumentParser(prog="python -m bpflb_lab.apiserver",
                                     description="an emulated Kubernetes API (kmock) for the bpflb lab")
    parser.add_argument("--listen", default="127.0.0.1:6443", metavar="ADDR:PORT")
    parser.add_argument("--kubeconfig-out", metavar="PATH", help="write a kubeconfig for this API there")
    parser.add_argument("--ready-file", metavar="PATH", help="created once the API answers")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    api = EmulatedAPI(host or "127.0.0.1", int(port))
    api.start()
    if args.kubeconfig_out:
        write_kubeconfig(Path(args.kubeconfig_out), api.url)
    print(f"emulated Kubernetes API (kmock) serving at {api.url}", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(api.url + "\n")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    with contextlib.suppress(concurrent.futures.TimeoutError):
        api.close()
    print("emulated Kubernetes API stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
