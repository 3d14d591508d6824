"""kube-proxy's health servers as the agent serves them (bpflb.healthcheck), without root: the proxy's health
rule (healthy while starting, while a noticed change is synced within the timeout, and /healthz failing for a
Node being deleted or tainted for deletion while /livez does not), kube-proxy's bodies, and the HTTP servers on
loopback: a healthCheckNodePort answering 200 or 503 as its endpoint count changes, closing when its Service
goes, and a port in use reported and retried. The agent feeds them after every sync."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.datapath.memory import MemoryDatapath
from bpflb.healthcheck import HealthServers, ProxyHealth, go_time, node_eligible, service_answer
from bpflb.model.types import HealthCheck
from bpflb.sources.base import Snapshot
from tests.unit.helpers import NODE, endpoint, endpoint_slice, lb_service, node

GO_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_proxy_is_healthy_while_changes_are_synced_within_the_timeout() -> None:
    clock = Clock()
    health = ProxyHealth(timeout=60, clock=clock)
    assert health.healthy()                                  # starting up
    health.queued_update()
    clock.now += 120
    assert health.healthy()                                  # never synced yet: still starting up
    health.updated()
    health.queued_update()
    clock.now += 59
    assert health.healthy()                                  # pending, not late yet
    clock.now += 2
    assert not health.healthy()
    status, body = health.answer("/healthz")
    assert status == 503 and re.fullmatch(rf'\{{"lastUpdated": "{GO_TIME}","currentTime": "{GO_TIME}", '
                                          r'"nodeEligible": true\}', body), body
    assert json.loads(body)["lastUpdated"] != json.loads(body)["currentTime"]
    health.updated()
    assert health.answer("/livez")[0] == 200


def test_healthz_fails_for_a_node_leaving_the_cluster_and_livez_does_not() -> None:
    health = ProxyHealth(timeout=60)
    health.updated()
    assert node_eligible({"metadata": {"name": "n"}}) and node_eligible(None)
    assert not node_eligible({"metadata": {"name": "n", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
    tainted = {"metadata": {"name": "n"}, "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler"}]}}
    assert not node_eligible(tainted)
    health.set_node_eligible(False)
    status, body = health.answer("/healthz")
    assert status == 503 and json.loads(body)["nodeEligible"] is False
    status, body = health.answer("/livez")
    assert status == 200 and set(json.loads(body)) == {"lastUpdated", "currentTime"}
    assert json.loads(body)["lastUpdated"] == json.loads(body)["currentTime"]    # healthy: "recent"
    assert health.answer("/metrics")[0] == 404


def test_go_time_prints_like_go() -> None:
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(0.25) == "1970-01-01 00:00:00.25 +0000 UTC"
    assert go_time(86400) == "1970-01-02 00:00:00 +0000 UTC"


def test_a_health_check_answers_with_kube_proxys_body() -> None:
    status, body = service_answer(HealthCheck(32000, "default", "echo-lb", 2), True)
    assert status == 200
    assert body == ('{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "echo-lb"\n\t},\n'
                    '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert service_answer(HealthCheck(32000, "default", "echo-lb", 0), True)[0] == 503
    assert service_answer(HealthCheck(32000, "default", "echo-lb", 2), False)[0] == 503


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/") -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture
def servers() -> Any:
    health = ProxyHealth(timeout=60)
    proxy_port = free_port()
    srv = HealthServers(health, ("127.0.0.1", proxy_port))
    try:
        assert srv.start() == []
        yield srv, proxy_port
    finally:
        srv.close()


def test_the_servers_follow_every_sync_on_real_sockets(servers: Any) -> None:
    from ipaddress import IPv4Address

    srv, proxy_port = servers
    loopback = (IPv4Address("127.0.0.1"),)
    port = free_port()
    assert srv.sync({port: HealthCheck(port, "default", "echo-lb", 1)}, loopback) == []
    status, body, headers = get(port, "/anything")
    assert status == 200 and body["localEndpoints"] == 1 and body["service"] == {"namespace": "default",
                                                                                   "name": "echo-lb"}
    assert headers["Content-Type"] == "application/json" and headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    srv.sync({port: HealthCheck(port, "default", "echo-lb", 0)}, loopback)        # the local pod went unready
    assert get(port)[0] == 503 and get(port)[1]["localEndpoints"] == 0
    status, body, _ = get(proxy_port, "/healthz")
    assert status == 200 and body["nodeEligible"] is True
    srv.sync({}, loopback)                                                          # the Service went
    with pytest.raises(urllib.error.URLError):
        get(port)
    assert get(proxy_port, "/livez")[0] == 200                                     # the proxy's stays


def test_a_port_in_use_is_reported_and_retried(servers: Any) -> None:
    from ipaddress import IPv4Address

    srv, _ = servers
    port = free_port()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    check = {port: HealthCheck(port, "default", "echo-lb", 1)}
    problems = srv.sync(check, (IPv4Address("127.0.0.1"),))
    assert len(problems) == 1 and f"127.0.0.1:{port}" in problems[0] and "EADDRINUSE" in problems[0]
    squatter.close()
    assert srv.sync(check, (IPv4Address("127.0.0.1"),)) == []
    assert get(port)[0] == 200


class Source:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def snapshot(self) -> Snapshot:
        return self.snap

    def wait_for_change(self, timeout: float) -> bool:
        return False


def test_the_agent_hands_its_health_checks_to_the_servers_after_each_sync(tmp_path: Path) -> None:
    svc = lb_service(externalTrafficPolicy="Local", healthCheckNodePort=31999)   # served on 192.168.0.10: not here
    slices = [endpoint_slice(endpoints=[endpoint("10.0.1.1", NODE, "echo-1")])]
    source = Source(Snapshot(services=[svc], endpointslices=slices, nodes=[node()], config={"bpfLBMode": "SNAT"}))
    opts = AgentOptions(NODE, tmp_path, device="eth0", health_servers=True,
                        healthz_bind_address=f"127.0.0.1:{free_port()}")
    agent = Agent(opts, source, datapath=MemoryDatapath())
    agent.start()
    try:
        agent.run_once()
        assert agent.health_servers is not None
        port = svc["spec"]["healthCheckNodePort"]
        assert agent.health_servers.answer(port, "/")[0] == 200
        assert agent.health.healthy()
        source.snap.endpointslices = [endpoint_slice(endpoints=[endpoint("10.0.1.1", NODE, "echo-1", ready=False)])]
        agent.run_once()
        status, body, _ = agent.health_servers.answer(port, "/")
        assert status == 503 and json.loads(body)["localEndpoints"] == 0
        # The node's address is not on this machine: said (once), and retried at every sync.
        assert any("cannot listen" in p for p in agent._problems_seen)
    finally:
        if agent.health_servers is not None:
            agent.health_servers.close()
