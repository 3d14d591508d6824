"""Tests of the unit tier (helpers.py holds its helpers; no fixture is shared between its modules, so it has
no conftest.py)."""
