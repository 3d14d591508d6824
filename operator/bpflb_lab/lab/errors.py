"""Errors the lab raises; the CLI turns them into a message and an exit code."""

from __future__ import annotations


class LabError(Exception):
    """Something the lab could not do; the message says what and, where it can, how to fix it."""


class LabUnsupported(LabError):
    """A requested option exists in the design but is not implemented in this release (CLI exit 2)."""
