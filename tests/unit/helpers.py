"""Builders of the unit tier: raw Kubernetes objects (Nodes, Services, EndpointSlices), one translation, the
problem finder and the condition wait. The one home for them; test modules import from here, never from each
other."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

from bpflb.model.translate import translate
from bpflb.model.types import DesiredState, Frontend, L4Addr, Problem, Proto
from bpflb.sources.base import Snapshot

NODE = "node-a"
NODE_INTERNAL = "192.168.0.10"
NODE_EXTERNAL = "203.0.113.10"

Obj = dict[str, Any]


# -- builders ---------------------------------------------------------------------------------------------


def node(name: str = NODE, internal: str | None = NODE_INTERNAL, external: str | None = NODE_EXTERNAL,
         extra: list[Obj] | None = None) -> Obj:
    addresses: list[Obj] = [{"type": "Hostname", "address": name}]
    if external is not None:          # listed first on purpose: InternalIP must still come first
        addresses.append({"type": "ExternalIP", "address": external})
    if internal is not None:
        addresses.append({"type": "InternalIP", "address": internal})
    addresses += extra or []
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": addresses}}


def service(name: str = "echo", namespace: str = "default", type_: str = "NodePort",
            ports: list[Obj] | None = None, selector: Obj | None = None, **spec: Any) -> Obj:
    if ports is None:
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]
    body: Obj = {"type": type_, "ports": ports, "selector": {"app": name} if selector is None else selector}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": body}


def lb_service(name: str = "echo", ingress: list[str] | None = None, **kwargs: Any) -> Obj:
    svc = service(name, type_="LoadBalancer", **kwargs)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in (ingress or ["198.51.100.1"])]}}
    return svc


def endpoint(address: str, node_name: str | None = NODE, pod: str | None = None, ready: bool | None = True,
             serving: bool | None = None, terminating: bool | None = None) -> Obj:
    conditions: Obj = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    ep: Obj = {"addresses": [address], "conditions": conditions}
    if node_name is not None:
        ep["nodeName"] = node_name
    if pod is not None:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return ep


def endpoint_slice(service_name: str = "echo", endpoints: list[Obj] | None = None, name: str | None = None,
                   namespace: str = "default", ports: list[Obj] | None = None,
                   address_type: str = "IPv4") -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-abc", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints or [],
    }


def run(services: list[Obj], slices: list[Obj] | None = None, nodes: list[Obj] | None = None,
        config: dict[str, str] | None = None, node_name: str = NODE) -> DesiredState:
    snap = Snapshot(services=services, endpointslices=slices or [],
                    nodes=[node()] if nodes is None else nodes, config=config)
    return translate(snap, node_name)


def l4(addr: str, port: int, proto: Proto = Proto.TCP) -> L4Addr:
    return L4Addr(IPv4Address(addr), port, proto)


def fe(state: DesiredState, addr: str, port: int, proto: Proto = Proto.TCP) -> Frontend:
    return state.frontends[l4(addr, port, proto)]


def the_problem(state: DesiredState, *parts: str) -> Problem:
    """Return the one problem whose text contains every part, failing with all problems otherwise."""
    found = [p for p in state.problems if all(part in str(p) for part in parts)]
    assert len(found) == 1, f"expected one problem with {parts}, got: {[str(p) for p in state.problems]}"
    return found[0]


def two_pods() -> list[Obj]:
    return [endpoint("10.0.1.1", NODE, "echo-1"), endpoint("10.0.2.1", "node-b", "echo-2")]


class StaticSource:
    """A Source whose snapshot is whatever the test put there."""

    def __init__(self, services: list[Obj], slices: list[Obj], config: dict[str, str] | None,
                 nodes: list[Obj] | None = None) -> None:
        self.snap = Snapshot(services=services, endpointslices=slices, nodes=[node()] if nodes is None else nodes,
                             config=config)

    def snapshot(self) -> Snapshot:
        return self.snap

    def wait_for_change(self, timeout: float) -> bool:
        return False


def wait_for(what: str, check: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll check() until it is truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
