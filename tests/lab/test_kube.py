"""The lab with Kubernetes (`lab up --kube`): the emulated API and the operator on the control-plane host,
real agents on the nodes list+watching it. The mode is changed the operator's way, by patching the
ModuleConfig through the API, and so is an invalid value (the emulator calls no admission webhook, so it
reaches the operator, which must keep the last valid configuration)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpflb.inspect import collect
from bpflb_lab.lab import Lab, kube
from tests.lab.conftest import lab_running
from tests.lab.helpers import HeldConnection
from tests.lab.helpers import wait_until as wait

pytestmark = pytest.mark.privileged

CLIENT = "198.18.0.100"
NODE1 = "198.18.0.11"


@pytest.fixture(scope="module")
def lab(privileged: None) -> Iterator[Lab]:
    with lab_running(kube=True) as shared:
        yield shared


def mc(lab: Lab) -> dict[str, Any]:
    obj: dict[str, Any] = kube.call(lab, "get", kube.MC_PATH)
    return obj


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def datapath(lab: Lab) -> dict[str, Any]:
    return {node: {k: v for k, v in collect(lab.pin_root / node).items() if k in ("mode", "frontends")}
            for node in ("node1", "node2", "node3")}


def test_the_lab_runs_on_the_api(lab: Lab) -> None:
    st = lab.status()
    assert st["kube"]["host"] == "control-plane"
    assert st["kube"]["kubeconfig"].endswith("/kubeconfig")
    assert any(h["name"] == "control-plane" and h["ip"] == "198.18.0.2" for h in st["hosts"])
    assert "--kube" in json.dumps(lab.state().agent_cmd)
    services = {s["metadata"]["name"] for s in kube.call(lab, "list", "/api/v1/services")}
    assert {"echo", "echo-local", "echo-lb"} <= services
    report = lab.check()
    assert report.ok, report.render()
    obj = wait("the status Ready on SNAT", lambda: (o := mc(lab)) and
               condition(o, "Ready").get("status") == "True" and o, 10)
    assert obj["status"]["bpfLBMode"] == "SNAT" and obj["status"]["nodes"]["ready"] == "3/3"


def test_an_agent_restarted_on_the_api_programs_page_by_page_and_keeps_every_flow(lab: Lab) -> None:
    """node1's agent restarted with list pages of one object programs the Services as their list comes in
    (partial syncs, which never remove what is not listed yet): a connection opened before through node1
    keeps its backend and SNAT source across the restart, no frontend is removed on the way, and every
    frontend still answers after."""
    conn = HeldConnection(lab, "client", NODE1, 30080)
    try:
        first = conn.ask()
        assert not first.startswith("ERROR"), first
        log = lab.paths.agent_log("node1")
        offset = log.stat().st_size
        lab.restart_agent("node1", args=["--list-page-size", "1"])
        text = log.read_bytes()[offset:].decode(errors="replace")
        partial = re.search(r"programmed the Services as they were listed, in (\d+) partial syncs .* (\d+) removed\)",
                            text)
        assert partial is not None and int(partial.group(1)) >= 2, text[-3000:]
        assert partial.group(2) == "0", partial.group(0)      # not even the Services listed later, for a while
        assert not re.search(r"bpflb\.agent: removed ", text), text[-3000:]
        assert all(n == "0" for n in re.findall(r"sync: \d+ frontends added, (\d+) removed", text)), text[-3000:]
        assert conn.ask() == first            # the same backend, and the same SNAT source the pod saw
    finally:
        conn.close()
    report = lab.check()
    assert report.ok, report.render()


def test_patching_the_module_config_to_dsr_preserves_the_client_address(lab: Lab) -> None:
    start = time.monotonic()
    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "DSR"}}})

    def client_seen_by_remote_pods() -> bool:
        results = lab.connections("client", NODE1, 30080, 6, request="/clientip", timeout=0.5)
        return any(r.ok for r in results) and \
            all(r.ok and r.replies[0].rsplit(":", 1)[0] == CLIENT for r in results)

    wait("/clientip via node1:30080 shows the client's address", client_seen_by_remote_pods, 10)
    obj = wait("the ModuleConfig status: all nodes on DSR", lambda: (o := mc(lab)) and
               o["status"].get("nodes", {}).get("byMode") == [{"mode": "DSR", "nodes": 3}] and
               condition(o, "Ready").get("status") == "True" and o, max(1.0, 10 - (time.monotonic() - start)))
    assert obj["status"]["bpfLBMode"] == "DSR"
    assert obj["status"]["message"] == "Ready: 3/3 nodes run DSR, tunnel Disabled"
    assert time.monotonic() - start < 10


def test_an_invalid_value_keeps_the_last_valid_configuration_running(lab: Lab) -> None:
    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "DSR"}}})
    wait("DSR everywhere", lambda: all(d["mode"] == "DSR" for d in datapath(lab).values()), 10)
    config = kube.call(lab, "get", "/api/v1/namespaces/kube-system/configmaps/bpflb-agent")["data"]
    before = datapath(lab)

    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "dsr"}}})
    obj = wait("Degraded with the reason", lambda: (o := mc(lab)) and
               condition(o, "Degraded").get("reason") == "InvalidConfiguration" and o, 10)
    message = condition(obj, "Degraded")["message"]
    assert 'spec.settings.bpfLBMode: must be one of SNAT, DSR, Hybrid; got "dsr"' in message
    assert "the last valid configuration (bpfLBMode DSR, tunnelMode Disabled) stays in force" in message
    wait("the operator's reconcile refused it (its Warning Event)", lambda: any(
        e.get("reason") == "InvalidConfiguration" for e in kube.call(lab, "list", "/api/v1/events")), 10)
    assert kube.call(lab, "get", "/api/v1/namespaces/kube-system/configmaps/bpflb-agent")["data"] == config
    assert datapath(lab) == before
    assert obj["status"]["bpfLBMode"] == "DSR"
    body, err = lab.http_get("client", f"http://{NODE1}:30080/clientip")
    assert err is None and body is not None and body.startswith(CLIENT)
    events = [e["message"] for e in kube.call(lab, "list", "/api/v1/events")]
    assert any(m.startswith("not applied: spec.settings.bpfLBMode") for m in events)

    kube.call(lab, "patch", kube.MC_PATH, {"spec": {"settings": {"bpfLBMode": "SNAT"}}})
    wait("back on SNAT and not Degraded", lambda: (o := mc(lab)) and
         condition(o, "Degraded").get("status") == "False" and o["status"]["bpfLBMode"] == "SNAT", 10)


def test_services_changed_through_the_api_reach_the_datapath(lab: Lab) -> None:
    lab.apply("kind: Service\nmetadata: {name: api-svc}\nspec: {type: NodePort, selector: {app: echo}, "
              "ports: [{port: 80, targetPort: 8080, nodePort: 30500}]}\n")
    wait("the new frontend on every node", lambda: all(
        any(f["frontend"] == f"198.18.0.1{k}:30500/TCP" for f in datapath(lab)[f"node{k}"]["frontends"])
        for k in (1, 2, 3)), 10)
    lab.delete("service", "api-svc")
    wait("the frontend gone", lambda: not any(f["frontend"].endswith(":30500/TCP")
                                              for d in datapath(lab).values() for f in d["frontends"]), 10)


# -- the docs' kubectl walkthrough, with the real kubectl -----------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def walkthrough() -> list[tuple[str, str | None, str | None]]:
    """(command, its stdin, the output the doc shows after it) for every kubectl command of the doc's
    "kubectl walkthrough" section: its shell blocks (heredocs as stdin), then the `kubectl ...` spans of its
    text; an output block after a shell block belongs to that block's last `kubectl get`."""
    section = DOC.read_text().split("## kubectl walkthrough", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, str | None, str | None]] = []
    for block, output in re.findall(r"```sh\n(.*?)```\n(?:```\n(.*?)```)?", section, re.DOTALL):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line, stdin = lines[i], None
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i)
                stdin, line, i = "\n".join(lines[i + 1:end]) + "\n", line[:heredoc.start()].strip(), end
            steps.append((line, stdin, None))
            i += 1
        if output:
            last = max(k for k, (cmd, _, _) in enumerate(steps) if cmd.startswith("kubectl get"))
            steps[last] = (steps[last][0], steps[last][1], output)
    prose = re.sub(r"```.*?```", "", section, flags=re.DOTALL)
    steps += [(span, None, None) for span in re.findall(r"`(kubectl [^`]+)`", prose)]
    return steps


