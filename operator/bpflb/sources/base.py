"""The interface every source of cluster state implements (files today, the Kubernetes API later)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

KubeObject = dict[str, Any]

# The agent's configuration is a ConfigMap of this name in bpflb's namespace (the Helm release's), in
# whatever source feeds it; kube-system when nothing says otherwise (and always for the file source).
AGENT_CONFIG_NAMESPACE = "kube-system"
AGENT_CONFIG_NAME = "bpflb-agent"
NAMESPACE_ENV = "POD_NAMESPACE"           # the downward API's metadata.namespace, set by the chart


def own_namespace(given: str | None = None) -> str:
    """The namespace bpflb runs in: given (a flag), else $POD_NAMESPACE, else kube-system."""
    return given or os.environ.get(NAMESPACE_ENV) or AGENT_CONFIG_NAMESPACE


def config_object(namespace: str = AGENT_CONFIG_NAMESPACE) -> str:
    """The agents' ConfigMap as messages name it."""
    return f"ConfigMap {namespace}/{AGENT_CONFIG_NAME}"


def object_key(namespace: str | None, name: str) -> str:
    """An object's identity as the model and Changes name it: "namespace/name" (namespace "default" when
    empty, as the API server defaults it)."""
    return f"{namespace or 'default'}/{name}"


_ORIGINS = itertools.count(1)


def new_origin() -> int:
    """A number no other source of this process has (for Changes.origin)."""
    return next(_ORIGINS)


@dataclass(frozen=True)
class Changes:
    """What a source's snapshot changed from its previous one: the Services and EndpointSlices
    (object_key) replaced, added or deleted since then, each with its object now (None: deleted). A consumer
    that translated the snapshot `since` of this `origin` may follow these instead of comparing the lists;
    any other consumer compares them."""

    origin: int              # the source that counts (new_origin(): snapshots of two sources never chain)
    since: int               # the snapshot these changes follow
    seq: int                 # this snapshot's number
    services: dict[str, KubeObject | None]
    endpointslices: dict[str, Any]


@dataclass
class Snapshot:
    """A consistent view of the objects the agent programs its node from (raw Kubernetes dicts)."""

    services: list[KubeObject] = field(default_factory=list)
    endpointslices: list[KubeObject] = field(default_factory=list)
    nodes: list[KubeObject] = field(default_factory=list)
    config: dict[str, str] | None = None      # data of the bpflb-agent ConfigMap, None when absent
    config_namespace: str = AGENT_CONFIG_NAMESPACE    # where that ConfigMap is (problems with it name it there)
    problems: list[str] = field(default_factory=list)  # unreadable files / documents, already explained
    # Only some of the Services, their list still coming in (KubeSource.partial_snapshot): program what it
    # holds, remove nothing it lacks.
    partial: bool = False
    # A source that can tell what changed since its previous snapshot says it here (KubeSource); None: not
    # known, the consumer compares the lists. The lists are complete either way.
    changes: Changes | None = None


class Source(Protocol):
    """A source yields snapshots and tells when the next one may differ."""

    def snapshot(self) -> Snapshot:
        """Return the current state; never raises for a bad object, records it in problems."""
        ...

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to timeout seconds; True when something may have changed since the last snapshot."""
        ...


@runtime_checkable
class ListingSource(Source, Protocol):
    """A source whose first lists come in pages the agent may program as they arrive (KubeSource)."""

    @property
    def synced(self) -> bool:
        """Every resource has been listed once: snapshot() is complete."""
        ...

    def partial_snapshot(self, timeout: float) -> Snapshot | None:
        """Before synced: the objects listed so far, each whole (None after timeout, or once synced)."""
        ...

    def end_partial(self) -> None:
        """The consumer of partial snapshots is done: the lists go on at their own pace."""
        ...
