"""The `bpflb` command line: agent, operator and inspect; `lab`, `bench` and `bench-kube` come from the
workshop package (bpflb_lab) when it is installed, and say how to get it when it is not."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from bpflb.datapath.loader import DEFAULT_PIN_ROOT


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)


def cmd_agent(args: argparse.Namespace) -> int:
    from bpflb.allocator import tune_allocator

    tune_allocator()            # before any thread starts
    from bpflb.agent import Agent, AgentOptions, install_signal_handlers
    from bpflb.model.types import parse_port_range
    from bpflb.sources.files import FileSource

    _setup_logging(args.verbose)
    try:
        nat_ports = parse_port_range(args.nat_port_range)
    except ValueError as exc:
        print(f"bpflb agent: --nat-port-range {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.node_neigh_refresh <= 3600:
        print(f"bpflb agent: --node-neigh-refresh {args.node_neigh_refresh:g}: expected seconds from 0 (off) to "
              "3600", file=sys.stderr)
        return 2
    opts = AgentOptions(node_name=args.node_name, pin_root=Path(args.pin_root), device=args.device,
                        cgroup_root=Path(args.cgroup_root) if args.cgroup_root else None,
                        socket_lb=not args.no_socket_lb, nat_port_range=nat_ports,
                        health_servers=not args.no_health_servers and not args.once,
                        healthz_bind_address=args.healthz_bind_address, mount_bpffs=args.mount_bpffs,
                        node_neigh_refresh=args.node_neigh_refresh)
    if args.kube:
        from bpflb.control.node import run_kube_agent

        return run_kube_agent(opts, kubeconfig=args.kubeconfig, uninstall=args.uninstall, once=args.once,
                              namespace=args.namespace, metrics_listen=args.metrics_listen,
                              list_page_size=args.list_page_size)
    agent = Agent(opts, FileSource(Path(args.source_dir)))
    if args.uninstall:
        agent.uninstall(args.device)
        return 0
    install_signal_handlers(agent.stop)
    if args.once:
        agent.start()
        return 0 if agent.sync_once() is not None else 1
    server = None
    if args.metrics_listen:
        from bpflb.metrics import AgentMetrics

        agent.metrics = AgentMetrics(agent)
        server = agent.metrics.serve(args.metrics_listen)
    try:
        agent.run()
    finally:
        if server is not None:
            server.close()
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from bpflb.control.leader import LeaseTimes
    from bpflb.control.operator import LeadershipLost, OperatorOptions, run
    from bpflb.sources.base import own_namespace

    _setup_logging(args.verbose)
    try:
        lease = LeaseTimes(args.lease_duration, args.renew_deadline, args.retry_period)
    except ValueError as exc:
        print(f"bpflb operator: {exc}", file=sys.stderr)
        return 2
    options = OperatorOptions(kubeconfig=args.kubeconfig, namespace=own_namespace(args.namespace),
                              webhook_listen=args.webhook_listen, webhook_host=args.webhook_host,
                              webhook_cadump=args.webhook_cadump, webhook_managed=args.webhook_managed,
                              webhook_configuration=args.webhook_configuration,
                              webhook_cert_dir=args.webhook_cert_dir, health_listen=args.health_listen,
                              leader_elect=args.leader_elect, identity=args.identity, lease=lease,
                              metrics_listen=args.metrics_listen)
    if args.image:
        options.image = args.image
    if args.agent_pod_config:
        from bpflb.control.manifests import AgentPod

        try:
            options.agent_pod = AgentPod.load(args.agent_pod_config)
        except ValueError as exc:
            print(f"bpflb operator: {exc}", file=sys.stderr)
            return 2
    try:
        run(options)
    except LeadershipLost as exc:
        print(f"bpflb operator: {exc}; exiting so that this replica restarts as a standby", file=sys.stderr)
        return 1
    except ValueError as exc:           # the kubeconfig or the service account
        print(f"bpflb operator: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_mount_bpffs(args: argparse.Namespace) -> int:
    from bpflb.datapath.libbpf import BpfError
    from bpflb.datapath.loader import mount_bpffs

    _setup_logging(False)
    try:
        done = mount_bpffs(Path(args.path))
    except BpfError as exc:
        print(f"bpflb mount-bpffs: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"mounted bpffs at {args.path}" if done else f"bpffs already mounted at {args.path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bpflb.inspect import show

    return show(Path(args.pin_root), as_json=args.json)


WORKSHOP = "bpflb_lab"
WORKSHOP_VERBS = ("lab", "bench", "bench-kube")
WORKSHOP_MISSING = ("bpflb {verb}: the lab and the benchmarks are not part of this installation (the image "
                    "carries the agent and the operator only); in a clone of the repository run "
                    "`make venv`, or `pip install -e '.[lab]'`")


def _workshop_missing(args: argparse.Namespace) -> int:
    print(WORKSHOP_MISSING.format(verb=args.command), file=sys.stderr)
    return 2


def register_workshop(sub: Any) -> bool:
    """Add the workshop's verbs when its package is installed (True); otherwise verbs that say how to get it."""
    try:
        workshop = importlib.import_module(f"{WORKSHOP}.cli")
    except ModuleNotFoundError as exc:
        if exc.name is None or not (exc.name == WORKSHOP or exc.name.startswith(WORKSHOP + ".")):
            raise
        for verb in WORKSHOP_VERBS:
            stub = sub.add_parser(verb, help="(not installed: the workshop package bpflb_lab)", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=_workshop_missing)
        return False
    workshop.register(sub)
    return True


