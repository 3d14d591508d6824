"""What a real API server adds around stored objects so that kubectl works against the emulated API
(bpflb_lab.apiserver): server-side tables (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`, kubectl's
default for `get`) with kube-apiserver's columns for the built-in kinds and a CRD's additionalPrinterColumns
for its custom resources; label and field selectors; strategic merge patches (kubectl apply on built-in
kinds) and JSON patches turned into merge patches. Column shapes follow kubernetes
pkg/printers/internalversion; a JSONPath subset serves the printer columns."""

from __future__ import annotations

import copy
import datetime
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Obj = dict[str, Any]
Cell = str | int | bool | float | None


# -- ages and JSONPath ---------------------------------------------------------------------------------------


def age(timestamp: Any, now: datetime.datetime | None = None) -> str:
    """kubectl's short age ("40s", "5m", "3h", "2d") of an RFC 3339 timestamp; "<unknown>" without one."""
    if not isinstance(timestamp, str) or not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp)
    except ValueError:
        return "<invalid>"
    seconds = int(((now or datetime.datetime.now(tz=datetime.UTC)) - then).total_seconds())
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    return f"{days}d" if days < 365 * 2 else f"{days // 365}y"


_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+|\*)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]")


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The values a printer column's JSONPath selects: .a.b, [N], [*], [?(@.key=="value")] (the subset CRD
    printer columns use); an unknown construct selects nothing."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    values = [obj]
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None:
            return []
        pos = m.end()
        key, index, fkey, fval = m.groups()
        nxt: list[Any] = []
        for v in values:
            if key is not None and isinstance(v, Mapping) and key in v:
                nxt.append(v[key])
            elif index == "*" and isinstance(v, list):
                nxt.extend(v)
            elif index is not None and index != "*" and isinstance(v, list) and int(index) < len(v):
                nxt.append(v[int(index)])
            elif fkey is not None and isinstance(v, list):
                nxt.extend(x for x in v if str(_dig(x, fkey.split("."))) == fval)
        values = nxt
    return values


