"""Where a lab keeps its files, and the runtime record (lab.json) of what it created.

Layout of the state directory /run/bpflb/labs/<lab>/:
  lab.json        this module's LabState: settings, pods with their addresses and echo pids, agent pids
  lock            flock(2) target serialising changes (apply, delete)
  cluster/        the Kubernetes objects every agent reads (Nodes, Services, EndpointSlices, ConfigMap)
  logs/           nodeK.log (agents), pod-<pod>.log (echo servers)
  run/            <pod>.ready files the echo servers write once they listen
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bpflb_lab.lab.errors import LabError

DEFAULT_STATE_ROOT = Path("/run/bpflb/labs")
DEFAULT_PIN_BASE = Path("/sys/fs/bpf/bpflb-lab")
STATE_VERSION = 1


def atomic_write(path: Path, data: str) -> None:
    """Write data to path so that readers see the old or the new content, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LabPaths:
    """The files of one lab."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def agent_log(self, node: str) -> Path:
        return self.logs / f"{node}.log"

    def pod_log(self, pod_key: str) -> Path:
        return self.logs / f"pod-{pod_key.replace('/', '_')}.log"

    def pod_ready(self, pod_key: str) -> Path:
        return self.run / f"{pod_key.replace('/', '_')}.ready"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab's lock (serialises apply/delete across processes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class PodRecord:
    """A pod the lab runs: its manifest (with status.podIP filled in) and where it lives."""

    key: str                  # "namespace/name"
    manifest: dict[str, Any]
    node: str
    ip: str
    netns: str
    veth: str
    echo_pid: int | None = None
    tcp_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.key.split("/", 1)[1]

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]


@dataclass
class LabState:
    """What `lab up` created; the source of truth for status, apply and check."""

    name: str
    nodes: int
    mode: str
    tunnel: str
    agents: bool
    created: float
    agent_cmd: list[str] | None = None
    agent_pids: dict[str, int] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    phase: str = "creating"   # creating | up
    version: int = STATE_VERSION
    algorithm: str = "Random"  # lbAlgorithm of the agents' ConfigMap: Random | Maglev
    acceleration: str = "Disabled"  # xdpAcceleration of the agents' ConfigMap: Disabled | Native | BestEffort
    kube: bool = False         # --kube: emulated API + operator on the control-plane host, agents on the API
    settings: dict[str, Any] = field(default_factory=dict)  # other cni-cilium settings (`bpflb lab set`)

    def save(self, paths: LabPaths) -> None:
        atomic_write(paths.state_file, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, paths: LabPaths) -> LabState:
        try:
            raw = json.loads(paths.state_file.read_text())
        except FileNotFoundError as exc:
            raise LabError(f"no lab state at {paths.state_file}") from exc
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {paths.state_file}: {exc}") from exc
        if raw.get("version") != STATE_VERSION:
            raise LabError(f"{paths.state_file}: state version {raw.get('version')} is not {STATE_VERSION}; "
                           "run `bpflb lab down` and bring the lab up again")
        pods = {k: PodRecord(**v) for k, v in raw.pop("pods", {}).items()}
        return cls(pods=pods, **raw)