def _workshop_later(args: argparse.Namespace) -> int:
    raise AssertionError("main() parses a workshop verb with the workshop's own parser")     # pragma: no cover


def build_parser(workshop: bool = True) -> argparse.ArgumentParser:
    """The command line; workshop=False leaves the workshop's verbs as names only (its package is not
    imported: the agent and the operator, on every node, carry none of it in memory)."""
    parser = argparse.ArgumentParser(prog="bpflb", description="BPF load balancer for Kubernetes Services")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the node agent (programs this node's datapath)")
    agent.add_argument("--node-name", required=True, help="the Node object this agent runs for")
    where = agent.add_mutually_exclusive_group(required=True)
    where.add_argument("--source-dir",
                       help="directory of Kubernetes YAML (Services, EndpointSlices, Nodes, agent ConfigMap)")
    where.add_argument("--kube", action="store_true",
                       help="list+watch the Kubernetes API instead (and report this node's state there)")
    agent.add_argument("--kubeconfig", help="with --kube: kubeconfig file (default: $KUBECONFIG, else the "
                       "in-cluster service account)")
    agent.add_argument("--namespace", help="with --kube: bpflb's namespace, where the agents' ConfigMap and the "
                       "node reports are (default: $POD_NAMESPACE, else kube-system)")
    agent.add_argument("--metrics-listen", metavar="ADDR:PORT",
                       help="serve Prometheus metrics (GET /metrics) and the probes (GET /healthz: the loop turns; "
                       "GET /readyz: the first sync is done) there, e.g. 0.0.0.0:9962")
    agent.add_argument("--list-page-size", type=_positive_int, metavar="N",
                       help="with --kube: objects per list request (limit/continue; default 500, as client-go). "
                       "The agent programs the Services page by page as their first list comes in")
    agent.add_argument("--pin-root", default=str(DEFAULT_PIN_ROOT), help="bpffs directory for pinned maps")
    agent.add_argument("--device", help="external device (default: the one holding the Node's InternalIP)")
    agent.add_argument("--mount-bpffs", action="store_true",
                       help="mount bpffs at /sys/fs/bpf when the pin root is on none (only for an agent run "
                            "directly on the host: in a pod the mount would be the pod's own, and die with it)")
    agent.add_argument("--nat-port-range", default="32768-65535", metavar="MIN-MAX",
                       help="source ports of SNAT'd flows, each unique per (backend address, backend port, "
                            "protocol); default 32768-65535 (Cilium's range)")
    agent.add_argument("--node-neigh-refresh", type=float, default=0.5, metavar="SECONDS",
                       help="every SECONDS, send each peer node on a link of this node a unicast ARP request to the "
                            "MAC its neighbour entry holds, and a broadcast one when that is not confirmed: a node "
                            "re-created with a new MAC is reached again within about this long (0: off; default 0.5)")
    agent.add_argument("--cgroup-root", metavar="DIR",
                       help="the cgroup v2 directory the socket LB attaches to: every process below it (the node's "
                            "pods and its own) is load-balanced at the socket (default: this mount namespace's "
                            "cgroup v2 root; in a pod, the host's, mounted in)")
    agent.add_argument("--no-socket-lb", action="store_true",
                       help="never attach the socket LB on this node, whatever the configuration's socketLB says")
    agent.add_argument("--once", action="store_true", help="sync once and exit")
    agent.add_argument("--healthz-bind-address", default="0.0.0.0:10256", metavar="ADDR:PORT",
                       help="kube-proxy's proxy health server (/healthz, /livez); '' for none (default 0.0.0.0:10256)")
    agent.add_argument("--no-health-servers", action="store_true",
                       help="serve neither the proxy health server nor the healthCheckNodePorts of eTP Local "
                            "LoadBalancer Services (a kube-proxy on the node serves them)")
    agent.add_argument("--uninstall", action="store_true",
                       help="detach the programs from --device and remove the pinned maps, then exit")
    agent.add_argument("-v", "--verbose", action="store_true")
    agent.set_defaults(func=cmd_agent)

    op = sub.add_parser("operator", help="run the operator (kopf): cni-cilium ModuleConfig -> agents")
    op.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else the in-cluster service account)")
    op.add_argument("--namespace", help="bpflb's namespace: the agents' ConfigMap and DaemonSet, the node reports, "
                    "the Lease (default: $POD_NAMESPACE, else kube-system)")
    op.add_argument("--image", help="the agents' container image")
    op.add_argument("--webhook-listen", metavar="ADDR:PORT", help="serve the validating admission webhook (HTTPS)")
    op.add_argument("--webhook-host", help="host name or address the API server reaches the webhook by")
    op.add_argument("--webhook-cadump", metavar="PATH", help="write the webhook's CA bundle there")
    op.add_argument("--webhook-managed", metavar="NAME",
                    help="keep a ValidatingWebhookConfiguration of this name pointing at the webhook")
    op.add_argument("--webhook-configuration", metavar="NAME",
                    help="publish the webhook's CA bundle into this (chart-made) ValidatingWebhookConfiguration")
    op.add_argument("--webhook-cert-dir", metavar="DIR",
                    help="serve the webhook with DIR/tls.crt and DIR/tls.key instead of a self-signed certificate")
    op.add_argument("--health-listen", metavar="ADDR:PORT", help="serve the liveness probe (GET /healthz) there")
    op.add_argument("--metrics-listen", metavar="ADDR:PORT", help="serve Prometheus metrics (GET /metrics) there")
    op.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                    help="only the replica holding the Lease <namespace>/bpflb-operator acts (default: on)")
    op.add_argument("--identity", help="this replica's name in the Lease (default: $POD_NAME, else host-pid-random)")
    op.add_argument("--lease-duration", type=float, default=15.0, metavar="SECONDS",
                    help="a standby takes over after the leader has not renewed for this long (default 15)")
    op.add_argument("--renew-deadline", type=float, default=10.0, metavar="SECONDS",
                    help="the leader stops acting when it could not renew for this long (default 10)")
    op.add_argument("--retry-period", type=float, default=2.0, metavar="SECONDS",
                    help="between two renewals or acquisition attempts (default 2)")
    op.add_argument("--agent-pod-config", metavar="FILE",
                    help="YAML: the agents' pod settings (resources, tolerations, nodeSelector, ...; the Helm chart's)")
    op.add_argument("-v", "--verbose", action="store_true")
    op.set_defaults(func=cmd_operator)

    mnt = sub.add_parser("mount-bpffs", help="mount the node's bpffs (the agents' init container runs it on the "
                                             "host's /sys/fs/bpf); nothing when one is mounted there")
    mnt.add_argument("path", nargs="?", default="/sys/fs/bpf")
    mnt.set_defaults(func=cmd_mount_bpffs)

    insp = sub.add_parser("inspect", help="show a node's frontends, backends, flows and counters")
    insp.add_argument("--pin-root", default=str(DEFAULT_PIN_ROOT))
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=cmd_inspect)

    if workshop:
        register_workshop(sub)
    else:
        for verb in WORKSHOP_VERBS:
            sub.add_parser(verb, help="the lab and the benchmarks (bpflb_lab)",
                           add_help=False).set_defaults(func=_workshop_later)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(workshop=bool(argv) and argv[0] in WORKSHOP_VERBS)
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
