"""Tests of the unit tier (helpers.py holds its helpers, conftest.py its fixtures)."""
