"""Traffic for the rate benchmark (`bpflb bench`), always inside lab namespaces: an XDP live-frames UDP
sender (bpf_objects/bpf_gen.c), XDP sinks that count what reaches the backend pods, a TCP connection
storm (native/connstorm.c; its listeners are native/connbench.c `serve`).

The functions named `*_in_ns` run inside a namespace: call them through `Lab.run_in(host, fn, ...)`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bpflb.datapath.libbpf import check, ffi, lib, objects_dir, possible_cpus
from bpflb.datapath.loader import BpfObject, xdp_attach

GEN_OBJECT = "bpf_gen.o"
GEN_MAGIC = b"BPLB"             # the first payload bytes of every generated frame (xdp_sink counts them)
GEN_FLOWS, GEN_BASE_PORT = 0, 1  # gen_config indexes (bpf_gen.c)
GEN_HDR_LEN = 56                 # header bytes xdp_gen rewrites from gen_template on every frame
SINK_MAP = "sink_count"
FRAME_SIZE = 60                 # bytes without the FCS: the classic 64-byte packet-rate test frame


# ------------------------------------------------------------------------------------------ frames

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, dport: int, *, sport: int = 40000,
              size: int = FRAME_SIZE) -> bytes:
    """An Ethernet/IPv4/UDP frame of `size` bytes whose payload starts with GEN_MAGIC (UDP checksum 0)."""
    payload = GEN_MAGIC + bytes(max(0, size - 14 - 20 - 8 - len(GEN_MAGIC)))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + udp


# ------------------------------------------------------------------------------------------ XDP programs

def _update_u32(obj: BpfObject, map_name: str, key: int, value: int) -> None:
    f = ffi()
    fd = obj.map_fd(map_name)
    check(lib().bpf_map_update_elem(fd, f.new("__u32 *", key), f.new("__u32 *", value), 0),
          f"update of map {map_name}")


@dataclass(frozen=True)
class SendResult:
    """What one live-frames sender run put on the wire."""

    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def live_send_in_ns(frame: bytes, seconds: float, device: str = "eth0", *, flows: int = 256,
                    base_port: int = 20000, batch: int = 64, chunk: int = 100_000,
                    cpu: int | None = None) -> SendResult:
    """Transmit `frame` out of `device` (in the current namespace) for about `seconds`, as fast as one CPU
    can: xdp_gen runs under BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES and ingress_ifindex =
    device, and XDP_TX sends each frame. Source ports cycle over `flows` ports from base_port.
    cpu pins this process first. Raises BpfError when the kernel refuses live frames (before 5.18)."""
    if len(frame) < GEN_HDR_LEN:
        raise ValueError(f"frames must be at least {GEN_HDR_LEN} bytes; got {len(frame)}")
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    obj = BpfObject(objects_dir() / GEN_OBJECT, None)
    try:
        _update_u32(obj, "gen_config", GEN_FLOWS, flows)
        _update_u32(obj, "gen_config", GEN_BASE_PORT, base_port)
        f = ffi()
        check(lib().bpf_map_update_elem(obj.map_fd("gen_template"), f.new("__u32 *", 0),
                                        f.new("char[]", frame[:GEN_HDR_LEN]), 0), "update of map gen_template")
        sent, elapsed = 0, 0.0
        start = time.monotonic()
        while elapsed < seconds:
            obj.test_run_xdp_live("xdp_gen", frame, ifindex=socket.if_nametoindex(device), repeat=chunk,
                                  batch_size=batch)
            sent += chunk
            elapsed = time.monotonic() - start
        return SendResult(sent, elapsed)
    finally:
        obj.close()


def attach_in_ns(prog: str, device: str, pin_dir: str | None = None) -> str:
    """Attach one of bpf_gen.o's programs to device in driver (native) mode; its pinned maps (the sink's
    counter) go under pin_dir. Returns the mode. The attachment outlives this process (netlink XDP)."""
    obj = BpfObject(objects_dir() / GEN_OBJECT, Path(pin_dir) if pin_dir else None)
    try:
        return xdp_attach(obj.prog_fd(prog), socket.if_nametoindex(device), "Native")
    finally:
        obj.close()


def read_sink(pin_dir: Path) -> int:
    """Generated frames an xdp_sink counted so far (summed over CPUs), from its pinned map."""
    f = ffi()
    fd = check(lib().bpf_obj_get(str(pin_dir / SINK_MAP).encode()), f"opening {pin_dir / SINK_MAP}")
    try:
        ncpu = possible_cpus()
        values = f.new("__u64[]", ncpu)
        check(lib().bpf_map_lookup_elem(fd, f.new("__u32 *", 0), values), f"reading {pin_dir / SINK_MAP}")
        return int(sum(values[i] for i in range(ncpu)))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ TCP

@dataclass
class ConnResult:
    """What a connection storm achieved: handshakes completed, attempts that failed and why."""

    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


CONNSTORM = "bpflb-connstorm"   # native/connstorm.c, built by `make` next to the BPF objects


def connection_storm_in_ns(addr: str, port: int, seconds: float, concurrency: int = 64,
                           timeout: float = 1.0, threads: int = 1) -> ConnResult:
    """Open new TCP connections to addr:port for `seconds`, `concurrency` at a time in each of `threads`
    threads: each one counts once its handshake completes, and is then closed with a RST (the client keeps
    no TIME_WAIT, as load generators do). An attempt unanswered after `timeout` (a lost SYN would be retried
    only after 1 s) counts as failed. Runs bpflb-connstorm (C: a Python client spent ~40 us of its own per
    connection and was the ceiling of every row) in the caller's namespace."""
    tool = objects_dir() / CONNSTORM
    if not tool.exists():
        raise FileNotFoundError(f"{tool} is missing: build it with `make bpf`")
    done = subprocess.run([str(tool), addr, str(port), str(seconds), str(concurrency), str(int(timeout * 1000)),
                           str(threads)], capture_output=True, text=True, timeout=seconds + timeout + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{CONNSTORM} failed (exit {done.returncode}): {done.stderr.strip()}")
    out = json.loads(done.stdout)
    return ConnResult(ok=int(out["ok"]), failed=int(out["failed"]), seconds=float(out["seconds"]),
                      errors={str(k): int(v) for k, v in out["errors"].items()})
