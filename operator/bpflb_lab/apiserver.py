"""An emulated Kubernetes API for tests, benchmarks and the lab: kmock's KubernetesEmulator (a real HTTP
server keeping objects in memory) with the resources bpflb uses declared for discovery, and the object
metadata a real API server maintains (uid, resourceVersion, creationTimestamp, generation, generateName,
status-subresource separation). EmulatedAPI runs it on a thread of its own; `python -m
bpflb_lab.apiserver` runs it as the lab's control-plane process.

What kubectl needs of it is there too (bpflb_lab.apitables): discovery with short names, categories and the
subresources as kube-apiserver lists them, typed lists (kind, apiVersion, resourceVersion), server-side
tables (kube-apiserver's columns for built-in kinds, a stored CRD's printer columns for its resources),
label and field selectors on lists and watches, and strategic merge and JSON patches.

It is not a kube-apiserver: no admission webhooks, no garbage collection, no PUT, no server-side apply, no
OpenAPI beyond what kubectl apply and explain look up. A watch from a list's resourceVersion starts with the
objects changed since (as ADDED); from none, or with sendInitialEvents, with every current object.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import copy
import datetime
import itertools
import re
import signal
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, Self, TypeVar

import aiohttp.web
import attrs
import kmock
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


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the metadata bookkeeping of a real API server."""

    _revisions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _revision: str = attrs.field(default="0", init=False)

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
        self._revision = str(next(self._revisions))
        return self._revision

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.data is not None:
            self._as_merge_patch(request)
            self._stamp(request)
        return await super()._handle(request)

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
        listed: Any = await super()._serve_list(request)
        selected = self._selected(request)
        items: list[dict[str, Any]] = sorted(
            (obj for obj in listed["items"] if selected(obj)),      # in key order, as etcd lists them
            key=lambda o: ((o.get("metadata") or {}).get("namespace") or "", (o.get("metadata") or {}).get("name") or ""))
        if apitables.is_table_request(request.headers.get("Accept")):
            return apitables.table(items, self._printer(request), self._revision, request.params.get("includeObject"))
        return {"kind": f"{self._kind(request)}List", "apiVersion": self._api_version(request),
                "metadata": {"resourceVersion": self._revision}, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj: Any = await super()._serve_fetch(request)
        if apitables.is_table_request(request.headers.get("Accept")):
            return apitables.table([obj], self._printer(request), self._revision, request.params.get("includeObject"))
        return obj

    async def _serve_watch(self, request: kmock.Request) -> Any:  # type: ignore[override]
        """The watch stream, filtered by the selectors, as application/json (client-go refuses a stream it
        has no serializer for)."""
        return _Response(headers={"Content-Type": "application/json"}, payload=self._watch_events(request))

    async def _watch_events(self, request: kmock.Request) -> Any:
        """kmock's watch (every current object as ADDED, then the changes), with the selectors applied, the
        end of the initial events bookmarked when the client asks for them (a WatchList: client-go's reflector
        of kubectl 1.34+ waits for it), and Table rows when kubectl asks for a table (`get -w`)."""
        assert request.resource is not None
        selected = self._selected(request)
        as_table = apitables.is_table_request(request.headers.get("Accept"))
        printer = self._printer(request) if as_table else None
        include = request.params.get("includeObject")

        def shown(event: dict[str, Any]) -> dict[str, Any]:
            if printer is None or event.get("type") in ("BOOKMARK", "ERROR"):
                return event
            return {**event, "object": apitables.table([event["object"]], printer, self._revision, include)}

        yield b""
        async with self._lock:
            current = [obj.raw for obj in self._KubernetesEmulator__get_objs(request, strict=False)  # type: ignore[attr-defined]
                       if not obj.deleted]
        since = request.params.get("resourceVersion") or "0"
        if request.params.get("sendInitialEvents") == "true" or not since.isdigit():
            since = "0"
        for obj in current:
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "0")
            if selected(obj) and (not version.isdigit() or int(version) > int(since)):
                yield shown({"type": "ADDED", "object": obj})     # only what changed after the list it follows
        if request.params.get("sendInitialEvents") == "true":
            yield {"type": "BOOKMARK", "object": {
                "kind": self._kind(request), "apiVersion": self._api_version(request),
                "metadata": {"resourceVersion": self._revision,
                             "annotations": {"k8s.io/initial-events-end": "true"}}}}
        async for event in self._buses[request.resource]:
            meta = (event.get("object") or {}).get("metadata") or {}
            if self._KubernetesEmulator__check(request, request.resource, meta.get("namespace"),  # type: ignore[attr-defined]
                                               meta.get("name"), strict=False) and selected(event.get("object")):
                yield shown(event)

    # -- OpenAPI v3: what kubectl apply's field validation and kubectl explain look up ------------------------

    def _group_versions(self) -> dict[str, list[tuple[str, str, bool]]]:
        """"api/v1", "apis/GROUP/VERSION" -> (plural, kind, namespaced) of every resource served."""
        out: dict[str, list[tuple[str, str, bool]]] = {}
        for (api_version, plural), (kind, namespaced, _sub, _short) in RESOURCES.items():
            key = f"apis/{api_version}" if "/" in api_version else f"api/{api_version}"
            out.setdefault(key, []).append((plural, kind, namespaced))
        return out

    async def _serve_openapi_root(self, request: kmock.Request) -> Any:
        return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._revision}"}
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
            count += 1
        return count


class EmulatedAPI:
    """A ClusterEmulator served over HTTP from a background thread; stop() and start() again keep the
    objects (an API outage), close() ends everything."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.emulator = ClusterEmulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulated-api", daemon=True)
        self._thread.start()
        self._server: kmock.Server | None = None
        self._entered = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
