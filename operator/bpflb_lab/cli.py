"""The workshop's verbs of the `bpflb` command (`lab`, `bench`, `bench-kube`): the product's CLI calls
register() when this package is installed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_bench_kube(args: argparse.Namespace) -> int:
    from bpflb_lab.bench_kube import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.clusterip:
        from bpflb_lab.bench_clusterip import run_clusterip_bench

        return run_clusterip_bench(quick=args.quick, out_dir=Path(args.out) if args.out else None)
    if args.maglev:
        from bpflb_lab.bench_maglev import run_maglev_bench

        return run_maglev_bench(quick=args.quick, out_dir=Path(args.out) if args.out else None)
    from bpflb_lab.bench import run_bench

    out = Path(args.out) if args.out else None
    rates = {"datapaths": _datapaths(args.datapaths), "counts": _counts(args.services),
             "tcp_rounds": args.tcp_rounds, "kube_proxy_nodes": _nodes(args.kube_proxy_nodes)}   # refused first
    rc = 0 if args.rates_only else run_bench(quick=args.quick, out_dir=out)
    if not args.no_rates:
        from bpflb_lab.rates import run_rate_bench

        rc |= run_rate_bench(quick=args.quick, out_dir=out, acceleration=args.acceleration, **rates)
    return rc


def _datapaths(text: str | None) -> tuple[str, ...]:
    from bpflb_lab.rates import DATAPATHS

    if not text:
        return DATAPATHS
    short = {"xdp": "bpflb XDP", "tc": "bpflb tc", "iptables": "kube-proxy iptables",
             "nftables": "kube-proxy nftables"}
    picked = [w.strip().lower() for w in text.split(",") if w.strip()]
    unknown = [w for w in picked if w not in short]
    if unknown:
        raise SystemExit(f"bpflb bench: --datapaths: unknown {', '.join(unknown)} (expected some of "
                         f"{', '.join(short)})")
    return tuple(dp for key, dp in short.items() if key in picked)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _nodes(text: str | None) -> tuple[str, ...]:
    names = tuple(w.strip() for w in (text or "").split(",") if w.strip())
    wrong = [n for n in names if n not in ("node1", "node2", "node3")]
    if wrong:
        raise SystemExit(f"bpflb bench: --kube-proxy-nodes: unknown {', '.join(wrong)} (the rate labs have node1, "
                         "node2 and node3)")
    return names


def _counts(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        counts = tuple(sorted({int(w.replace("_", "")) for w in text.split(",") if w.strip()}))
    except ValueError:
        raise SystemExit(f"bpflb bench: --services: expected numbers separated by commas, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise SystemExit(f"bpflb bench: --services: expected Service counts of at least 1, got {text!r}")
    return counts


def register(sub: Any) -> None:
    """Add `bench-kube`, `bench` and `lab` to the bpflb command's subparsers."""
    from bpflb_lab.bench_kube import add_arguments as bench_kube_arguments

    bk = sub.add_parser("bench-kube", help="control-plane benchmarks: `latency` (lab --kube) and `fullsync`")
    bench_kube_arguments(bk)
    bk.set_defaults(func=cmd_bench_kube)

    bench = sub.add_parser("bench", help="measure the datapath's per-packet cost (BPF_PROG_TEST_RUN), then "
                                          "forwarding and connection rates against kube-proxy in labs")
    bench.add_argument("--quick", action="store_true", help="fewer services and repetitions (CI)")
    bench.add_argument("--out", help="directory for results (default: results/)")
    bench.add_argument("--maglev", action="store_true",
                       help="instead: Maglev table builds and programming 1,000 Maglev services (control plane)")
    bench.add_argument("--clusterip", action="store_true",
                       help="instead: connects/s from a pod to 1,000 ClusterIPs, bpflb's socket LB beside "
                            "kube-proxy iptables")
    rates = bench.add_mutually_exclusive_group()
    rates.add_argument("--no-rates", action="store_true",
                       help="only the per-packet cost, not the forwarding and connection rates against kube-proxy")
    rates.add_argument("--rates-only", action="store_true",
                       help="only the forwarding and connection rates (bpflb XDP and tc, kube-proxy iptables and "
                            "nftables, each in a lab of its own)")
    bench.add_argument("--acceleration", default="Native", choices=("Native", "BestEffort"),
                       help="xdpAcceleration of the rates' bpflb XDP row (default Native)")
    bench.add_argument("--datapaths", metavar="LIST",
                       help="rates: only these datapaths, comma-separated among xdp, tc, iptables, nftables")
    bench.add_argument("--services", metavar="LIST", help="rates: these Service counts, comma-separated "
                                                          "(default 10,1000,10000; --quick 10,1000)")
    bench.add_argument("--tcp-rounds", type=_positive, metavar="N",
                       help="rates: connection windows per cell (each beside its two reference windows)")
    bench.add_argument("--kube-proxy-nodes", metavar="LIST",
                       help="rates: the nodes that load kube-proxy's rules, e.g. node1 (default: every node, as "
                            "bpflb's agents)")
    bench.set_defaults(func=cmd_bench)

    from bpflb_lab.lab.commands import register as register_lab

    register_lab(sub)