def run_kubectl(lab: Lab, command: str, stdin: str | None) -> subprocess.CompletedProcess[str]:
    args = shlex.split(command)
    assert args[0] == "kubectl", command
    return subprocess.run(kube.kubectl_argv(lab, args[1:]), input=stdin, capture_output=True, text=True,
                          timeout=360, check=False)


def test_the_docs_kubectl_walkthrough_runs_against_the_lab(lab: Lab) -> None:
    """The real kubectl (the lab extra's, in the control-plane namespace) runs every command of the
    walkthrough in docs/operations.md; each succeeds, and `kubectl get mc` prints the columns and values the
    doc shows (the age aside)."""
    steps = walkthrough()
    assert sum(1 for cmd, _, out in steps if out is not None) == 2 and len(steps) >= 9, steps
    for command, stdin, shown in steps:
        proc = run_kubectl(lab, command, stdin)
        assert proc.returncode == 0, f"{command}: {proc.stderr}"
        if shown is not None:
            got = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.strip().splitlines()]
            want = [re.split(r"\s{2,}", line.strip()) for line in shown.strip().splitlines()]
            age = want[0].index("AGE")
            assert got[0] == want[0], (command, proc.stdout)
            assert [c for k, c in enumerate(got[1]) if k != age] == [c for k, c in enumerate(want[1]) if k != age], \
                (command, proc.stdout)
        if "get events" in command:
            assert "ConfigUpdated" in proc.stdout and "bpfLBMode SNAT -> DSR" in proc.stdout, proc.stdout
        if "node-report" in command:
            reports = yaml.safe_load(proc.stdout)["items"]
            assert sorted(r["data"]["node"] for r in reports) == ["node1", "node2", "node3"]
        if command.startswith("kubectl describe"):
            assert all(re.search(rf"Type:\s+{c}\b", proc.stdout)
                       for c in ("Ready", "Progressing", "Degraded")), proc.stdout   # the doc: the three conditions
    # The lab's own listing, as a user of the lab would look at it.
    lines = subprocess.run([sys.executable, "-m", "bpflb", "lab", "kubectl", "--name", lab.name, "--", "get",
                            "svc,endpointslices", "-A"], capture_output=True, text=True, check=True).stdout
    cluster_ip = next(s["clusterIP"] for s in lab.status()["services"] if s["name"] == "default/echo-lb")
    assert re.search(rf"default\s+service/echo-lb\s+LoadBalancer\s+{cluster_ip}\s+198.18.1.10\s+80:30280/TCP",
                     lines), lines
    assert re.search(r"default\s+endpointslice.discovery.k8s.io/echo-\w+\s+IPv4\s+8080,8081\s+10.244.2.10,10.244.3.10",
                     lines), lines
