"""Field validation of raw Kubernetes objects for the translation: each helper returns the checked value or
raises _Invalid(field, reason), and the callers (endpoints, frontends) turn that into a Problem for the object
at hand and skip the smallest unit that contains the bad field."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from bpflb.model.messages import json_kind as _type_name
from bpflb.model.messages import show as _show
from bpflb.model.types import Problem, Proto

NODEPORT_MIN = 30000
NODEPORT_MAX = 32767
DEFAULT_NAMESPACE = "default"             # what kubectl applies a namespace-less manifest to
_PROTOS = {"TCP": Proto.TCP, "UDP": Proto.UDP}
_LIMITED_BROADCAST = 0xFFFFFFFF


class _Invalid(Exception):
    """A field that cannot be used: where it is and what was expected instead of what was given."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _got(value: Any) -> str:
    """Return 'got <value> (<its type>)', or 'got null' for an absent value."""
    return "got null" if value is None else f"got {_show(value)} ({_type_name(value)})"


def _join(prefix: str, field: str) -> str:
    """Return the path of a field relative to prefix ("" is prefix itself)."""
    return f"{prefix}.{field}" if field else prefix


def _mapping(value: Any, field: str, *, required: bool = False) -> dict[str, Any]:
    """Return a mapping field; absent/null is an empty mapping unless required (a list item, say)."""
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(field, f"must be a mapping; {_got(value)}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    """Return a list field; absent/null is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(field, f"must be a list; {_got(value)}")
    return value


def _str(value: Any, field: str, default: str) -> str:
    """Return a string field; absent/null is the default."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise _Invalid(field, f"must be a string; {_got(value)}")
    return value


def _bool(value: Any, field: str, default: bool) -> bool:
    """Return a boolean field; absent/null is the default."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(field, f"must be true or false; {_got(value)}")
    return value


def _int(value: Any, field: str, low: int, high: int) -> int:
    """Return an integer field that must be present and within low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(field, f"must be an integer in {low}..{high}; {_got(value)}")
    if not low <= value <= high:
        raise _Invalid(field, f"must be an integer in {low}..{high}; got {value}")
    return value


def _proto(value: Any, field: str) -> Proto:
    """Return a Kubernetes protocol field (absent means TCP); SCTP and anything else are refused."""
    if value is None:
        return Proto.TCP
    proto = _PROTOS.get(value) if isinstance(value, str) else None
    if proto is not None:
        return proto
    if value == "SCTP":
        raise _Invalid(field, "SCTP is not supported; expected TCP or UDP")
    raise _Invalid(field, f"expected TCP or UDP; {_got(value)}")


def _ipv4_int(value: Any, field: str, role: str) -> int | None:
    """Return an IPv4 address as an integer, None for a well-formed IPv6 one (IPv4 only for now: no error).

    inet_pton plus the round trip accept exactly the canonical dotted quad, as ipaddress does, at a fraction
    of its cost (this runs once per endpoint address).
    """
    if not isinstance(value, str):
        raise _Invalid(field, f"must be an IP address string; {_got(value)}")
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
        if socket.inet_ntop(socket.AF_INET, packed) != value:
            raise ValueError(value)
    except (OSError, ValueError):
        try:
            socket.inet_pton(socket.AF_INET6, value)
        except (OSError, ValueError):
            raise _Invalid(field, f"not a valid IP address; got {_show(value)}") from None
        return None
    number = int.from_bytes(packed, "big")
    top = number >> 24
    if number == 0 or top == 127 or top >> 4 == 14 or number == _LIMITED_BROADCAST:
        raise _Invalid(field, f"{value} cannot be used as {role}; expected a unicast, non-loopback address")
    return number


def _ipv4(value: Any, field: str, role: str) -> IPv4Address | None:
    """Return an IPv4 address, None for a well-formed IPv6 one (IPv4 only for now, not an error)."""
    number = _ipv4_int(value, field, role)
    return None if number is None else IPv4Address(number)


@dataclass(frozen=True, slots=True)
class _Meta:
    """The identity part of an object's metadata, already checked."""

    namespace: str
    name: str
    labels: dict[str, Any]
    annotations: dict[str, Any]
    key: str                      # namespace/name (one string, shared by what the translation makes)


def _meta(kind: str, obj: Any, index: int, problems: list[Problem], known: str | None = None) -> _Meta | None:
    """Check a namespaced object's metadata; None (with a Problem) when the whole object must be skipped.
    known: the object's namespace/name as the caller holds it already (that string is used when it is the
    same)."""
    if not isinstance(obj, dict):
        problems.append(Problem(f"{kind} #{index}", "(object)", f"must be a mapping; {_got(obj)}"))
        return None
    raw = obj.get("metadata")
    namespace = DEFAULT_NAMESPACE
    if isinstance(raw, dict) and isinstance(raw.get("namespace"), str) and raw["namespace"]:
        namespace = sys.intern(raw["namespace"])          # (held by every object's records: once each)
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name:
        reason = "missing" if name is None else f"must be a non-empty string; {_got(name)}"
        problems.append(Problem(f"{kind} {namespace}/<unnamed #{index}>", "metadata.name",
                                f"{reason}; the object is skipped"))
        return None
    try:
        metadata = _mapping(raw, "metadata")
        _str(metadata.get("namespace"), "metadata.namespace", DEFAULT_NAMESPACE)
        labels = _mapping(metadata.get("labels"), "metadata.labels")
        annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    except _Invalid as bad:
        problems.append(Problem(f"{kind} {namespace}/{name}", bad.field,
                                f"{bad.reason}; the object is skipped"))
        return None
    key = f"{namespace}/{name}"
    return _Meta(namespace, name, labels, annotations, known if known == key and known is not None else key)
