"""The operator as more than one replica and over time: two operator processes against the emulated API
(over https, each with a token of its own, so every request says which replica made it): only the one
holding the Lease writes anything; SIGKILL it and the other takes over within a lease duration; a clean stop
releases the Lease. Reports of Nodes that are gone are removed. kopf logs in with the same credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpflb.control import operator as op_module
from bpflb.control.leader import LeaseTimes
from bpflb.control.operator import LeadershipLost, status_loop_alive
from bpflb.control.report import now_rfc3339, orphaned
from bpflb.kubeapi import KubeClient, load_config, write_kubeconfig
from bpflb_lab.apiserver import EmulatedAPI, TLSFiles
from tests.control.helpers import (
    CM_PATH,
    MC_PATH,
    RunningOperator,
    add_nodes,
    existing,
    free_port,
    module_config,
    wait_for,
)

LEASE = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/bpflb-operator"
WRITES = ("POST", "PATCH", "PUT", "DELETE")


class Replica:
    """`bpflb operator` in a process of its own, with its own token and identity."""

    def __init__(self, name: str, api: EmulatedAPI, tls: TLSFiles, tmp_path: Path) -> None:
        self.name = name
        self.token = f"token-of-{name}"
        self.kubeconfig = tmp_path / f"kubeconfig-{name}"
        write_kubeconfig(self.kubeconfig, api.url, token=self.token, ca_file=str(tls.ca))
        self.log = tmp_path / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bpflb", "operator", "--kubeconfig", str(self.kubeconfig),
                 "--identity", name, "--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.3"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def said(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def replicas(tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path) -> Iterator[Callable[[str], Replica]]:
    started: list[Replica] = []

    def start(name: str) -> Replica:
        replica = Replica(name, tls_api, tls, tmp_path)
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            replica.stop(signal.SIGKILL)


def writes_by(api: EmulatedAPI, replica: Replica) -> list[str]:
    return [f"{r.method} {r.path}" for r in api.requests()
            if r.method in WRITES and r.authorization == f"Bearer {replica.token}"]


def holder(client: KubeClient) -> Any:
    lease = client.get(LEASE)
    return (lease or {}).get("spec", {}).get("holderIdentity")


def test_two_replicas_one_acts_and_the_other_takes_over(tls_api: EmulatedAPI, tls: TLSFiles, tmp_path: Path,
                                                       replicas: Callable[[str], Replica]) -> None:
    admin = tmp_path / "kubeconfig-admin"
    write_kubeconfig(admin, tls_api.url, token="admin", ca_file=str(tls.ca))
    client = KubeClient(load_config(str(admin)))
    add_nodes(client)
    client.create(MC_PATH, module_config("SNAT"))

    a = replicas("replica-a")
    wait_for("replica-a to lead", lambda: holder(client) == "replica-a", timeout=30)
    wait_for("the agents' ConfigMap", lambda: client.get(CM_PATH) is not None, timeout=30)
    b = replicas("replica-b")
    wait_for("replica-b to stand by", lambda: b.said("replica-b stands by"), timeout=30)

    # Only the leader acts: it applies a change; the standby writes nothing at all (kopf's requests included).
    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"bpfLBMode": "DSR"}}})
    wait_for("DSR applied", lambda: (client.get(CM_PATH) or {}).get("data", {}).get("bpfLBMode") == "DSR", timeout=30)
    wait_for("the status written", lambda: (client.get(f"{MC_PATH}/cni-cilium") or {}).get("status"), timeout=30)
    assert any("/configmaps" in w for w in writes_by(tls_api, a))
    assert any(w.endswith("/cni-cilium/status") for w in writes_by(tls_api, a))
    assert writes_by(tls_api, b) == []
    assert holder(client) == "replica-a"

    # The leader dies without a word: after a lease duration the standby takes the Lease and acts.
    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for("replica-b to take over", lambda: holder(client) == "replica-b", timeout=30)
    assert time.monotonic() - killed >= 2.0           # not before the dead leader's lease could have run out
    assert existing(client, LEASE)["spec"]["leaseTransitions"] == 1
    client.merge_patch(f"{MC_PATH}/cni-cilium", {"spec": {"settings": {"bpfLBMode": "Hybrid"}}})
    wait_for("Hybrid applied by replica-b",
             lambda: (client.get(CM_PATH) or {}).get("data", {}).get("bpfLBMode") == "Hybrid", timeout=30)
    assert any(w.startswith("PATCH") and w.endswith("/configmaps/bpflb-agent") for w in writes_by(tls_api, b))

    # A clean stop gives the Lease up at once.
    b.stop(signal.SIGTERM)
    assert b.proc.returncode == 0, b.log.read_text()[-2000:]
    assert not holder(client)


def test_reports_of_deleted_nodes_are_removed(client: KubeClient,
                                             start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    for node in ("node1", "node2", "node3"):
        client.create("/api/v1/namespaces/kube-system/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"bpflb-node-{node}", "namespace": "kube-system",
                         "labels": {"app.kubernetes.io/name": "bpflb", "app.kubernetes.io/component": "node-report"}},
            "data": {"node": node, "state": "Ready", "updated": now_rfc3339()}})
    client.create(MC_PATH, module_config("SNAT"))
    op = start_operator(report_gc_after=0.5)
    op.wait_rounds("a few status rounds", rounds=3)
    assert all(client.get(f"/api/v1/namespaces/kube-system/configmaps/bpflb-node-{n}") for n in ("node1", "node2",
                                                                                                  "node3"))
    client.delete("/api/v1/nodes/node3")
    wait_for("node3's report removed",
             lambda: client.get("/api/v1/namespaces/kube-system/configmaps/bpflb-node-node3") is None)
    op.wait_rounds("more status rounds", rounds=3)
    assert client.get("/api/v1/namespaces/kube-system/configmaps/bpflb-node-node1") is not None
    assert client.get("/api/v1/namespaces/kube-system/configmaps/bpflb-node-node2") is not None
    assert op.state is not None and op.state.reports_removed == 1


def test_only_quiet_reports_of_missing_nodes_are_garbage() -> None:
    now = 1_000_000.0
    stamp = "1970-01-12T13:46:40.000000Z"         # == now
    old = "1970-01-12T13:40:00.000000Z"           # 400 s before
    reports = {"kept": {"updated": old}, "fresh-without-node": {"updated": stamp},
               "gone": {"updated": old}, "unreadable": {"updated": "yesterday"}}
    assert orphaned(reports, {"kept"}, now, after=120) == ["gone", "unreadable"]
    assert orphaned(reports, {"kept"}, now + 121, after=120) == ["fresh-without-node", "gone", "unreadable"]


def test_the_operator_serves_its_probe_and_metrics(client: KubeClient,
                                                  start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("SNAT"))
    health, metrics = free_port(), free_port()
    op = start_operator(health_listen=f"127.0.0.1:{health}", metrics_listen=f"127.0.0.1:{metrics}")
    op.wait_rounds("status rounds", rounds=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status-loop"]["leader"] is True

    def scraped() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    wait_for("the metrics", lambda: scraped().get("bpflb_operator_nodes[('state', 'total')]") == 3)
    got = scraped()
    assert got["bpflb_operator_leader[]"] == 1
    assert got["bpflb_operator_reconciles_total[('result', 'ok')]"] >= 1
    assert got["bpflb_operator_status_rounds_total[]"] >= 2

    # The liveness check behind /healthz fails once the status loop stops turning.
    assert op.state is not None
    memo = kopf.Memo(state=op.state)
    assert status_loop_alive(memo)["rounds"] >= 2
    stuck = op_module.State(client=client, options=op.options)
    stuck.last_round = time.monotonic() - 2 * op_module.STATUS_STALE
    with pytest.raises(kopf.PermanentError, match="the status loop has not turned for"):
        status_loop_alive(kopf.Memo(state=stuck))


def test_a_leader_that_cannot_renew_its_lease_stops_acting(api: EmulatedAPI, client: KubeClient,
                                                           start_operator: Callable[..., RunningOperator]) -> None:
    add_nodes(client)
    client.create(MC_PATH, module_config("SNAT"))
    op = start_operator(lease=LeaseTimes(duration=3, renew_deadline=2, retry_period=0.3))
    wait_for("the agents' ConfigMap", lambda: client.get(CM_PATH) is not None)
    api.stop()                                   # a partition: no renewal gets through
    wait_for("the operator to stop acting", lambda: op.thread is not None and not op.thread.is_alive(), timeout=30)
    assert len(op.error) == 1 and isinstance(op.error[0], LeadershipLost), op.error
    assert "lost the Lease kube-system/bpflb-operator" in str(op.error[0])
