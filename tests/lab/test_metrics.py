"""The agent's metrics endpoint in the lab: each node's real agent serves Prometheus metrics and its probes
on port 9962 of the node's own network namespace; scraped there, the datapath's counters move with this
test's own traffic (new flows on one frontend, drops by reason on an eTP Local frontend without a local
endpoint), map fill levels follow what is programmed and open, and the probes say ready and live."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpflb_lab.lab import Lab
from bpflb_lab.lab.supervise import METRICS_PORT
from tests.lab.conftest import lab_running
from tests.lab.helpers import wait_programmed, wait_until

pytestmark = pytest.mark.privileged

NODE1 = "198.18.0.11"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running() as shared:          # real agents, each serving its metrics in its node's namespace
        yield shared


def get(lab: Lab, node: str, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:9962<path> from inside the node's namespace (where the agent listens)."""
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=5) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
    return lab.run_in(node, fetch)


def scrape(lab: Lab, node: str) -> dict[str, float]:
    status, text = get(lab, node, "/metrics")
    assert status == 200, text
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_agent_metrics_move_with_the_test_traffic(lab: Lab) -> None:
    wait_programmed(lab, ("node1",), f"{NODE1}:30080/TCP", lambda fe: bool(fe and fe["backends"]), "with backends")
    assert get(lab, "node1", "/readyz") == (200, "synced\n")
    assert get(lab, "node1", "/healthz")[0] == 200
    before = scrape(lab, "node1")
    assert before["bpflb_syncs_total{result=ok}"] >= 1
    assert before["bpflb_last_successful_sync_timestamp_seconds{}"] > 0
    assert before["bpflb_map_pressure{map_name=lb_services}"] > 0
    assert before["bpflb_frontends{}"] >= 1

    # Five new connections through node1: five new flows there, and conntrack entries for them.
    for _ in range(5):
        body, err = lab.http_get("client", f"http://{NODE1}:30080/hostname")
        assert err is None and body
    # One SYN to echo-local on node1, which has no local endpoint (eTP Local): dropped, by reason.
    assert lab.http_get("client", f"http://{NODE1}:30180/hostname", timeout=0.5) == (None, "timeout")

    after = wait_until("the counters scraped after the traffic",
                       lambda: (got := scrape(lab, "node1"))["bpflb_datapath_packets_total{counter=new_flow}"]
                       >= before["bpflb_datapath_packets_total{counter=new_flow}"] + 5 and got)
    drops = "bpflb_drop_count_total{reason=no_local_backend}"
    assert after[drops] >= before[drops] + 1
    # Fill levels are counted at most every few seconds (a scrape storm costs nothing): wait for a fresh one.
    after = wait_until("the flows in the conntrack fill level",
                       lambda: (got := scrape(lab, "node1"))["bpflb_map_entries{map_name=ct_fwd}"] >= 5 and got)
    assert after["bpflb_map_pressure{map_name=ct_fwd}"] == pytest.approx(
        after["bpflb_map_entries{map_name=ct_fwd}"] / after["bpflb_map_capacity{map_name=ct_fwd}"])
    # Another node saw none of it.
    other = scrape(lab, "node3")
    assert other["bpflb_drop_count_total{reason=no_local_backend}"] == 0
