"""Control-plane benchmarks (commands, not tests): `bpflb bench-kube latency` times a Service or
EndpointSlice change at the API until the map entry is in a node's datapath, in a running `lab up --kube`;
`bpflb bench-kube fullsync` times an agent's first sync of N Services x M endpoints from the API and
measures its memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bpflb.kubeapi import KubeClient, anonymous, resource_path

BENCH_PORT = 30600
POD_POOL = 60000
NODE1 = "198.18.0.11"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _first_backend(maps: Any, port: int) -> str | None:
    """node1's NodePort frontend :port's first backend ("ip:port"), by two direct map lookups: the probe
    must be light, or the measuring process slows the agent it measures (2 cores for the whole lab)."""
    from ipaddress import IPv4Address

    from bpflb.datapath.lbmaps import svc_key
    from bpflb.model.types import L4Addr, Proto

    slot = maps.services.lookup(svc_key(L4Addr(IPv4Address(NODE1), port, Proto.TCP), 1))
    if slot is None:
        return None
    key = slot.id.to_bytes(4, "little")
    be = maps.backends.lookup(key)
    if be is None:
        return None
    addr = IPv4Address(int(be.addr).to_bytes(4, "little"))
    return f"{addr}:{int.from_bytes(int(be.port).to_bytes(2, 'little'), 'big')}"


def _latency_in_control_plane(server: str, pin_root: str, changes: int,
                              port: int = BENCH_PORT) -> list[tuple[str, float]]:
    """Runs inside the control-plane namespace (the API is reachable there; bpffs is shared); the probe Service
    moves between nodePorts port and port + 1."""
    from bpflb.inspect import PinnedMaps

    client = KubeClient(anonymous(server))
    svc_path = resource_path("v1", "services", "default", "bench")
    eps_path = resource_path("discovery.k8s.io/v1", "endpointslices", "default", "bench-1")
    for path in (eps_path, svc_path):
        client.delete(path)
    client.create(resource_path("v1", "services", "default"), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": port}]}})

    def slice_with(ip: str) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "bench-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "bench"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node2"}]}

    client.create(resource_path("discovery.k8s.io/v1", "endpointslices", "default"), slice_with("10.244.2.200"))
    maps = PinnedMaps.open(Path(pin_root))
    deadline = time.monotonic() + 60
    while _first_backend(maps, port) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    results: list[tuple[str, float]] = []
    base = port
    for i in range(changes):
        if i % 2 == 0:          # an EndpointSlice change: a new backend address
            ip = f"10.244.2.{100 + (i // 2) % 100}"
            t0 = time.perf_counter()
            client.merge_patch(eps_path, {"endpoints": slice_with(ip)["endpoints"]})
            t1 = time.perf_counter()
            results.append(("write:EndpointSlice", t1 - t0))
            want = f"{ip}:8080"
            while _first_backend(maps, port) != want:
                time.sleep(0.001)
            results.append(("EndpointSlice", time.perf_counter() - t0))
            results.append(("accepted:EndpointSlice", time.perf_counter() - t1))
        else:                   # a Service change: its nodePort moves
            port = base + 1 if port == base else base
            t0 = time.perf_counter()
            client.merge_patch(svc_path, {"spec": {"ports": [{"name": "http", "port": 80, "nodePort": port}]}})
            t1 = time.perf_counter()
            results.append(("write:Service", t1 - t0))
            while _first_backend(maps, port) is None:
                time.sleep(0.001)
            results.append(("Service", time.perf_counter() - t0))
            results.append(("accepted:Service", time.perf_counter() - t1))
    client.delete(eps_path)
    client.delete(svc_path)
    return results


def _summary(samples: list[tuple[str, float]]) -> dict[str, Any]:
    """p50/p99/max per kind: "all", "EndpointSlice", "Service" from the write request to the map entry (the
    emulated API's write included); "accepted:*" from the API's answer to the write to the map entry (the
    agent's share); "write:*" the emulated API's write alone, which grows with its history (kmock)."""
    out: dict[str, Any] = {"changes": sum(1 for k, _ in samples if ":" not in k)}
    kinds = ("all", "EndpointSlice", "Service", "accepted:all", "accepted:EndpointSlice", "accepted:Service",
             "write:EndpointSlice", "write:Service")
    for kind in kinds:
        values = [s * 1000 for k, s in samples
                  if kind == k or (kind == "all" and ":" not in k)
                  or (kind == "accepted:all" and k.startswith("accepted:"))]
        if values:
            out[kind] = {"p50_ms": round(statistics.median(values), 1), "p99_ms": round(_percentile(values, 99), 1),
                         "max_ms": round(max(values), 1), "n": len(values)}
    return out


def latency(lab_name: str, changes: int = 200) -> dict[str, Any]:
    """In a running `lab up --kube`: changes at the API until node1's map holds them."""
    from bpflb_lab.lab import Lab, kube

    lab = Lab(lab_name)
    if not lab.state().kube:
        raise SystemExit(f"lab {lab_name} runs without --kube; start it with `bpflb lab up --kube --name {lab_name}`")
    samples = lab.run_in(kube.HOST, _latency_in_control_plane, kube.API_URL, str(lab.pin_root / "node1"), changes,
                         timeout=600)
    return _summary(samples)


# ---------------------------------------------------------------------------------------------- at scale

BASELINE = "e18ad66"          # main before issue 15: the agent re-translates its whole snapshot on every change
SCALE_PROBE_PORT = 32700      # above the nodePorts of the workload's Services


def workload(services: int, endpoints: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """N Services (the first 2,700 NodePort, every one with an externalIP) x M endpoints, one EndpointSlice each,
    node1 and the agents' ConfigMap: what fullsync and latency --services load into the emulated API. The pods
    come from a pool of POD_POOL addresses (several Services select the same pods): 10,000 x 10 distinct
    backends would not fit the datapath's lb_backends map (65,536 entries)."""
    from bpflb_lab.scratch import NODE1 as NODE

    node_ports = 2700
    svcs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc{i}", "namespace": "bench"},
             "spec": {"type": "NodePort", "selector": {"app": f"a{i}"},
                      "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i, "protocol": "TCP"}]
                      if i < node_ports else [{"name": "http", "port": 80, "protocol": "TCP"}],
                      "externalIPs": [f"198.19.{i // 250}.{i % 250 + 1}"]}} for i in range(services)]

    def pod(n: int) -> str:
        n %= POD_POOL
        return f"10.{100 + n // 65536}.{(n // 256) % 256}.{n % 256}"

    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": f"svc{i}-x", "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": f"svc{i}"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [pod(i * endpoints + j)], "conditions": {"ready": True},
                              "nodeName": "node2",
                              "targetRef": {"kind": "Pod", "name": f"p{(i * endpoints + j) % POD_POOL}"}}
                             for j in range(endpoints)]}
              for i in range(services)]
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE}]}}
    config = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "bpflb-agent", "namespace": "kube-system"}, "data": {"bpfLBMode": "SNAT"}}
    return {("v1", "nodes"): [node], ("v1", "configmaps"): [config], ("v1", "services"): svcs,
            ("discovery.k8s.io/v1", "endpointslices"): slices}


