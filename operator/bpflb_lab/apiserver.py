"""An emulated Kubernetes API for tests, benchmarks and the lab: kmock's KubernetesEmulator (a real HTTP
server keeping objects in memory) with the resources bpflb uses declared for discovery, and the object
metadata a real API server maintains (uid, resourceVersion, creationTimestamp, generation, generateName,
status-subresource separation). EmulatedAPI runs it on a thread of its own; `python -m
bpflb_lab.apiserver` runs it as the lab's control-plane process.

It is not a kube-apiserver: no admission webhooks, no label or field selectors (clients filter), no
garbage collection, no PUT. A watch always starts by replaying every current object as ADDED.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import copy
import datetime
import itertools
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

from bpflb.kubeapi import write_kubeconfig

T = TypeVar("T")

# (api group/version, plural) -> (kind, namespaced, subresources, short names)
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
        ("CustomResourceDefinition", False, frozenset({"status"}), frozenset({"crd"})),
    ("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations"):
        ("ValidatingWebhookConfiguration", False, frozenset(), frozenset()),
}
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

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for (api_version, plural), (kind, namespaced, subresources, short) in RESOURCES.items():
            self.resources[f"{api_version}/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=set(VERBS), subresources=set(subresources),
                shortnames=set(short), singular=kind.lower())
        self.preload("v1", "namespaces", ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                                           "status": {"phase": "Active"}} for name in NAMESPACES))

    def next_revision(self) -> str:
        return str(next(self._revisions))

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.data is not None:
            self._stamp(request)
        return await super()._handle(request)

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