def _dig(obj: Any, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(k)
    return obj


# -- selectors -----------------------------------------------------------------------------------------------


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_SET = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_matcher(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A labelSelector query (=, ==, !=, in, notin, exists, !exists) as a predicate over an object."""
    requirements: list[tuple[str, str, frozenset[str]]] = []      # (key, operator, values)
    for req in _split(selector or ""):
        m = _SET.match(req)
        if m:
            requirements.append((m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(","))))
        elif "!=" in req:
            key, value = (x.strip() for x in req.split("!=", 1))
            requirements.append((key, "notin", frozenset({value})))
        elif "=" in req:
            key, value = (x.strip() for x in req.replace("==", "=").split("=", 1))
            requirements.append((key, "in", frozenset({value})))
        elif req.startswith("!"):
            requirements.append((req[1:].strip(), "absent", frozenset()))
        else:
            requirements.append((req, "present", frozenset()))

    def match(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for key, op, values in requirements:
            ok = {"in": key in labels and labels[key] in values, "notin": labels.get(key) not in values,
                  "present": key in labels, "absent": key not in labels}[op]
            if not ok:
                return False
        return True
    return match


def field_matcher(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A fieldSelector query (a.b=v, a.b==v, a.b!=v) as a predicate; an absent field reads as ""."""
    if not selector:
        return lambda obj: True
    tests: list[tuple[list[str], str, bool]] = []
    for req in _split(selector):
        negate = "!=" in req
        key, value = (x.strip() for x in (req.split("!=", 1) if negate else req.replace("==", "=").split("=", 1)))
        tests.append((key.split("."), value, negate))

    def match(obj: Mapping[str, Any]) -> bool:
        for keys, value, negate in tests:
            got = _dig(obj, keys)
            text = "" if got is None else str(got).lower() if isinstance(got, bool) else str(got)
            if (text == value) == negate:
                return False
        return True
    return match


# -- patches ------------------------------------------------------------------------------------------------

# Strategic merge: the list fields kube-apiserver merges by a key (from the built-in types' patchMergeKey);
# every other list is replaced. (Service ports merge by port; containers, volumes, env by name ...)
MERGE_KEYS = {"ports": ("port", "containerPort"), "containers": ("name",), "initContainers": ("name",),
              "volumes": ("name",), "env": ("name",), "volumeMounts": ("mountPath",),
              "conditions": ("type",), "ownerReferences": ("uid",), "endpoints": ()}


def strategic_to_merge(current: Any, patch: Any) -> Any:
    """A strategic merge patch against current, as the JSON merge patch that gives the same result: lists with
    a merge key are merged element by element (and $patch: delete removes one), $setElementOrder orders
    them, other directives are dropped."""
    if not isinstance(patch, Mapping):
        return patch
    cur = current if isinstance(current, Mapping) else {}
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if not k.startswith("$")}
    out: Obj = {}
    orders = {k.split("/", 1)[1]: v for k, v in patch.items() if k.startswith("$setElementOrder/")}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if isinstance(value, list):
            out[key] = _merge_list(key, cur.get(key), value, orders.get(key))
        elif isinstance(value, Mapping):
            out[key] = strategic_to_merge(cur.get(key), value)
        else:
            out[key] = value
    for key, order in orders.items():
        if key not in out and isinstance(cur.get(key), list):
            out[key] = _merge_list(key, cur.get(key), [], order)
    return out


def _merge_list(field: str, current: Any, patch: list[Any], order: list[Any] | None) -> list[Any]:
    have = list(current) if isinstance(current, list) else []
    items = [p for p in patch if isinstance(p, Mapping)]
    key = next((k for k in MERGE_KEYS.get(field, ()) if items and all(k in p for p in items)
                and all(isinstance(h, Mapping) and k in h for h in have)), None)
    if key is None or len(items) != len(patch):
        return [p for p in patch if not (isinstance(p, Mapping) and p.get("$patch") == "delete")]
    merged = [copy.deepcopy(h) for h in have]
    for p in items:
        at = next((i for i, h in enumerate(merged) if h.get(key) == p[key]), None)
        if p.get("$patch") == "delete":
            if at is not None:
                del merged[at]
            continue
        body = {k: v for k, v in p.items() if not k.startswith("$")}
        if at is None:
            merged.append(body)
        else:
            merged[at] = _apply_merge(merged[at], strategic_to_merge(merged[at], body))
    if order:
        rank = {json.dumps(o.get(key) if isinstance(o, Mapping) else o): i for i, o in enumerate(order)}
        merged.sort(key=lambda h: rank.get(json.dumps(h.get(key)), len(rank)))
    return merged


def _apply_merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _apply_merge(out.get(k), v)
    return out


def json_patch_to_merge(current: Obj, ops: list[Any]) -> Obj:
    """A JSON patch (RFC 6902: add, replace, remove, test) against current, as a merge patch."""
    new = copy.deepcopy(current)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op.get("path", "")).split("/")[1:]]
        parent: Any = new
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else ""
        kind = op.get("op")
        if kind in ("add", "replace"):
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, op.get("value"))
                else:
                    parent[idx] = op.get("value")
            else:
                parent[last] = op.get("value")
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        elif kind == "test":
            got = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if got != op.get("value"):
                raise ValueError(f"test failed at {op.get('path')}")
    patch: Obj = merge_diff(current, new)
    return patch


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns old into new (removed keys become null; lists are replaced)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch: Obj = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_diff(old[key], value)
    return patch


# -- tables -------------------------------------------------------------------------------------------------


def _col(name: str, description: str = "", *, type_: str = "string", fmt: str = "", priority: int = 0) -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": description, "priority": priority}


def _none(values: Iterable[str]) -> str:
    joined = ",".join(v for v in values if v)
    return joined or "<none>"


def _svc_external(svc: Obj) -> str:
    spec, status = svc.get("spec") or {}, svc.get("status") or {}
    ext = list(spec.get("externalIPs") or [])
    kind = spec.get("type", "ClusterIP")
    if kind == "LoadBalancer":
        ingress = [i.get("ip") or i.get("hostname") or "" for i in (status.get("loadBalancer") or {}).get("ingress") or []]
        return _none(ingress + ext) if ingress or ext else "<pending>"
    if kind == "ExternalName":
        return str(spec.get("externalName") or "<none>")
    return _none(ext)


