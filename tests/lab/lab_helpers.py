"""Helpers shared by the lab tests (kept out of conftest.py so test modules can import them)."""

from __future__ import annotations

import secrets
import subprocess


def unique_lab_name() -> str:
    return f"bpflb-t{secrets.token_hex(3)}"


def root_netns_snapshot() -> dict[str, str]:
    """What the root network namespace looks like (addresses, routes, rules, links)."""
    out = {}
    for key, argv in {"addr": ["ip", "-o", "addr"], "route": ["ip", "route", "show", "table", "all"],
                      "rule": ["ip", "rule"], "link": ["ip", "-o", "link"]}.items():
        out[key] = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return out