def baseline_code(rev: str = BASELINE) -> Path:
    """A checkout of rev (the product, its BPF objects built) in a cache directory: the code path of that
    commit, run side by side with this one's. SystemExit when it cannot be had."""
    import bpflb

    repo = Path(bpflb.__file__).resolve().parents[2]
    where = Path(tempfile.gettempdir()) / f"bpflb-baseline-{rev}"
    if (where / ".built-2").exists():
        return where
    where.mkdir(parents=True, exist_ok=True)
    # The workshop too: the product's CLI loads the workshop it finds, which must be of the same commit.
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev, "Makefile", "bpf_objects",
                              "native", "operator/bpflb", "operator/bpflb_lab"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"baseline {rev}: git archive failed in {repo}: {archive.stderr.decode().strip()} "
                         f"(pass --baseline none to measure this code alone)")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    build = subprocess.run(["make", "-C", str(where), "bpf"], capture_output=True, text=True, check=False)
    if build.returncode != 0:
        raise SystemExit(f"baseline {rev}: make bpf failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}")
    (where / ".built-2").touch()
    return where


def _code_env(code: Path | None) -> dict[str, str]:
    """The environment that runs `python -m bpflb` from code (a baseline checkout), or this one (None)."""
    if code is None:
        return {}
    return {"PYTHONPATH": str(code / "operator"), "BPFLB_BPF_DIR": str(code / "bpf_objects" / "build"),
            "BPFLB_BPF_INCLUDE": str(code / "bpf_objects" / "include")}


