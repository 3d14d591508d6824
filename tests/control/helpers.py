"""Helpers of the control-plane tests (the one home of them; fixtures are in conftest.py): API paths, the
condition wait, the ModuleConfig builder, the operator on a thread, the real agent on a scratch node, a free
port, Nodes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.control import operator as op
from bpflb.control.report import NodeReporter, agent_report
from bpflb.datapath.libbpf import ffi
from bpflb.kubeapi import KubeClient, KubeObject, load_config
from bpflb.sources.kube import KubeSource
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import ScratchNode, scratch_node

NODES = ("node1", "node2", "node3")
MC_PATH = "/apis/deckhouse.io/v1alpha1/moduleconfigs"
CM_PATH = "/api/v1/namespaces/kube-system/configmaps/bpflb-agent"
DS_PATH = "/apis/apps/v1/namespaces/kube-system/daemonsets/bpflb-agent"
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None | Literal[False]], timeout: float = 10.0,
             interval: float = 0.05) -> T:
    """Poll check() until it returns something truthy and return that; fail naming what was awaited. A check
    may say "not yet" with None or False (`cond and value`): what it returns is then never either."""
    deadline = time.monotonic() + timeout
    last: T | None | Literal[False] = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def existing(client: KubeClient, path: str) -> KubeObject:
    """The object at path, which the test expects to exist: a 404 fails the test naming the path."""
    obj = client.get(path)
    if obj is None:
        pytest.fail(f"{path}: not found (404), where the test expects the object")
    return obj


def module_config(mode: str = "SNAT", **settings: Any) -> dict[str, Any]:
    return {"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig", "metadata": {"name": "cni-cilium"},
            "spec": {"enabled": True, "version": 1, "settings": {"bpfLBMode": mode, **settings}}}


@dataclass
class RunningOperator:
    """The operator on a thread of its own; stop() ends it the way SIGTERM would."""

    options: op.OperatorOptions
    stop_flag: threading.Event = field(default_factory=threading.Event)
    ready_flag: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: list[BaseException] = field(default_factory=list)
    state: op.State | None = None

    def start(self) -> RunningOperator:
        self.state = op.State(client=KubeClient(load_config(self.options.kubeconfig)), options=self.options)

        def target() -> None:
            try:
                op.run(self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag, state=self.state)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error.append(exc)
        self.thread = threading.Thread(target=target, name="operator", daemon=True)
        self.thread.start()
        if not self.ready_flag.wait(20):
            pytest.fail(f"the operator did not become ready in 20s: {self.error}")
        return self

    def wait_rounds(self, what: str, rounds: int = 2, *, reasserts: int = 0) -> None:
        """Wait until the operator has done `rounds` more status rounds (and `reasserts` more re-assert rounds)
        than now: a condition on its own progress, for checks that something did not happen."""
        assert self.state is not None
        state = self.state
        want_rounds, want_reasserts = state.rounds + rounds, state.reasserts + reasserts
        wait_for(what, lambda: state.rounds >= want_rounds and state.reasserts >= want_reasserts, timeout=30)

    def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(20)
            assert not self.thread.is_alive(), "the operator did not stop within 20s"


@contextmanager
def agent_on_scratch_node(source: KubeSource, reporter: NodeReporter, pin_root: Path,
                          prefix: str) -> Iterator[tuple[Agent, ScratchNode]]:
    """The real agent for source's node (BPF maps under pin_root, tc on a scratch namespace's eth0) fed by
    source and reporting through reporter, on a thread of its own; stopped, joined and closed at the end."""
    source.start()                        # watchers in this (root) namespace, where the API listens
    ffi()                                 # the binding is built once, before two threads may use it
    reporter.start()
    with scratch_node(prefix) as sn:
        # No socket LB: it would attach to the host's cgroup root and catch every process of the machine.
        agent = Agent(AgentOptions(node_name=source.node_name, pin_root=pin_root, device="eth0", socket_lb=False),
                      source, on_sync=lambda a, r: reporter.update(agent_report(a, source, r)))

        def run() -> None:
            with entered(sn.ns):
                agent.run()

        worker = threading.Thread(target=run, name="agent")
        worker.start()
        try:
            yield agent, sn
        finally:
            agent.stop()
            source.close()
            worker.join(10)
            reporter.close()
            assert not worker.is_alive()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_nodes(client: KubeClient, names: tuple[str, ...] = NODES) -> None:
    for name in names:
        client.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
