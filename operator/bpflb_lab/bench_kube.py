"""Control-plane benchmarks (commands, not tests): `bpflb bench-kube latency` times a Service or
EndpointSlice change at the API until the map entry is in a node's datapath, in a running `lab up --kube`;
`bpflb bench-kube fullsync` times an agent's first sync of N Services x M endpoints from the API and
measures its memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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


def _latency_in_control_plane(server: str, pin_root: str, changes: int) -> list[tuple[str, float]]:
    """Runs inside the control-plane namespace (the API is reachable there; bpffs is shared)."""
    from bpflb.inspect import PinnedMaps

    client = KubeClient(anonymous(server))
    svc_path = resource_path("v1", "services", "default", "bench")
    eps_path = resource_path("discovery.k8s.io/v1", "endpointslices", "default", "bench-1")
    for path in (eps_path, svc_path):
        client.delete(path)
    client.create(resource_path("v1", "services", "default"), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": BENCH_PORT}]}})

    def slice_with(ip: str) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "bench-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "bench"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node2"}]}

    client.create(resource_path("discovery.k8s.io/v1", "endpointslices", "default"), slice_with("10.244.2.200"))
    maps = PinnedMaps.open(Path(pin_root))
    deadline = time.monotonic() + 10
    while _first_backend(maps, BENCH_PORT) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    results: list[tuple[str, float]] = []
    port = BENCH_PORT
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
            port = BENCH_PORT + 1 if port == BENCH_PORT else BENCH_PORT
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


def latency(lab_name: str, changes: int = 200) -> dict[str, Any]:
    from bpflb_lab.lab import Lab, kube

    lab = Lab(lab_name)
    if not lab.state().kube:
        raise SystemExit(f"lab {lab_name} runs without --kube; start it with `bpflb lab up --kube --name {lab_name}`")
    samples = lab.run_in(kube.HOST, _latency_in_control_plane, kube.API_URL, str(lab.pin_root / "node1"), changes,
                         timeout=600)
    # "all", "EndpointSlice", "Service": from the write request to the map entry (the emulated API's
    # write included); "accepted:*": from the API's answer to the write to the map entry (the agent's
    # share); "write:*": the emulated API's write alone, which grows with its history (kmock).
    out: dict[str, Any] = {"changes": sum(1 for k, _ in samples if ":" not in k)}
    kinds = ("all", "EndpointSlice", "Service", "accepted:all", "accepted:EndpointSlice", "accepted:Service",
             "write:EndpointSlice", "write:Service")
    for kind in kinds:
        values = [s * 1000 for k, s in samples
                  if kind == k or (kind == "all" and ":" not in k)
                  or (kind == "accepted:all" and k.startswith("accepted:"))]
        out[kind] = {"p50_ms": round(statistics.median(values), 1), "p99_ms": round(_percentile(values, 99), 1),
                     "max_ms": round(max(values), 1), "n": len(values)}
    return out


def fullsync(services: int = 10000, endpoints: int = 10) -> dict[str, Any]:
    """An agent process (`bpflb agent --kube --once`) syncing services x endpoints from an emulated API, in a
    scratch namespace that looks like node1; wall time, the agent's own timings and its peak memory."""
    from bpflb.kubeapi import write_kubeconfig
    from bpflb_lab.apiserver import EmulatedAPI
    from bpflb_lab.lab.netns import entered
    from bpflb_lab.scratch import NODE1 as NODE
    from bpflb_lab.scratch import scratch_node

    svcs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc{i}", "namespace": "bench"},
             "spec": {"type": "NodePort", "selector": {"app": f"a{i}"},
                      "ports": [{"name": "http", "port": 80, "nodePort": 30000 + i % 2768, "protocol": "TCP"}]
                      if i < 2768 else [{"name": "http", "port": 80, "protocol": "TCP"}],
                      "externalIPs": [f"198.19.{i // 250}.{i % 250 + 1}"]}} for i in range(services)]
    # Pods are drawn from a pool of POD_POOL addresses (several Services select the same pods): 10,000 x 10
    # distinct backends would not fit the datapath's lb_backends map (65,536 entries).
    def pod(n: int) -> str:
        n %= POD_POOL
        return f"10.{100 + n // 65536}.{(n // 256) % 256}.{n % 256}"

    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": f"svc{i}-x", "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": f"svc{i}"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [pod(i * endpoints + j)], "conditions": {"ready": True},
                              "nodeName": "node2", "targetRef": {"kind": "Pod", "name": f"p{(i * endpoints + j) % POD_POOL}"}}
                             for j in range(endpoints)]}
              for i in range(services)]
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE}]}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bpflb-agent", "namespace": "kube-system"},
              "data": {"bpfLBMode": "SNAT"}}
    pin_root = Path("/sys/fs/bpf") / f"bpflb-bench-{uuid.uuid4().hex[:6]}"
    with scratch_node("bpflb-bk") as sn, tempfile.TemporaryDirectory() as tmp:
        with entered(sn.ns):
            api = EmulatedAPI()             # its thread and socket live in the scratch namespace
            url = api.start()
        try:
            api.preload("v1", "nodes", [node])
            api.preload("v1", "configmaps", [config])
            api.preload("v1", "services", svcs)
            api.preload("discovery.k8s.io/v1", "endpointslices", slices)
            kubeconfig = Path(tmp) / "kubeconfig"
            write_kubeconfig(kubeconfig, url)
            log = Path(tmp) / "agent.log"
            argv = ["nsenter", f"--net=/run/netns/{sn.ns}", "--", sys.executable, "-m", "bpflb", "agent",
                    "--node-name", "node1", "--kube", "--kubeconfig", str(kubeconfig), "--pin-root", str(pin_root),
                    "--device", "eth0", "--once",
                    "--no-socket-lb"]   # never the host's cgroup root: it would catch every process here
            t0 = time.monotonic()
            with open(log, "w") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
                _pid, status, usage = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t0
            text = log.read_text()
        finally:
            api.close()
            subprocess.run(["rm", "-rf", str(pin_root)], check=False)
    line = next((ln for ln in text.splitlines() if "once: listed" in ln), "")
    if os.waitstatus_to_exitcode(status) != 0 or not line:
        raise SystemExit(f"the agent failed (exit {os.waitstatus_to_exitcode(status)}):\n{text[-3000:]}")
    parts = line.split("once: ")[1]
    listed = float(parts.split(" in ")[1].split("s;")[0])
    programmed = float(parts.rsplit(" in ", 1)[1].rstrip("s"))
    return {"services": services, "endpoints_per_service": endpoints, "wall_s": round(wall, 2),
            "list_s": listed, "translate_and_program_s": programmed,
            "services_per_s_sync": round(services / (listed + programmed)),
            "agent_max_rss_mib": round(usage.ru_maxrss / 1024, 1), "agent_log": line.split("bpflb.agent: ")[-1]}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bpflb bench-kube")
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="API change -> map entry, in a running `lab up --kube`")
    lat.add_argument("--name", default="bpflb", help="the lab")
    lat.add_argument("--changes", type=int, default=200)
    full = sub.add_parser("fullsync", help="first sync of N Services x M endpoints from the API")
    full.add_argument("--services", type=int, default=10000)
    full.add_argument("--endpoints", type=int, default=10)
    args = parser.parse_args(argv)
    result = latency(args.name, args.changes) if args.what == "latency" else fullsync(args.services, args.endpoints)
    print(json.dumps(result, indent=2))
    return 0