@contextlib.contextmanager
def _emulated_cluster(objects: dict[tuple[str, str], list[dict[str, Any]]]) -> Iterator[tuple[str, str, Path]]:
    """A scratch namespace that looks like node1, an emulated API in it holding objects; (namespace, API URL,
    kubeconfig)."""
    from bpflb.kubeapi import write_kubeconfig
    from bpflb_lab.apiserver import EmulatedAPI
    from bpflb_lab.lab.netns import entered
    from bpflb_lab.scratch import scratch_node

    with scratch_node("bpflb-bk") as sn, tempfile.TemporaryDirectory() as tmp:
        with entered(sn.ns):
            api = EmulatedAPI()             # its thread and socket live in the scratch namespace
            url = api.start()
        try:
            for (api_version, plural), items in objects.items():
                api.preload(api_version, plural, items)
            kubeconfig = Path(tmp) / "kubeconfig"
            write_kubeconfig(kubeconfig, url)
            yield sn.ns, url, kubeconfig
        finally:
            api.close()


def _agent(ns: str, kubeconfig: Path, pin_root: Path, once: bool, code: Path | None = None) -> list[str]:
    """The agent's command in the scratch namespace. Never the socket LB: without a cgroup of its own it would
    attach to the host's cgroup root and steer every process of the machine (a code that has none needs no
    flag)."""
    cli = (code / "operator" / "bpflb" / "cli.py") if code is not None else None
    no_socket_lb = cli is None or "--no-socket-lb" in cli.read_text()
    return ["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-m", "bpflb", "agent",
            "--node-name", "node1", "--kube", "--kubeconfig", str(kubeconfig), "--pin-root", str(pin_root),
            "--device", "eth0", *(["--once"] if once else []), *(["--no-socket-lb"] if no_socket_lb else [])]


def _fullsync_once(objects: dict[tuple[str, str], list[dict[str, Any]]], code: Path | None) -> dict[str, Any]:
    pin_root = Path("/sys/fs/bpf") / f"bpflb-bench-{uuid.uuid4().hex[:6]}"
    with _emulated_cluster(objects) as (ns, _url, kubeconfig), tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "agent.log"
        t0 = time.monotonic()
        try:
            with open(log, "w") as out:
                proc = subprocess.Popen(_agent(ns, kubeconfig, pin_root, once=True, code=code), stdout=out,
                                        stderr=subprocess.STDOUT, env={**os.environ, **_code_env(code)})
                # The agent's own peak, read from /proc while it runs: wait4's ru_maxrss also counts the forked
                # child before its exec, that is this process (the emulated API and its objects).
                peak_kib = 0
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    peak_kib = max(peak_kib, _status_kib(proc.pid).get("VmHWM", 0))
                    time.sleep(0.02)
        finally:
            subprocess.run(["rm", "-rf", str(pin_root)], check=False)
        wall = time.monotonic() - t0
        text = log.read_text()
    line = next((ln for ln in text.splitlines() if "once: listed" in ln), "")
    if os.waitstatus_to_exitcode(status) != 0 or not line:
        raise SystemExit(f"the agent failed (exit {os.waitstatus_to_exitcode(status)}):\n{text[-3000:]}")
    parts = line.split("once: ")[1]
    listed = float(parts.split(" in ")[1].split("s;")[0])
    programmed = float(parts.rsplit(" in ", 1)[1].rstrip("s"))
    return {"wall_s": round(wall, 2), "list_s": listed, "translate_and_program_s": programmed,
            "agent_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "agent_max_rss_mib": round(peak_kib / 1024, 1), "agent_log": line.split("bpflb.agent: ")[-1]}


def fullsync(services: int = 10000, endpoints: int = 10, baseline: str | None = BASELINE,
             rounds: int = 1) -> dict[str, Any]:
    """An agent process (`bpflb agent --kube --once`) syncing services x endpoints from an emulated API, in a
    scratch namespace that looks like node1: wall time, the agent's own timings (list-complete -> maps
    programmed, the goal's figure), its CPU time and peak memory; with a baseline, that commit's agent on the
    same objects in the same run, rounds alternating, medians reported."""
    objects = workload(services, endpoints)
    codes: dict[str, Path | None] = {"this": None}
    code = _baseline_or_none(baseline)
    if baseline and code is not None:
        codes[baseline] = code
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    for _ in range(rounds):
        for name, code in codes.items():
            runs[name].append(_fullsync_once(objects, code))
    out: dict[str, Any] = {"services": services, "endpoints_per_service": endpoints, "rounds": rounds}
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "agent_log"}
        med["services_per_s_sync"] = round(services / med["translate_and_program_s"])
        med["agent_log"] = results[-1]["agent_log"]
        out[name] = med
    return out


