"""Fixtures for the lab tests. Tests marked `privileged` need root and network namespaces: without them they
FAIL with an explanation (never skip; tests/conftest.py guards every marked test, and the `privileged`
fixture here guards the session-scoped lab, which is set up before any function-scoped guard runs). Every
module-scoped lab is made by lab_running, each module giving its own Lab.up arguments and setup."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bpflb_lab.lab import Lab
from tests.lab.helpers import unique_lab_name


@pytest.fixture(scope="session")
def privileged() -> None:
    """Fail every privileged test at once, with the reason, when this machine cannot run the lab."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed")
    if not problems:
        probe = f"{unique_lab_name()}-fabric"
        add = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
        if add.returncode != 0:
            problems.append(f"`ip netns add` failed: {add.stderr.strip()}")
        else:
            subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True, text=True)
    if problems:
        pytest.fail("the lab tests need root and network namespaces (run them as root on Linux): "
                    + "; ".join(problems), pytrace=False)


@contextmanager
def lab_running(agent_cmd: str | None = None, **up: Any) -> Iterator[Lab]:
    """A lab of a unique name brought up with `up`'s arguments (Lab.up's), and always taken down: the body of
    every module's `lab` fixture, which does its own setup inside the `with` (a failed setup takes it down too).
    agent_cmd: the agents' command line, when not the lab's default."""
    shared = Lab(unique_lab_name(), agent_cmd=agent_cmd)
    try:
        shared.up(**up)
        yield shared
    finally:
        shared.down()


@pytest.fixture(scope="session")
def lab(privileged: None) -> Iterator[Lab]:
    """A lab with the default workload and no agents, shared by the read-only tests of a session."""
    with lab_running(agents=False) as shared:
        yield shared


@pytest.fixture
def fresh_lab_name(privileged: None) -> Iterator[str]:
    """A unique lab name whose lab is taken down after the test, whatever happened."""
    name = unique_lab_name()
    try:
        yield name
    finally:
        Lab(name).down()


@pytest.fixture
def pin_base(tmp_path: Path) -> Path:
    """A pin base outside bpffs, for fake agents that only write their ready link."""
    return tmp_path / "pins"
