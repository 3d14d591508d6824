"""The lab as an API server and endpoint controller for what issue 16 adds: EndpointSlices a user applies
(for selector-less Services) reach the agents and the wire; eTP Local LoadBalancer Services get a
healthCheckNodePort allocated as the API server does; the controller's slices carry their Service's labels
(and say headless); `lab set` changes settings through the one schema; `lab status | head` ends quietly."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb_lab.lab import Lab, LabError, cluster
from tests.lab.conftest import lab_running
from tests.lab.helpers import frontend, wait_until


def service(name: str = "s", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80}]}
    body.update(spec)
    return {"kind": "Service", "metadata": {"name": name}, "spec": body}


# -- without root: validation and allocation ---------------------------------------------------------------------


def test_etp_local_loadbalancers_get_a_health_check_node_port_as_from_the_api_server() -> None:
    a = cluster.validate_service(service("a", type="LoadBalancer", externalTrafficPolicy="Local"), [], None)
    assert a["spec"]["ports"][0]["nodePort"] == 30000 and a["spec"]["healthCheckNodePort"] == 30001
    b = cluster.validate_service(service("b", type="LoadBalancer", externalTrafficPolicy="Local"), [a], None)
    assert b["spec"]["ports"][0]["nodePort"] == 30002 and b["spec"]["healthCheckNodePort"] == 30003
    again = cluster.validate_service(service("a", type="LoadBalancer", externalTrafficPolicy="Local"), [b], a)
    assert again["spec"]["healthCheckNodePort"] == 30001, "a replaced Service keeps its health check port"
    cluster_policy = cluster.validate_service(service("a", type="LoadBalancer"), [b], a)
    assert "healthCheckNodePort" not in cluster_policy["spec"]
    with pytest.raises(LabError, match="healthCheckNodePort 30003 is already allocated to Service default/b"):
        cluster.validate_service(service("c", type="LoadBalancer", externalTrafficPolicy="Local",
                                         healthCheckNodePort=30003), [b], None)
    with pytest.raises(LabError, match="only for type LoadBalancer with externalTrafficPolicy Local"):
        cluster.validate_service(service("c", healthCheckNodePort=31000), [], None)
    with pytest.raises(LabError, match="nodePort 30001/TCP is already allocated to Service default/a"):
        cluster.validate_service(service("c", ports=[{"port": 80, "nodePort": 30001}]), [a], None)


def test_user_endpointslices_are_checked_like_the_api_server_does() -> None:
    good = {"kind": "EndpointSlice", "metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.2.10"]}]}
    checked = cluster.validate_endpoint_slice(good)
    assert checked["metadata"]["namespace"] == "default" and checked["ports"][0]["protocol"] == "TCP"
    for change, message in (({"metadata": {"name": "s-1"}}, "must name the Service"),
                            ({"addressType": "IPX"}, "addressType must be IPv4, IPv6 or FQDN"),
                            ({"endpoints": [{"addresses": ["10.244.2.999"]}]}, r"endpoints\[0\].addresses\[0\]"),
                            ({"endpoints": [{"addresses": []}]}, "must be a non-empty list")):
        with pytest.raises(LabError, match=message):
            cluster.validate_endpoint_slice({**good, **change})
    managed = {**good, "metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s",
                                                              cluster.MANAGED_BY_LABEL: cluster.MANAGED_BY}}}
    with pytest.raises(LabError, match="marks the lab's own slices"):
        cluster.validate_endpoint_slice(managed)


def test_the_controllers_slices_carry_the_services_labels_and_say_headless() -> None:
    svc = cluster.validate_service({**service(type="ClusterIP", clusterIP="None"),
                                    "metadata": {"name": "s", "labels": {"team": "a"}}}, [], None)
    [one] = cluster.endpoint_slices(svc, [])
    assert one["metadata"]["labels"] == {"team": "a", "kubernetes.io/service-name": "s",
                                         cluster.MANAGED_BY_LABEL: cluster.MANAGED_BY,
                                         "service.kubernetes.io/headless": ""}


# -- a running lab ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alab(privileged: None) -> Iterator[Lab]:
    with lab_running() as lab:
        yield lab


SELECTORLESS = """\
apiVersion: v1
kind: Service
metadata: {name: external}
spec:
  type: NodePort
  ports: [{name: http, protocol: TCP, port: 80, nodePort: 31200}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: external-1
  labels: {kubernetes.io/service-name: external}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [%s]
  conditions: {ready: true}
  nodeName: node3
"""


@pytest.mark.privileged
def test_a_selectorless_service_with_an_applied_endpointslice_reaches_its_endpoint(alab: Lab) -> None:
    echo_b = alab.pod_ip("echo-b")
    assert alab.apply(SELECTORLESS % echo_b) == ["service/external created (nodePort 31200/TCP)",
                                                  "endpointslice.discovery.k8s.io/external-1 created"]
    try:
        wait_until("node1 programmed the slice's endpoint", lambda: (fe := frontend(alab, "node1", "198.18.0.11:31200/TCP"))
                   and fe["backends"] == [f"{echo_b}:8080"])
        assert alab.http_get("client", "http://198.18.0.11:31200/hostname") == ("echo-b", None)
        status = {s["name"]: s for s in alab.status()["services"]}["default/external"]
        assert [e["address"] for e in status["endpoints"]] == [echo_b]
        # The lab's controller leaves the user's slice alone when it regenerates its own.
        alab.apply("kind: Pod\nmetadata: {name: bystander, labels: {app: nothing}}\nspec: {nodeName: node1}\n")
        assert [s["metadata"]["name"] for s in alab.endpoint_slices()
                if s["metadata"]["labels"]["kubernetes.io/service-name"] == "external"] == ["external-1"]
        assert alab.delete("endpointslice", "external-1") == "endpointslice.discovery.k8s.io/external-1 deleted"
        wait_until("the frontend without endpoints", lambda: (fe := frontend(alab, "node1", "198.18.0.11:31200/TCP"))
                   is None or fe["backends"] == [])
        with pytest.raises(LabError, match="is the lab's own"):
            alab.delete("endpointslice", next(s["metadata"]["name"] for s in alab.endpoint_slices()
                                              if s["metadata"]["labels"]["kubernetes.io/service-name"] == "echo"))
    finally:
        alab.delete("service", "external")
        alab.delete("pod", "bystander")


@pytest.mark.privileged
def test_lab_set_goes_through_the_one_schema(alab: Lab) -> None:
    assert alab.set_settings(svcSourceRangeCheck=True) == ["svcSourceRangeCheck=True"]
    assert alab.state().settings == {"svcSourceRangeCheck": True}
    assert alab.cluster.objects("ConfigMap")[0]["data"]["svcSourceRangeCheck"] == "true"
    with pytest.raises(LabError, match="svcSourceRangeCheck"):
        alab.set_settings(svcSourceRangeCheck="yes")
    with pytest.raises(LabError, match="bpfLBMode: set with `bpflb lab up` or `bpflb lab mode`"):
        alab.set_settings(bpfLBMode="DSR")
    alab.set_mode("DSR")                                   # the mode keeps the other settings
    assert alab.cluster.objects("ConfigMap")[0]["data"]["svcSourceRangeCheck"] == "true"
    alab.set_mode("SNAT")
    proc = subprocess.run([sys.executable, "-m", "bpflb", "lab", "set", "--name", alab.name, "svcSourceRangeCheck=false"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and alab.state().settings == {"svcSourceRangeCheck": False}, proc.stderr


@pytest.mark.privileged
def test_lab_status_into_a_closed_pipe_ends_quietly(alab: Lab) -> None:
    # `true` has exited long before Python writes: the write meets a pipe without a reader (EPIPE).
    proc = subprocess.run(f"{sys.executable} -m bpflb lab status --name {alab.name} | true; echo $PIPESTATUS",
                          shell=True, capture_output=True, text=True, check=False, executable="/bin/bash")
    assert proc.stdout.strip() == "0" and proc.stderr == "", proc.stderr
    head = subprocess.run(f"{sys.executable} -m bpflb lab status --name {alab.name} | head -1", shell=True,
                          capture_output=True, text=True, check=False)
    assert head.stdout.startswith(f"lab {alab.name}: up") and head.stderr == "", head.stderr