def _latency_once(objects: dict[tuple[str, str], list[dict[str, Any]]], code: Path | None,
                  changes: int) -> dict[str, Any]:
    from bpflb_lab.lab.netns import entered

    pin_root = Path("/sys/fs/bpf") / f"bpflb-bench-{uuid.uuid4().hex[:6]}"
    with _emulated_cluster(objects) as (ns, url, kubeconfig), tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "agent.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_agent(ns, kubeconfig, pin_root, once=False, code=code), stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **_code_env(code)})
        try:
            deadline = time.monotonic() + 600
            while not os.path.lexists(pin_root / "ready"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the agent did not get ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
            synced = _status_kib(proc.pid)
            with entered(ns):
                samples = _latency_in_control_plane(url, str(pin_root), changes, SCALE_PROBE_PORT)
            after = _status_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            subprocess.run(["rm", "-rf", str(pin_root)], check=False)
        # The agent's own account of each sync that wrote something ("sync: ... (x ms)"), the first one aside:
        # the part of "accepted" that is the agent's work, not the watch's delivery nor the probe's polling.
        syncs = [float(m) for m in re.findall(r"bpflb.agent: sync: .*\(([\d.]+) ms\)", log.read_text())][1:]
    result = {**_summary(samples), "agent_rss_mib_after_first_sync": round(synced.get("VmRSS", 0) / 1024, 1),
              "agent_peak_rss_mib": round(after.get("VmHWM", 0) / 1024, 1)}
    if syncs:
        result["agent_sync"] = {"p50_ms": round(statistics.median(syncs), 1),
                                "p99_ms": round(_percentile(syncs, 99), 1), "max_ms": round(max(syncs), 1),
                                "n": len(syncs)}
    return result


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        f = open(f"/proc/{pid}/status")        # noqa: SIM115 - gone between two reads: nothing to report
    except OSError:
        return out
    with f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def latency_at_scale(services: int = 10000, endpoints: int = 10, changes: int = 200,
                     baseline: str | None = BASELINE) -> dict[str, Any]:
    """A running agent holding services x endpoints (an emulated API in a scratch namespace that looks like
    node1), then changes at the API (an EndpointSlice and a Service alternately) until node1's map holds each;
    with a baseline, that commit's agent the same way, in the same run."""
    objects = workload(services, endpoints)
    out: dict[str, Any] = {"services": services, "endpoints_per_service": endpoints}
    code = _baseline_or_none(baseline)
    out["this"] = _latency_once(objects, None, changes)
    if baseline and code is not None:
        out[baseline] = _latency_once(objects, code, changes)
    return out


def _baseline_or_none(baseline: str | None) -> Path | None:
    """The baseline's checkout, or None (said on stderr) when there is none to be had (a shallow clone, say):
    this code's figures are still worth printing."""
    if not baseline:
        return None
    try:
        return baseline_code(baseline)
    except SystemExit as exc:
        print(f"bench-kube: no baseline: {exc}", file=sys.stderr)
        return None


def add_arguments(parser: Any) -> None:
    """bench-kube's verbs and options, on parser (an argparse parser: its own, or the bpflb command's)."""
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="API change -> map entry: in a running `lab up --kube` (--name), or "
                                         "at scale beside a baseline (--services)")
    lat.add_argument("--name", default="bpflb", help="the lab")
    lat.add_argument("--changes", type=int, default=200)
    lat.add_argument("--services", type=int, help="instead of a lab: an agent holding this many Services")
    lat.add_argument("--endpoints", type=int, default=10)
    full = sub.add_parser("fullsync", help="first sync of N Services x M endpoints from the API")
    full.add_argument("--services", type=int, default=10000)
    full.add_argument("--endpoints", type=int, default=10)
    full.add_argument("--rounds", type=int, default=1)
    for each in (lat, full):
        each.add_argument("--baseline", default=BASELINE,
                          help=f"a commit measured side by side (default {BASELINE}, main before issue 15); none: "
                               f"this code alone")


def run(args: Any) -> int:
    """Run the benchmark args name (parsed by add_arguments' parser) and print its figures as JSON."""
    baseline = None if args.baseline in ("", "none") else args.baseline
    if args.what == "latency":
        result = latency_at_scale(args.services, args.endpoints, args.changes, baseline) if args.services \
            else latency(args.name, args.changes)
    else:
        result = fullsync(args.services, args.endpoints, baseline, args.rounds)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bpflb bench-kube")
    add_arguments(parser)
    return run(parser.parse_args(argv))
