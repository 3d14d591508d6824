"""The `bpflb lab ...` command tree: register(subparsers) adds it to the bpflb CLI; every subcommand sets
`func(args) -> exit code` (0 ok, 1 failure, 2 not implemented in this release).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpflb_lab.lab import cgroups, netns
from bpflb_lab.lab.core import DEFAULT_NAME, ENV_AGENT_CMD, Lab
from bpflb_lab.lab.errors import LabError, LabUnsupported
from bpflb_lab.lab.table import format_table

Handler = Callable[[argparse.Namespace], int]


def _say(line: str) -> None:
    print(line, flush=True)


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(args.name, log=_say)


def _errors(fn: Handler) -> Handler:
    """Turn LabError into a message on stderr and exit code 1 (2 for LabUnsupported)."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            rc = fn(args)
            sys.stdout.flush()          # a closed pipe shows here, inside the handler below
            return rc
        except LabUnsupported as exc:
            print(f"bpflb lab {args.lab_command}: {exc}", file=sys.stderr)
            return 2
        except LabError as exc:
            print(f"bpflb lab {args.lab_command}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"bpflb lab {args.lab_command}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (`bpflb lab status | head`): end quietly, as cat does; stdout points at
            # /dev/null so Python's own flush at exit finds nothing to complain about.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 0

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_errors
def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    lab.up(nodes=args.nodes, mode=args.mode, tunnel=args.tunnel, agents=not args.no_agents,
           workload=not args.no_workload, recreate=args.recreate, agent_timeout=args.agent_timeout,
           keep_on_failure=args.keep_on_failure, kube=args.kube, algorithm=args.algorithm,
           acceleration=args.acceleration)
    _say(f"next: `bpflb lab check --name {lab.name}`, `bpflb lab status --name {lab.name}`, "
         f"`bpflb lab down --name {lab.name}`")
    return 0


@_errors
def cmd_mode(args: argparse.Namespace) -> int:
    lab = _lab(args)
    took = lab.set_mode(args.mode, timeout=args.timeout)
    _say(f"lab {lab.name}: every node runs {args.mode} for new flows ({took:.1f}s); open flows keep their mode")
    return 0


@_errors
def cmd_set(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    for pair in args.settings:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise LabError(f"{pair!r}: expected KEY=VALUE, e.g. svcSourceRangeCheck=true")
        try:
            values[key] = json.loads(text)      # true, 4093, ...; a bare word stays a string
        except ValueError:
            values[key] = text
    for line in _lab(args).set_settings(**values):
        _say(f"lab {args.name}: {line} (the agents apply it at their next sync)")
    return 0


@_errors
def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args)
    report = lab.down()
    if report.namespaces or report.killed or report.removed:
        _say(f"lab {lab.name} removed: {len(report.namespaces)} namespace(s), {len(report.killed)} process(es)")
    else:
        _say(f"lab {lab.name}: nothing to remove")
    return 0


def _status_text(st: dict[str, Any]) -> list[str]:
    agents = st["agents"]
    ready = sum(a["ready"] and a["alive"] for a in agents)
    agent_note = f"agents {ready}/{len(agents)} ready" if st["agents_enabled"] else "agents disabled"
    summary = (f"lab {st['name']}: {st['phase']}, mode {st['mode']}, tunnel {st['tunnel']}, "
               f"{st['nodes']} node(s), {agent_note}")
    out = [summary, f"state {st['state_dir']}  (agents read {st['cluster_dir']})", ""]
    procs: dict[str, str] = {}
    for a in agents:
        procs[a["node"]] = f"agent {a['pid']} " + ("ready" if a["ready"] and a["alive"] else
                                                    "running" if a["alive"] else "DEAD")
    for p in st["pods"]:
        procs[f"pod:{p['name']}"] = f"echo {p['echo_pid']} " + ("running" if p["alive"] else "DEAD")
    rows = []
    for h in st["hosts"]:
        proc = procs.get(f"pod:{h['name']}" if h["role"] == "pod" else h["name"], "-")
        rows.append([h["name"], h["role"], h["netns"] + ("" if h["exists"] else " (MISSING)"), h["ip"] or "-",
                     h["device"], h["node"] or "-", proc])
    out += format_table(["HOST", "ROLE", "NETNS", "ADDRESS", "DEVICE", "NODE", "PROCESS"], rows)
    out.append("")
    rows = []
    for s in st["services"]:
        ports = ", ".join(f"{p.get('name') or '-'} {p['port']}/{p['protocol']}->{p.get('targetPort')}"
                          + (f" nodePort {p['nodePort']}" if p.get("nodePort") else "") for p in s["ports"])
        if s.get("healthCheckNodePort"):
            ports += f"; healthCheckNodePort {s['healthCheckNodePort']}"
        fronts = ", ".join(s["loadBalancerIPs"] + s["externalIPs"]) or "-"
        eps = ", ".join(f"{e['pod']}" + ("" if e.get("ready") else " (not ready)") for e in s["endpoints"]) or "none"
        rows.append([s["name"], s["type"] or "-", s.get("clusterIP") or "-", s["externalTrafficPolicy"] or "-",
                     s.get("internalTrafficPolicy") or "-", ports, fronts, eps])
    if rows:
        out += format_table(["SERVICE", "TYPE", "CLUSTER-IP", "eTP", "iTP", "PORTS", "LB/EXTERNAL IPS", "ENDPOINTS"],
                            rows)
    else:
        out.append("no Services")
    return out


@_errors
def cmd_status(args: argparse.Namespace) -> int:
    st = _lab(args).status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print("\n".join(_status_text(st)))
    return 0


@_errors
def cmd_exec(args: argparse.Namespace) -> int:
    lab = Lab(args.name)
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = ["/bin/sh"]
    cgroup = None if args.no_cgroup else lab.cgroup(args.host)
    if cgroup is not None:
        argv = cgroups.join_argv(cgroup, argv)
    try:
        rc = subprocess.call(netns.nsenter_argv(lab.netns(args.host), argv))
    except FileNotFoundError as exc:
        raise LabError(f"nsenter: {exc.strerror}") from exc
    return rc if rc >= 0 else 128 - rc


@_errors
def cmd_kubectl(args: argparse.Namespace) -> int:
    from bpflb_lab.lab import kube

    lab = Lab(args.name)
    if not lab.state().kube:
        raise LabError(f"lab {args.name} has no API (bring it up with `bpflb lab up --kube`)")
    argv = list(args.args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    rc = subprocess.call(kube.kubectl_argv(lab, argv))
    return rc if rc >= 0 else 128 - rc


@_errors
def cmd_apply(args: argparse.Namespace) -> int:
    lab = _lab(args)
    source: str | Path = sys.stdin.read() if args.file == "-" else Path(args.file)
    for line in lab.apply(source):
        _say(line)
    return 0


@_errors
def cmd_delete(args: argparse.Namespace) -> int:
    _say(_lab(args).delete(args.kind, args.object_name, args.namespace))
    return 0


@_errors
def cmd_check(args: argparse.Namespace) -> int:
    report = Lab(args.name).check(timeout=args.timeout)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `lab` and its subcommands; each parser sets func(args) -> exit code."""
    lab = subparsers.add_parser(
        "lab", help="a Kubernetes-like cluster of network namespaces for demos and tests",
        description="A lab cluster on this machine: network namespaces for a fabric, a client, N nodes and "
                    "one per pod; the lab writes the Kubernetes objects the agents read.")
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--name", default=DEFAULT_NAME, metavar="LAB",
                       help=f"lab name, the prefix of its namespaces (default {DEFAULT_NAME})")
        p.set_defaults(func=handler)
        return p

    up = add("up", cmd_up, "create the lab, its default workload and its agents")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--mode", default="SNAT", metavar="SNAT|DSR|Hybrid", help="bpfLBMode (default SNAT)")
    up.add_argument("--acceleration", default="Disabled", metavar="Disabled|Native|BestEffort",
                    help="xdpAcceleration: the XDP fast path on every node's eth0 (default Disabled)")
    up.add_argument("--algorithm", default="Random", metavar="Random|Maglev",
                    help="lbAlgorithm, the cluster-wide backend selection (default Random; a Service's "
                         "service.cilium.io/lb-algorithm annotation overrides it)")
    up.add_argument("--tunnel", default="Disabled", metavar="Disabled|VXLAN",
                    help="tunnelMode (default Disabled: native routing)")
    up.add_argument("--no-agents", action="store_true", help="do not start the agents (lab plumbing only)")
    up.add_argument("--no-workload", action="store_true", help="no default pods and Services")
    up.add_argument("--recreate", action="store_true", help="take an existing lab of this name down first")
    up.add_argument("--agent-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="how long to wait for every agent's ready file (default 60)")
    up.add_argument("--kube", action="store_true",
                    help="add a control-plane host (198.18.0.2) running an emulated Kubernetes API (kmock) and the "
                         "operator; the agents list+watch that API; the mode is set through the ModuleConfig")
    up.add_argument("--keep-on-failure", action="store_true",
                    help="leave a failed lab in place for inspection (then `lab down`)")
    up.epilog = (f"The agent command comes from ${ENV_AGENT_CMD} when set, a template with {{python}} {{node}} "
                 "{source_dir} {pin_root} {device} {lab} {netns} {mode} {log} {cgroup_root}.")

    add("down", cmd_down, "remove the lab: processes, namespaces, state and pinned BPF objects")

    mo = add("mode", cmd_mode, "switch bpfLBMode live (rewrites the agents' ConfigMap, waits for every node)")
    mo.add_argument("mode", metavar="SNAT|DSR|Hybrid")
    mo.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")

    st = add("set", cmd_set, "change other cni-cilium settings live (e.g. svcSourceRangeCheck=true)")
    st.add_argument("settings", nargs="+", metavar="KEY=VALUE")

    status = add("status", cmd_status, "show the lab's hosts, agents and Services")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    ex = add("exec", cmd_exec, "run a command as a host: in its network namespace and, for a node or a pod, its "
                               "node's cgroup, where the socket LB applies (exit code passed through)")
    ex.add_argument("host", metavar="HOST", help="fabric, client, nodeK or a pod name")
    ex.add_argument("--no-cgroup", action="store_true",
                    help="stay outside the node's cgroup: the socket LB does not see the command (a pod's "
                         "packets then go through the pod-facing path on its veth)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command (default /bin/sh)")

    kc = add("kubectl", cmd_kubectl, "run kubectl against the lab's API (--kube): `bpflb lab kubectl -- get mc`")
    kc.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="kubectl's arguments")

    ap = add("apply", cmd_apply, "add or replace Pods, Services and EndpointSlices (multi-document YAML)")
    ap.add_argument("-f", "--filename", dest="file", required=True, metavar="FILE", help="YAML file, - for stdin")

    de = add("delete", cmd_delete, "delete a Pod, a Service (and its EndpointSlices) or an EndpointSlice")
    de.add_argument("kind", choices=["pod", "service", "endpointslice"], help="what to delete")
    de.add_argument("object_name", metavar="NAME")
    de.add_argument("-n", "--namespace", default="default")

    ch = add("check", cmd_check, "send traffic from the client to every frontend and compare with expectations")
    ch.add_argument("--json", action="store_true", help="machine-readable output")
    ch.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                    help="per-request timeout (default 1)")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m bpflb_lab.lab ...`): the same commands as `bpflb lab ...`."""
    parser = argparse.ArgumentParser(prog="python -m bpflb_lab.lab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    rc: int = args.func(args)
    return rc
