"""What the lab's parts (workloads, process supervision, traffic) share: the attributes and methods of the
Lab they are mixed into, declared once so each part type-checks on its own."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from bpflb_lab.lab.cluster import ClusterDir, KubeObject
from bpflb_lab.lab.state import LabPaths, LabState, PodRecord


class LabParts:
    """The host of the mixins: lab.core.Lab provides every name below."""

    name: str
    paths: LabPaths
    pin_root: Path
    cluster: ClusterDir
    _agent_cmd: str | Sequence[str] | None
    _log: Callable[[str], None]
    _children: dict[int, subprocess.Popen[bytes]]

    def state(self) -> LabState:
        raise NotImplementedError

    def netns(self, host: str) -> str:
        raise NotImplementedError

    def cgroup(self, host: str) -> Path | None:
        raise NotImplementedError

    def services(self) -> list[KubeObject]:
        raise NotImplementedError

    def endpoint_slices(self) -> list[KubeObject]:
        raise NotImplementedError

    def _start_echo(self, rec: PodRecord) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _wait_echo(self, started: list[tuple[PodRecord, subprocess.Popen[bytes]]]) -> None:
        raise NotImplementedError
