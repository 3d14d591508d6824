"""The `lab` command tree, run as a user would (`python -m bpflb_lab.lab ...` is `bpflb lab ...`), `bench-kube`'s
parser, and the register(subparsers) contract the bpflb CLI relies on."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bpflb_lab.cli import register as bench_register
from bpflb_lab.lab import Lab
from bpflb_lab.lab.commands import register


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpflb_lab.lab", *args], check=False, capture_output=True, text=True,
                          input=stdin, timeout=60)


def test_register_adds_the_lab_tree() -> None:
    parser = argparse.ArgumentParser(prog="bpflb")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", "up", "--name", "x", "--nodes", "2", "--no-agents"])
    assert (args.lab_command, args.name, args.nodes, args.no_agents, args.mode) == ("up", "x", 2, True, "SNAT")
    assert callable(args.func)
    args = parser.parse_args(["lab", "exec", "node1", "--", "ip", "-o", "link"])
    assert args.host == "node1" and args.cmd[-3:] == ["ip", "-o", "link"]


def test_bench_kube_answers_help_and_parses_its_verbs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bpflb", "bench-kube", "-h"], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "latency" in proc.stdout and "fullsync" in proc.stdout, proc.stderr
    parser = argparse.ArgumentParser(prog="bpflb")
    bench_register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench-kube", "fullsync", "--rounds", "3", "--baseline", "none"])
    assert (args.what, args.rounds, args.services, args.baseline) == ("fullsync", 3, 10000, "none")


def test_invalid_option_exits_with_a_clear_message() -> None:
    try:
        proc = cli("up", "--name", "bpflb-tnever", "--tunnel", "Geneve", "--no-agents")
        assert proc.returncode != 0 and "Geneve" in proc.stderr and "VXLAN" in proc.stderr
    finally:
        Lab("bpflb-tnever").down()     # should a future change accept the option, nothing stays behind


@pytest.mark.privileged
def test_status_json(lab: Lab) -> None:
    proc = cli("status", "--name", lab.name, "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["name"] == lab.name and st["mode"] == "SNAT" and st["nodes"] == 3
    hosts = {h["name"]: h for h in st["hosts"]}
    assert hosts["fabric"] == {"name": "fabric", "role": "fabric", "netns": f"{lab.name}-fabric", "ip": None,
                               "device": "br0", "node": None, "exists": True}
    assert hosts["client"]["ip"] == "198.18.0.100" and hosts["client"]["role"] == "client"
    assert hosts["node3"] == {"name": "node3", "role": "node", "netns": f"{lab.name}-node3", "ip": "198.18.0.13",
                              "device": "eth0", "node": None, "exists": True}
    assert hosts["echo-b"] == {"name": "echo-b", "role": "pod", "netns": f"{lab.name}-pod-echo-b",
                               "ip": "10.244.3.10", "device": "eth0", "node": "node3", "exists": True}
    assert all(p["alive"] for p in st["pods"])
    svc = {s["name"]: s for s in st["services"]}
    assert svc["default/echo-lb"]["loadBalancerIPs"] == ["198.18.1.10"]
    assert {e["pod"] for e in svc["default/echo"]["endpoints"]} == {"echo-a", "echo-b"}

    assert all(IPv4Address(s["clusterIP"]) in IPv4Network("10.96.0.0/12") and s["clusterIPs"] == [s["clusterIP"]]
               for s in st["services"])
    text = cli("status", "--name", lab.name)
    assert text.returncode == 0 and re.search(r"\becho-a +pod\b", text.stdout)
    assert re.search(rf"default/echo-local +NodePort +{re.escape(svc['default/echo-local']['clusterIP'])} ", text.stdout)


@pytest.mark.privileged
def test_exec_passes_exit_codes_and_runs_in_the_host(lab: Lab) -> None:
    assert cli("exec", "--name", lab.name, "client", "--", "sh", "-c", "exit 5").returncode == 5
    proc = cli("exec", "--name", lab.name, "echo-a", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert proc.returncode == 0 and "10.244.2.10/24" in proc.stdout
    proc = cli("exec", "--name", lab.name, "node9", "--", "true")
    assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.mark.privileged
def test_check_without_a_datapath_fails_and_says_why(lab: Lab) -> None:
    proc = cli("check", "--name", lab.name, "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["failed"] > 0 and report["mode"] == "SNAT"
    row = next(r for r in report["rows"] if r["frontend"] == "198.18.0.12:30080" and r["request"] == "GET /hostname")
    assert row["verdict"] == "FAIL" and row["error"] == "connection refused"
    assert row["expected"] == "answer from echo-a seeing 198.18.0.100 | echo-b seeing 198.18.0.12"
    text = cli("check", "--name", lab.name)
    assert text.returncode == 1 and "FAIL:" in text.stdout and "Service default/echo-local" in text.stdout


@pytest.mark.privileged
def test_up_apply_down_from_the_command_line(fresh_lab_name: str, tmp_path: Path) -> None:
    proc = cli("up", "--name", fresh_lab_name, "--nodes", "2", "--no-agents")
    assert proc.returncode == 0, proc.stderr
    assert "pod/echo-b created (node2, 10.244.2.11)" in proc.stdout, "with 2 nodes echo-b moves to node2"
    again = cli("up", "--name", fresh_lab_name, "--no-agents")
    assert again.returncode == 1 and "already exists" in again.stderr

    manifest = tmp_path / "extra.yaml"
    manifest.write_text("kind: Pod\nmetadata: {name: extra, labels: {app: echo}}\nspec: {nodeName: node1}\n---\n"
                        "kind: Service\nmetadata: {name: extra}\nspec:\n  type: NodePort\n  selector: {app: echo}\n"
                        "  ports: [{port: 80, targetPort: 8080}]\n")
    proc = cli("apply", "--name", fresh_lab_name, "-f", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["pod/extra created (node1, 10.244.1.10)",
                                        "service/extra created (nodePort 30000/TCP)"]
    proc = cli("apply", "--name", fresh_lab_name, "-f", "-", stdin="kind: Deployment\nmetadata: {name: d}\n")
    assert proc.returncode == 1 and "kind 'Deployment' is not supported" in proc.stderr
    assert cli("delete", "--name", fresh_lab_name, "pod", "extra").stdout.strip() == "pod/extra deleted"

    proc = cli("up", "--name", fresh_lab_name, "--nodes", "1", "--no-agents", "--recreate")
    assert proc.returncode == 0, proc.stderr
    assert Lab(fresh_lab_name).state().nodes == 1
    proc = cli("down", "--name", fresh_lab_name)
    assert proc.returncode == 0 and "removed" in proc.stdout
    assert not Lab(fresh_lab_name).exists()
