"""The echo server (agnhost netexec subset) answered directly, from a node to a pod (client -> pod is not
routable in the lab: the client only reaches nodes)."""

from __future__ import annotations

import pytest

from bpflb_lab.lab import Lab
from bpflb_lab.lab.echo import udp_answer
from bpflb_lab.lab.probe import HttpProbe, Probe, UdpProbe


def test_udp_commands() -> None:
    assert udp_answer(b"hostname\n", "echo-a", ("1.2.3.4", 5)) == b"echo-a"
    assert udp_answer(b"clientip", "echo-a", ("1.2.3.4", 5)) == b"1.2.3.4:5"
    assert udp_answer(b"clientip \x00\xff" + b"z" * 3000, "echo-a", ("1.2.3.4", 5)) == b"1.2.3.4:5 \x00\xff" + b"z" * 3000
    assert udp_answer(b"echo hello world", "echo-a", ("1.2.3.4", 5)) == b"hello world"
    assert udp_answer(b"shell ls", "echo-a", ("1.2.3.4", 5)) is None


@pytest.mark.privileged
def test_http_hostname_clientip_echo(lab: Lab) -> None:
    assert lab.http_get("node2", "http://10.244.2.10:8080/hostname") == ("echo-a", None)
    body, err = lab.http_get("node2", "http://10.244.2.10:8080/clientip")
    assert err is None and body is not None and body.startswith("10.244.2.1:")
    assert lab.http_get("node2", "http://10.244.2.10:8080/echo?msg=hi%20there") == ("hi there", None)
    assert lab.http_get("node2", "http://10.244.2.10:8080/nope") == (None, "HTTP 404")


@pytest.mark.privileged
def test_http_keep_alive_serves_several_requests_on_one_connection(lab: Lab) -> None:
    result = lab.http_session("node1", "10.244.3.10", 8080, ["/hostname", "/clientip", "/echo?msg=3", "/hostname"])
    assert result.error is None
    assert result.replies[0] == "echo-b" and result.replies[2:] == ["3", "echo-b"]
    assert result.replies[1] == result.local, "all requests came over the same connection"


@pytest.mark.privileged
def test_udp_from_node_to_pod(lab: Lab) -> None:
    assert lab.udp_request("node3", "10.244.3.10", 8081, "hostname") == ("echo-b", None)
    reply, err = lab.udp_request("node1", "10.244.3.10", 8081, "clientip")
    assert err is None and reply is not None and reply.startswith("198.18.0.11:")
    assert lab.udp_request("node1", "10.244.3.10", 8081, "echo x y") == ("x y", None)
    assert lab.udp_request("node1", "10.244.3.10", 9999, "hostname") == (None, "connection refused")


@pytest.mark.privileged
def test_many_new_connections_from_one_process(lab: Lab) -> None:
    results = lab.connections("node1", "10.244.2.10", 8080, 100)
    assert all(r.ok and r.pod == "echo-a" for r in results)
    assert len({r.local for r in results}) == 100, "every request used a new connection"
    results = lab.connections("node1", "10.244.3.10", 8081, 50, proto="UDP", parallel=10)
    assert all(r.ok and r.pod == "echo-b" for r in results)


@pytest.mark.privileged
def test_probe_mixes_protocols_and_reports_errors(lab: Lab) -> None:
    results = lab.probe("node1", [HttpProbe("10.244.2.10", 8080, ("/hostname", "/clientip")),
                                  UdpProbe("10.244.3.10", 8081, ("hostname", "clientip")),
                                  HttpProbe("10.244.2.10", 1, timeout=0.5),
                                  HttpProbe("10.244.9.10", 8080, timeout=0.3)])
    assert results[0].pod == "echo-a" and results[0].client_ip == "198.18.0.11"
    assert results[1].pod == "echo-b" and results[1].client_ip == "198.18.0.11"
    assert results[2].error == "connection refused"
    assert results[3].error in ("timeout", "network unreachable", "no route to host")


@pytest.mark.privileged
def test_a_udp_probe_sends_from_the_port_it_is_given(lab: Lab) -> None:
    [result] = lab.probe("node2", [UdpProbe("10.244.2.10", 8081, ("clientip",), local_port=19990)])
    assert result.ok and result.local == "10.244.2.1:19990" and result.replies == ["10.244.2.1:19990"]


@pytest.mark.privileged
def test_each_check_sends_udp_from_ports_no_check_used_lately(lab: Lab) -> None:
    """lab.check's UDP probes are new flows for the datapath, never a live flow of an earlier check (which
    keeps the mode it started with across set_mode): their ports are taken in turn from CHECK_UDP_PORTS."""
    from bpflb_lab.lab.traffic import CHECK_UDP_PORTS

    probes: list[Probe] = [UdpProbe("198.18.0.11", 30081), HttpProbe("198.18.0.11", 30080), UdpProbe("198.18.0.12", 30181)]
    first = [p.local_port for p in lab.fresh_udp_ports(probes) if isinstance(p, UdpProbe)]
    second = [p.local_port for p in lab.fresh_udp_ports(probes) if isinstance(p, UdpProbe)]
    assert len(set(first + second)) == 4 and all(CHECK_UDP_PORTS[0] <= p < CHECK_UDP_PORTS[1] for p in first + second)
    assert lab.fresh_udp_ports(probes)[1] == probes[1]        # TCP: a new SYN is a new flow anyway
