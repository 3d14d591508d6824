"""Tests of the lab tier (helpers.py holds its helpers, conftest.py its fixtures)."""
