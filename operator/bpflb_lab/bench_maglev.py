"""`bpflb bench --maglev`: what Maglev costs the control plane. Table builds (the C helper beside the
plain-Python reference, as ratios, against the goals), and programming 1,000 Maglev services into this
node's maps: LBMaps.sync end to end, batched versus one-by-one block writes, and the map-in-map layout
(one inner array per service, Cilium's) measured on this kernel for comparison. Also the datapath's cost of
a new flow per selection method (BPF_PROG_TEST_RUN), so the table lookup's price is visible."""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import cffi
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpflb.datapath.lbmaps import LBMaps, NodeConfig, table_blocks, update_batch
from bpflb.datapath.loader import load_lb
from bpflb.model import maglev
from bpflb.model.types import (
    AgentSettings,
    Algorithm,
    Backend,
    DesiredState,
    Frontend,
    FrontendKind,
    L4Addr,
    Mode,
    Proto,
)
from bpflb_lab.lab.netns import entered
from bpflb_lab.scratch import CLIENT, CLIENT_MAC, ETH0_MAC, NODE1, REMOTE_POD, scratch_node

M = maglev.DEFAULT_TABLE_SIZE
BUILD_GOALS_MS = {100: 5.0, 1000: 30.0}          # issue 8: M=16381
SERVICES = 1000
BACKENDS_PER_SERVICE = 10

_MAP_CDEF = """
struct bpf_map_create_opts {
    size_t sz; uint32_t btf_fd; uint32_t btf_key_type_id; uint32_t btf_value_type_id;
    uint32_t btf_vmlinux_value_type_id; uint32_t inner_map_fd; uint32_t map_flags; uint64_t map_extra;
    uint32_t numa_node; uint32_t map_ifindex;
};
struct bpf_map_batch_opts { size_t sz; uint64_t elem_flags; uint64_t flags; };
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const struct bpf_map_create_opts *opts);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                         const struct bpf_map_batch_opts *opts);
"""
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12


def _say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of fn in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _names(n: int, prefix: str = "pod") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def build_times(quick: bool) -> list[dict[str, Any]]:
    """Table builds at M=16381: C helper vs plain Python, end to end (hashes of the names included)."""
    rows = []
    for n in (10, 100, 1000):
        names = _names(n)
        native = _ms(functools.partial(maglev.build_slots, names, M, 0), 5 if quick else 21)
        plain = _ms(functools.partial(maglev.build_slots, names, M, 0, native=False), 2 if quick else 5)
        goal = BUILD_GOALS_MS.get(n)
        rows.append({"backends": n, "native_ms": native, "python_ms": plain, "ratio": plain / native,
                     "goal_ms": goal, "met": None if goal is None else native <= goal})
    return rows


def _state(services: int, per_service: int, extra: int = 0, algorithm: Algorithm = Algorithm.MAGLEV) -> DesiredState:
    """`services` LoadBalancer frontends with distinct backends (no two tables alike: no cache sharing)."""
    fes: dict[L4Addr, Frontend] = {}
    base_fe, base_be = int(IPv4Address("198.19.0.1")), int(IPv4Address("10.96.0.1"))
    for s in range(services):
        l4 = L4Addr(IPv4Address(base_fe + s), 80, Proto.TCP)
        bes = tuple(Backend(L4Addr(IPv4Address(base_be + s * 64 + b), 8080, Proto.TCP), f"svc{s}-pod{b}", "node2",
                            False) for b in range(per_service + extra))
        fes[l4] = Frontend(l4, FrontendKind.LOADBALANCER, f"bench/svc-{s}", "http", False, bes, False,
                           algorithm=algorithm)
    return DesiredState("node1", (IPv4Address("198.18.0.11"),), fes, settings=AgentSettings(algorithm=algorithm))


