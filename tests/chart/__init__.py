"""Tests of the chart tier (helpers.py holds its helpers, conftest.py its fixtures)."""