def _svc_ports(svc: Obj) -> str:
    out = []
    for p in (svc.get("spec") or {}).get("ports") or []:
        text = f"{p.get('port')}"
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        out.append(f"{text}/{p.get('protocol', 'TCP')}")
    return _none(out)


def _slice_endpoints(s: Obj) -> str:
    addrs = [a for e in s.get("endpoints") or [] for a in e.get("addresses") or []]
    if not addrs:
        return "<unset>"
    shown = ",".join(addrs[:3])
    return shown + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")


def _slice_ports(s: Obj) -> str:
    ports = [str(p.get("port")) for p in s.get("ports") or [] if p.get("port") is not None]
    return ",".join(ports) if ports else "<unset>"


def _node_status(n: Obj) -> str:
    ready = next((c.get("status") for c in (n.get("status") or {}).get("conditions") or []
                  if c.get("type") == "Ready"), None)
    text = "Ready" if ready == "True" else "NotReady" if ready == "False" else "Unknown"
    return text + (",SchedulingDisabled" if (n.get("spec") or {}).get("unschedulable") else "")


def _node_roles(n: Obj) -> str:
    labels = (n.get("metadata") or {}).get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/"))
    return ",".join(roles) or "<none>"


def _pod_ready(p: Obj) -> str:
    statuses = (p.get("status") or {}).get("containerStatuses") or []
    total = len((p.get("spec") or {}).get("containers") or [])
    if not statuses:
        ready = next((c.get("status") == "True" for c in (p.get("status") or {}).get("conditions") or []
                      if c.get("type") == "Ready"), False)
        return f"{total if ready else 0}/{total}"
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _meta(obj: Obj, key: str) -> Any:
    return (obj.get("metadata") or {}).get(key)


def _event_object(e: Obj) -> str:
    inv = e.get("involvedObject") or e.get("regarding") or {}
    return f"{str(inv.get('kind', '')).lower()}/{inv.get('name', '')}"


Printer = tuple[list[Obj], Callable[[Obj], list[Cell]]]
_NAME = _col("Name", "Name must be unique within a namespace.", fmt="name")
_AGE = _col("Age", "CreationTimestamp is a timestamp representing the server time when this object was created.")

