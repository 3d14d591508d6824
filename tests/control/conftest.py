"""Fixtures for the control-plane tests (their helpers are in helpers.py): an emulated Kubernetes API (kmock's KubernetesEmulator on
127.0.0.1, a real HTTP server; over https with a CA of the test's own: tls_api), a client for it, the
operator running against it on a thread, and a scratch pin root for an agent's maps."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bpflb.control import operator as op
from bpflb.kubeapi import KubeClient, anonymous, write_kubeconfig
from bpflb_lab.apiserver import EmulatedAPI, TLSFiles, make_tls
from tests.control.helpers import RunningOperator


@pytest.fixture
def api() -> Iterator[EmulatedAPI]:
    server = EmulatedAPI()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return make_tls(tmp_path / "tls")


@pytest.fixture
def tls_api(tls: TLSFiles) -> Iterator[EmulatedAPI]:
    server = EmulatedAPI(tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client(api: EmulatedAPI) -> KubeClient:
    return KubeClient(anonymous(api.url))


@pytest.fixture
def kubeconfig(api: EmulatedAPI, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    write_kubeconfig(path, api.url)
    return path


@pytest.fixture
def start_operator(kubeconfig: Path) -> Iterator[Callable[..., RunningOperator]]:
    running: list[RunningOperator] = []

    def start(**options: Any) -> RunningOperator:
        runner = RunningOperator(op.OperatorOptions(kubeconfig=str(kubeconfig), reassert_interval=2.0,
                                                    uninstall_timeout=20.0, **options)).start()
        running.append(runner)
        return runner

    try:
        yield start
    finally:
        for runner in running:
            if runner.thread is not None and runner.thread.is_alive():
                runner.stop()


@pytest.fixture
def pin_root() -> Iterator[Path]:
    bpffs = Path("/sys/fs/bpf")
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1:3] == [str(bpffs), "bpf"] for line in f)
    if not mounted:
        os.system("mount -t bpf bpf /sys/fs/bpf")
    root = bpffs / f"bpflb-kt-{uuid.uuid4().hex[:8]}"
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