def program_times() -> dict[str, Any]:
    """1,000 Maglev services through LBMaps.sync, and the cost of the block writes on their own."""
    out: dict[str, Any] = {"services": SERVICES, "backends_per_service": BACKENDS_PER_SERVICE}
    cfg = NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address("198.18.0.11"), ext_ifindex=1)
    random_state = _state(SERVICES, BACKENDS_PER_SERVICE, algorithm=Algorithm.RANDOM)
    first, grown = _state(SERVICES, BACKENDS_PER_SERVICE), _state(SERVICES, BACKENDS_PER_SERVICE, extra=1)
    obj = load_lb(None)
    try:
        maps = LBMaps(obj)
        maps.set_config(cfg)
        start = time.perf_counter()
        maps.sync(random_state)
        out["random_first_sync_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        report = maps.sync(first)
        out["maglev_switch_sync_ms"] = (time.perf_counter() - start) * 1000
        out["blocks"] = report.maglev_blocks_written
        start = time.perf_counter()
        report = maps.sync(grown)
        out["maglev_all_changed_sync_ms"] = (time.perf_counter() - start) * 1000
        out["all_changed_blocks"] = report.maglev_blocks_written
        start = time.perf_counter()
        report = maps.sync(grown)
        out["maglev_unchanged_sync_ms"] = (time.perf_counter() - start) * 1000
        assert not report.changed
    finally:
        obj.close()
    tables = [maglev.build_slots([b.name for b in fe.backends], M, 0) for fe in first.frontends.values()]
    start = time.perf_counter()
    tables = [maglev.build_slots([b.name for b in fe.backends], M, 0) for fe in first.frontends.values()]
    out["build_1000_tables_ms"] = (time.perf_counter() - start) * 1000
    blocks = [(i.to_bytes(4, "little") + b.to_bytes(4, "little"), blk)
              for i, t in enumerate(tables, start=1) for b, blk in enumerate(table_blocks(t.tobytes()))]
    out["table_bytes"] = sum(len(v) for _, v in blocks)
    writes: dict[str, list[float]] = {}
    for _ in range(3):
        for how in ("batch", "single"):
            obj = load_lb(None)
            try:
                mg = LBMaps(obj).maglev
                for phase in ("new", "overwrite"):
                    start = time.perf_counter()
                    if how == "batch":
                        update_batch(mg, blocks)
                    else:
                        for k, v in blocks:
                            mg.update_raw(k, v)
                    writes.setdefault(f"write_{how}_{phase}_ms", []).append((time.perf_counter() - start) * 1000)
            finally:
                obj.close()
    out.update({k: statistics.median(v) for k, v in writes.items()})
    return out


@cache
def _libbpf() -> tuple[Any, Any]:
    f = cffi.FFI()
    f.cdef(_MAP_CDEF)
    return f, f.dlopen("libbpf.so.1")


def _map(kind: int, value_size: int, entries: int, inner_fd: int = 0) -> int:
    f, lib = _libbpf()
    opts = f.new("struct bpf_map_create_opts *", {"sz": f.sizeof("struct bpf_map_create_opts"),
                                                   "inner_map_fd": inner_fd})
    fd = int(lib.bpf_map_create(kind, b"bench_mim", 4, value_size, entries, opts))
    if fd < 0:
        raise OSError(-fd, f"bpf_map_create(type {kind}) failed")
    return fd


def map_in_map_times(per_update_samples: int) -> dict[str, Any]:
    """Cilium's layout: an ARRAY_OF_MAPS whose slot i holds service i's inner ARRAY of M backend ids.
    Each user-space update of the outer map waits for an RCU grace period on this kernel."""
    import os

    f, lib = _libbpf()
    out: dict[str, Any] = {}
    template = _map(BPF_MAP_TYPE_ARRAY, 4, M)
    outer = _map(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, SERVICES, inner_fd=template)
    fds = [template, outer]
    try:
        keys = f.new("uint32_t[]", list(range(M)))
        values = f.new("uint32_t[]", M)
        opts = f.new("struct bpf_map_batch_opts *", {"sz": f.sizeof("struct bpf_map_batch_opts")})

        def inner() -> int:
            fd = _map(BPF_MAP_TYPE_ARRAY, 4, M)
            fds.append(fd)
            count = f.new("uint32_t *", M)
            if lib.bpf_map_update_batch(fd, keys, values, count, opts) < 0:
                raise OSError("batch fill of an inner map failed")
            return fd

        times = []
        for i in range(per_update_samples):
            fd = inner()
            start = time.perf_counter()
            if lib.bpf_map_update_elem(outer, f.new("uint32_t *", i), f.new("uint32_t *", fd), 0) < 0:
                raise OSError("outer map update failed")
            times.append(time.perf_counter() - start)
        out["outer_update_ms"] = statistics.median(times) * 1000
        start = time.perf_counter()
        inner_fds = [inner() for _ in range(SERVICES)]
        out["create_and_fill_1000_inner_ms"] = (time.perf_counter() - start) * 1000
        count = f.new("uint32_t *", SERVICES)
        start = time.perf_counter()
        rc = lib.bpf_map_update_batch(outer, f.new("uint32_t[]", list(range(SERVICES))),
                                      f.new("uint32_t[]", inner_fds), count, opts)
        out["outer_batch_1000_ms"] = (time.perf_counter() - start) * 1000 if rc == 0 else None
    finally:
        for fd in fds:
            os.close(fd)
    return out


SELECTIONS = (("Random", Algorithm.RANDOM, 0), ("Maglev", Algorithm.MAGLEV, 0),
              ("Maglev + ClientIP affinity", Algorithm.MAGLEV, 10800))


def new_flow_times(samples: int) -> dict[str, float]:
    """Median ns of lb_ingress on a new NodePort flow (SNAT to a remote pod), per selection method."""
    out: dict[str, float] = {}
    with scratch_node("bpflb-h8bench") as sn:
        for label, algorithm, affinity in SELECTIONS:
            l4 = L4Addr(IPv4Address(NODE1), 30080, Proto.TCP)
            bes = tuple(Backend(L4Addr(IPv4Address(REMOTE_POD), 8080 + i, Proto.TCP), f"echo-{i}", "node2", False)
                        for i in range(10))
            fe = Frontend(l4, FrontendKind.NODEPORT, "bench/echo", "http", False, bes, False, algorithm=algorithm,
                          affinity_timeout=affinity)
            obj = load_lb(None)
            try:
                maps = LBMaps(obj)
                maps.set_config(NodeConfig(mode=Mode.SNAT, snat_addr=IPv4Address(NODE1), ext_ifindex=sn.eth0))
                maps.sync(DesiredState("node1", (IPv4Address(NODE1),), {l4: fe}))
                frames = [bytes(Ether(src=CLIENT_MAC, dst=ETH0_MAC) / IP(src=CLIENT, dst=NODE1, ttl=64) /
                                TCP(sport=10000 + i, dport=30080, flags="S")) for i in range(samples)]
                with entered(sn.ns):
                    out[label] = float(statistics.median(
                        obj.test_run("lb_ingress", f, ifindex=sn.eth0).duration_ns for f in frames))
            finally:
                obj.close()
    return out


def _row(label: str, value: float, unit: str) -> str:
    return f"  {label:<68}{value:>9.1f} {unit}"


def _render(builds: list[dict[str, Any]], prog: dict[str, Any], mim: dict[str, Any],
            flows: dict[str, float]) -> str:
    rule = "-" * 82
    head = f"{f'Maglev table build, M={M:,} (median ms)':<44}{'C helper':>10}{'plain Python':>14}{'ratio':>8}   goal"
    lines = [head, rule]
    for r in builds:
        goal = "-" if r["goal_ms"] is None else f"<= {r['goal_ms']:.0f} ms: {'met' if r['met'] else 'NOT met'}"
        lines.append(f"  {r['backends']:>5,} backends{'':<28}{r['native_ms']:>10.2f}{r['python_ms']:>14.2f}"
                     f"{r['ratio']:>7.1f}x   {goal}")
    s, n, blocks = prog["services"], prog["backends_per_service"], prog["blocks"]
    title = (f"Programming {s:,} Maglev services ({n} backends each, M={M:,}: {blocks // s} blocks of 16 KiB "
             f"per table, {prog['table_bytes'] / 2**20:.0f} MiB in all)")
    lines += ["", title, rule,
              _row("LBMaps.sync of these services with Random (no tables), first sync",
                   prog["random_first_sync_ms"], "ms"),
              _row(f"LBMaps.sync switching them all to Maglev (build, write {blocks:,} blocks)",
                   prog["maglev_switch_sync_ms"], "ms"),
              _row(f"LBMaps.sync after every service gained a backend ({prog['all_changed_blocks']:,} blocks)",
                   prog["maglev_all_changed_sync_ms"], "ms"),
              _row("LBMaps.sync with nothing changed (tables from the cache)", prog["maglev_unchanged_sync_ms"],
                   "ms"),
              _row(f"of which: building the {s:,} tables (C helper)", prog["build_1000_tables_ms"], "ms"),
              _row(f"writing {blocks:,} new blocks: one bpf_map_update_batch call", prog["write_batch_new_ms"], "ms"),
              _row(f"writing {blocks:,} new blocks: {blocks:,} bpf_map_update_elem calls",
                   prog["write_single_new_ms"], "ms"),
              _row(f"overwriting {blocks:,} blocks: one bpf_map_update_batch call", prog["write_batch_overwrite_ms"],
                   "ms"),
              _row(f"overwriting {blocks:,} blocks: {blocks:,} bpf_map_update_elem calls",
                   prog["write_single_overwrite_ms"], "ms"),
              "", "Map-in-map layout for comparison (outer ARRAY_OF_MAPS, one inner ARRAY of M ids per service)",
              rule,
              _row("one outer-map update from user space (waits for an RCU grace period)",
                   mim["outer_update_ms"], "ms"),
              _row(f"=> {s:,} services changed one at a time (a sync per change)",
                   mim["outer_update_ms"] * s / 1000, "s"),
              _row(f"creating and filling {s:,} inner maps", mim["create_and_fill_1000_inner_ms"], "ms")]
    if mim.get("outer_batch_1000_ms") is not None:
        lines.append(_row(f"the {s:,} outer updates as one batch call", mim["outer_batch_1000_ms"], "ms"))
    lines += ["", "Datapath: lb_ingress on a new NodePort flow (SNAT, 10 backends; median ns, repeat=1)", rule]
    lines += [_row(label, ns, "ns") for label, ns in flows.items()]
    return "\n".join(lines)


def run_maglev_bench(quick: bool = False, out_dir: Path | None = None) -> int:
    print("bpflb bench --maglev: control-plane cost of Maglev tables", file=sys.stderr)
    if not maglev.native_available():
        print("bpflb bench --maglev: the C helper is not built (run `make`); refusing to report", file=sys.stderr)
        return 1
    _say("table builds: C helper and plain Python")
    builds = build_times(quick)
    _say(f"programming {SERVICES:,} Maglev services into a loaded bpf_lb.o")
    prog = program_times()
    _say("map-in-map layout: outer updates and inner maps")
    mim = map_in_map_times(5 if quick else 20)
    _say("datapath: new-flow cost per selection method")
    flows = new_flow_times(300 if quick else 3000)
    text = _render(builds, prog, mim, flows)
    print(text)
    out = out_dir or Path("results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-maglev.txt").write_text(text + "\n")
    (out / "bench-maglev.json").write_text(json.dumps({"builds": builds, "programming": prog, "map_in_map": mim, "new_flow_ns": flows},
                                                      indent=2))
    print(f"\nwritten: {out / 'bench-maglev.txt'}, {out / 'bench-maglev.json'}", file=sys.stderr)
    return 0 if all(r["met"] is not False for r in builds) else 1
