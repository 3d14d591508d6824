"""Tests of the bpf tier (packets.py holds its packet builders and helpers, conftest.py its fixtures)."""