BUILTIN: dict[str, Printer] = {
    "Service": ([_NAME, _col("Type"), _col("Cluster-IP"), _col("External-IP"), _col("Port(s)"), _AGE,
                 _col("Selector", priority=1)],
                lambda s: [_meta(s, "name"), (s.get("spec") or {}).get("type", "ClusterIP"),
                           (s.get("spec") or {}).get("clusterIP") or "<none>", _svc_external(s), _svc_ports(s),
                           age(_meta(s, "creationTimestamp")),
                           _none(f"{k}={v}" for k, v in sorted(((s.get("spec") or {}).get("selector") or {}).items()))]),
    "EndpointSlice": ([_NAME, _col("AddressType"), _col("Ports"), _col("Endpoints"), _AGE],
                      lambda s: [_meta(s, "name"), s.get("addressType", ""), _slice_ports(s), _slice_endpoints(s),
                                 age(_meta(s, "creationTimestamp"))]),
    "Node": ([_NAME, _col("Status"), _col("Roles"), _AGE, _col("Version"),
              _col("Internal-IP", priority=1)],
             lambda n: [_meta(n, "name"), _node_status(n), _node_roles(n), age(_meta(n, "creationTimestamp")),
                        ((n.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", ""),
                        _none(a.get("address", "") for a in (n.get("status") or {}).get("addresses") or []
                              if a.get("type") == "InternalIP")]),
    "Pod": ([_NAME, _col("Ready"), _col("Status"), _col("Restarts", type_="integer"), _AGE,
             _col("IP", priority=1), _col("Node", priority=1)],
            lambda p: [_meta(p, "name"), _pod_ready(p),
                       "Terminating" if _meta(p, "deletionTimestamp") else (p.get("status") or {}).get("phase", ""),
                       0, age(_meta(p, "creationTimestamp")), (p.get("status") or {}).get("podIP") or "<none>",
                       (p.get("spec") or {}).get("nodeName") or "<none>"]),
    "Namespace": ([_NAME, _col("Status"), _AGE],
                  lambda n: [_meta(n, "name"), (n.get("status") or {}).get("phase", "Active"),
                             age(_meta(n, "creationTimestamp"))]),
    "ConfigMap": ([_NAME, _col("Data", type_="integer"), _AGE],
                  lambda c: [_meta(c, "name"), len(c.get("data") or {}) + len(c.get("binaryData") or {}),
                             age(_meta(c, "creationTimestamp"))]),
    "Event": ([_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"), _col("Message")],
              lambda e: [age(e.get("lastTimestamp") or e.get("eventTime") or _meta(e, "creationTimestamp")),
                         e.get("type", ""), e.get("reason", ""), _event_object(e), e.get("message", "")]),
    "DaemonSet": ([_NAME, _col("Desired", type_="integer"), _col("Current", type_="integer"),
                   _col("Ready", type_="integer"), _col("Up-to-date", type_="integer"),
                   _col("Available", type_="integer"), _col("Node Selector"), _AGE],
                  lambda d: [_meta(d, "name"), *(int((d.get("status") or {}).get(k) or 0) for k in (
                      "desiredNumberScheduled", "currentNumberScheduled", "numberReady", "updatedNumberScheduled",
                      "numberAvailable")),
                      _none(f"{k}={v}" for k, v in sorted((((d.get("spec") or {}).get("template") or {})
                                                           .get("spec") or {}).get("nodeSelector", {}).items())),
                      age(_meta(d, "creationTimestamp"))]),
    "Lease": ([_NAME, _col("Holder"), _AGE],
              lambda x: [_meta(x, "name"), (x.get("spec") or {}).get("holderIdentity", ""),
                         age(_meta(x, "creationTimestamp"))]),
    "CustomResourceDefinition": ([_NAME, _col("Created At", type_="date")],
                                 lambda c: [_meta(c, "name"), _meta(c, "creationTimestamp")]),
    "ValidatingWebhookConfiguration": ([_NAME, _col("Webhooks", type_="integer"), _AGE],
                                       lambda v: [_meta(v, "name"), len(v.get("webhooks") or []),
                                                  age(_meta(v, "creationTimestamp"))]),
}
DEFAULT: Printer = ([_NAME, _AGE], lambda o: [_meta(o, "name"), age(_meta(o, "creationTimestamp"))])


def crd_printer(crd: Obj, version: str) -> Printer | None:
    """A custom resource's columns from its CRD's additionalPrinterColumns for that version (Name first, as
    kube-apiserver does), None when it declares none."""
    for v in (crd.get("spec") or {}).get("versions") or []:
        if v.get("name") != version:
            continue
        columns = v.get("additionalPrinterColumns") or []
        if not columns:
            return None
        defs = [_NAME] + [_col(c["name"], c.get("description", ""), type_=c.get("type", "string"),
                               fmt=c.get("format", ""), priority=int(c.get("priority", 0))) for c in columns]

        def cells(obj: Obj, columns: list[Obj] = columns) -> list[Cell]:
            out: list[Cell] = [_meta(obj, "name")]
            for c in columns:
                found = jsonpath(obj, c.get("jsonPath", ""))
                value = found[0] if found else None
                if c.get("type") == "date":
                    out.append(age(value) if value is not None else "<unknown>")
                elif value is None or isinstance(value, str | int | float | bool):
                    out.append(value)
                else:
                    out.append(json.dumps(value, separators=(",", ":")))
            return out
        # kubectl formats date columns from RFC 3339 strings; the server gives the age already, as a string.
        return [dict(d, type="string") if d["type"] == "date" else d for d in defs], cells
    return None


def is_table_request(accept: str | None) -> bool:
    return bool(accept) and "as=Table" in (accept or "") and "g=meta.k8s.io" in (accept or "")


def table(objects: list[Obj], printer: Printer, resource_version: str, include: str | None) -> Obj:
    """A meta.k8s.io/v1 Table of objects (rows carry PartialObjectMetadata unless includeObject says else)."""
    defs, cells = printer
    rows = []
    for obj in objects:
        if include == "Object":
            inner: Obj | None = obj
        elif include == "None":
            inner = None
        else:
            inner = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                     "metadata": obj.get("metadata") or {}}
        rows.append({"cells": cells(obj), "object": inner})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": defs, "rows": rows}
