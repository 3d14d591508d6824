"""Tests of the control tier (helpers.py holds its helpers, conftest.py its fixtures)."""
