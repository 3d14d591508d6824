"""How bad input is quoted in error messages (the translator's Problems, the ModuleConfig's validation):
a value as the user wrote it in JSON/YAML, and the JSON kind of it."""

from __future__ import annotations

import json
from typing import Any


def show(value: Any) -> str:
    """A value as it appears in JSON ("dsr", 2, true), shortened for messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def json_kind(value: Any) -> str:
    """The JSON kind of a value, as the user wrote it, for 'got X (a string)' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
