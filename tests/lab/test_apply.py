"""`lab apply` / `lab delete` on a running lab: pods get namespaces, addresses and echo servers, and the
EndpointSlices the agents read follow the pods."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from bpflb_lab.lab import Lab, LabError, netns
from tests.lab.conftest import lab_running

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def mlab(privileged: None) -> Iterator[Lab]:
    """A lab of this module's own: these tests change its workload."""
    with lab_running(agents=False) as lab:
        yield lab


def endpoints(lab: Lab, service: str) -> dict[str, Any]:
    return {e["targetRef"]["name"]: (e["addresses"][0], e["nodeName"], e["conditions"]["ready"])
            for s in lab.endpoint_slices() if s["metadata"]["labels"]["kubernetes.io/service-name"] == service
            for e in s["endpoints"]}


POD_C = """
apiVersion: v1
kind: Pod
metadata: {name: echo-c, labels: {app: echo}}
spec:
  nodeName: node1
  containers:
    - name: echo
      ports: [{name: http, containerPort: 8080}, {name: udp, containerPort: 8081, protocol: UDP}]
"""


def test_apply_pod_regenerates_slices_and_delete_removes_it(mlab: Lab) -> None:
    assert endpoints(mlab, "echo") == {"echo-a": ("10.244.2.10", "node2", True),
                                       "echo-b": ("10.244.3.10", "node3", True)}
    assert mlab.apply(POD_C) == ["pod/echo-c created (node1, 10.244.1.10)"]
    assert endpoints(mlab, "echo")["echo-c"] == ("10.244.1.10", "node1", True)
    assert endpoints(mlab, "echo-local")["echo-c"] == ("10.244.1.10", "node1", True)
    assert mlab.http_get("node2", "http://10.244.1.10:8080/hostname") == ("echo-c", None)
    assert mlab.udp_request("node1", "10.244.1.10", 8081, "hostname") == ("echo-c", None)

    # same node, same ports, new labels: configured in place (same address), slices follow the labels
    relabelled = POD_C.replace("app: echo", "app: other")
    assert mlab.apply(relabelled) == ["pod/echo-c configured"]
    assert "echo-c" not in endpoints(mlab, "echo")
    assert mlab.pod_ip("echo-c") == "10.244.1.10"

    # another node: the pod moves (new namespace, new address)
    moved = POD_C.replace("nodeName: node1", "nodeName: node3")
    assert mlab.apply(moved) == ["pod/echo-c configured (node3, 10.244.3.11)"]
    assert endpoints(mlab, "echo")["echo-c"] == ("10.244.3.11", "node3", True)
    assert mlab.http_get("node1", "http://10.244.3.11:8080/hostname") == ("echo-c", None)
    assert mlab.http_get("node1", "http://10.244.1.10:8080/hostname", timeout=0.3)[1] is not None

    ns = mlab.netns("echo-c")
    assert mlab.delete("pod", "echo-c") == "pod/echo-c deleted"
    assert "echo-c" not in endpoints(mlab, "echo")
    assert not netns.netns_exists(ns)
    links = mlab.exec("node3", ["ip", "-o", "link", "show", "master", "cni0"]).stdout.splitlines()
    assert len(links) == 1, "only echo-b's veth is left on node3's cni0"


def test_apply_service_with_named_target_port_and_not_ready_pod(mlab: Lab) -> None:
    docs = [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web-1", "labels": {"app": "web"}},
         "spec": {"nodeName": "node2", "containers": [{"name": "c", "ports": [{"name": "www", "containerPort": 9000}]}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web-2", "labels": {"app": "web"}},
         "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [{"name": "www", "containerPort": 9000}]}]},
         "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                  "ports": [{"name": "www", "port": 80, "targetPort": "www"}]}},
    ]
    lines = mlab.apply(docs)
    assert lines[-1] == "service/web created (nodePort 30000/TCP; LoadBalancer 198.18.1.11)"
    eps = endpoints(mlab, "web")
    assert eps["web-1"][2] is True and eps["web-2"][2] is False
    [sl] = [s for s in mlab.endpoint_slices() if s["metadata"]["labels"]["kubernetes.io/service-name"] == "web"]
    assert sl["ports"] == [{"name": "www", "port": 9000, "protocol": "TCP"}]
    assert mlab.http_get("node1", "http://10.244.2.11:9000/hostname") == ("web-1", None)

    # replacing the Service keeps its allocations
    assert mlab.apply(yaml.safe_dump(docs[2])) == ["service/web configured (nodePort 30000/TCP; LoadBalancer 198.18.1.11)"]
    assert mlab.delete("service", "web") == "service/web deleted"
    assert endpoints(mlab, "web") == {}
    assert all(s["metadata"]["name"] != "web" for s in mlab.services())
    for name in ("web-1", "web-2"):
        mlab.delete("pod", name)


def test_apply_rejects_bad_input_without_changing_anything(mlab: Lab) -> None:
    before = (mlab.services(), mlab.endpoint_slices(), [p.key for p in mlab.pods()])
    bad_node = POD_C.replace("nodeName: node1", "nodeName: node9")
    with pytest.raises(LabError, match=r"spec.nodeName must name a lab node \(node1..node3\); got 'node9'"):
        mlab.apply(POD_C.replace("echo-c", "echo-d") + "---\n" + bad_node)
    with pytest.raises(LabError, match="nodePort 30080/TCP is already allocated to Service default/echo"):
        mlab.apply("kind: Service\nmetadata: {name: x}\nspec: {type: NodePort, ports: [{port: 1, nodePort: 30080}]}\n")
    assert (mlab.services(), mlab.endpoint_slices(), [p.key for p in mlab.pods()]) == before


def test_cluster_directory_holds_what_the_agents_read(mlab: Lab) -> None:
    files = sorted(p.name for p in mlab.paths.cluster.iterdir())
    assert "configmap-kube-system-bpflb-agent.yaml" in files
    assert {"node-node1.yaml", "node-node2.yaml", "node-node3.yaml", "service-default-echo.yaml"} <= set(files)
    assert not [f for f in files if f.startswith(".")], "no temporary files left behind"
    node2 = yaml.safe_load((mlab.paths.cluster / "node-node2.yaml").read_text())
    assert node2["spec"]["podCIDR"] == "10.244.2.0/24"
    assert {"type": "InternalIP", "address": "198.18.0.12"} in node2["status"]["addresses"]
    assert {"type": "Hostname", "address": "node2"} in node2["status"]["addresses"]
    config = yaml.safe_load((mlab.paths.cluster / "configmap-kube-system-bpflb-agent.yaml").read_text())
    assert config["data"]["bpfLBMode"] == "SNAT"
    assert config["data"]["tunnelMode"] == "Disabled" and config["data"]["createNodeRoutes"] == "true"
