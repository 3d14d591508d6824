"""What the Kubernetes source keeps of each Service between syncs: a ServiceRecord, the Service's view packed as
compact JSON and decoded only while the translator reads it (10,000 Services: about 500 bytes each rather
than 1.7 KiB of dicts and strings). The file source hands the translator plain dicts; the translator reads both
(model.translate)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from bpflb.sources.base import KubeObject, object_key

_PACK = json.JSONEncoder(separators=(",", ":"), check_circular=False)   # ASCII: any string round-trips


@dataclass(slots=True, frozen=True)
class ServiceRecord:
    """One Service as the Kubernetes source keeps it. Equal records are the same view of the same version.

    key: "namespace/name" (sources.base.object_key) when the metadata is plain (a mapping: a non-empty string
    name, a string namespace or none, labels and annotations mappings or none), else None: the translator reads
    a record with a key as it is, and the view of one without (to say what is wrong with its metadata);
    version: metadata.resourceVersion
    (a string, else None), held here and not in packed (the source's index of versions holds the same string);
    packed: the view, compact JSON, without its resourceVersion."""

    key: str | None
    version: str | None
    packed: bytes

    def view(self) -> KubeObject:
        """The view the record was made from, decoded afresh (the caller may keep or change it)."""
        view: KubeObject = json.loads(self.packed)
        if self.version is not None:
            view["metadata"]["resourceVersion"] = self.version
        spec = view.get("spec")
        ports = spec.get("ports") if type(spec) is dict else None
        for port in ports if type(ports) is list else ():
            name = port.get("name") if type(port) is dict else None
            if type(name) is str:
                port["name"] = sys.intern(name)     # the frontends keep it: "http" once, not once per Service
        return view

    @property
    def uid(self) -> str | None:
        """metadata.uid when it is a string (decoded: it is asked for rarely, for Events)."""
        meta = json.loads(self.packed).get("metadata")
        uid = meta.get("uid") if type(meta) is dict else None
        return uid if type(uid) is str else None


def service_record(view: KubeObject) -> ServiceRecord:
    """Pack a Service's view (what sources.kube.service_view keeps of the object; any JSON value, a wrong type
    included, round-trips as it came)."""
    meta = view.get("metadata")
    key = version = None
    if type(meta) is dict:
        name, namespace, rv = meta.get("name"), meta.get("namespace"), meta.get("resourceVersion")
        if type(name) is str and name and (namespace is None or type(namespace) is str) and \
                all(meta.get(k) is None or type(meta.get(k)) is dict for k in ("labels", "annotations")):
            key = object_key(namespace, name)
        if type(rv) is str:
            version = rv
            view = {**view, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    return ServiceRecord(key, version, _PACK.encode(view).encode("ascii"))


def expand(raw: Any) -> Any:
    """A Service as the translation reads it: a record's view, anything else as it is."""
    return raw.view() if type(raw) is ServiceRecord else raw
