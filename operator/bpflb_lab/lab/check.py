"""`lab check`: what the client should see at every frontend of the lab's Services, probing it, and a
readable verdict table.

The expectation rules live in expect(), which takes the load-balancing mode; SNAT is kube-proxy's
behaviour, DSR keeps the client address for remote backends, Hybrid is DSR for TCP and SNAT for UDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import Any

from bpflb.model.types import Mode
from bpflb_lab.lab import topology
from bpflb_lab.lab.probe import HttpProbe, Probe, ProbeResult, UdpProbe
from bpflb_lab.lab.table import format_table

KubeObject = dict[str, Any]
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"

ANSWER, REFUSED, DROP, SKIP = "answer", "refused", "drop", "skip"


@dataclass(frozen=True)
class EndpointView:
    """One endpoint of a Service port as the EndpointSlices describe it."""

    pod: str
    node: str | None
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True)
class Expectation:
    """What a client should observe at one frontend."""

    outcome: str                                   # answer | refused | drop | skip
    sees: Mapping[str, str] = field(default_factory=dict)  # outcome answer: pod -> client address it sees
    why: str = ""

    def text(self) -> str:
        if self.outcome == REFUSED:
            return f"connection refused ({self.why})"
        if self.outcome == DROP:
            return f"no answer ({self.why})"
        if self.outcome == SKIP:
            return f"skipped ({self.why})"
        addrs = set(self.sees.values())
        if len(addrs) == 1:
            return f"answer from {'|'.join(sorted(self.sees))}, client address {addrs.pop()}"
        return "answer from " + " | ".join(f"{p} seeing {a}" for p, a in sorted(self.sees.items()))


def _usable(endpoints: Sequence[EndpointView]) -> list[EndpointView]:
    """Endpoints new connections may use: the ready ones, else the serving terminating ones."""
    ready = [e for e in endpoints if e.ready]
    return ready or [e for e in endpoints if e.serving and e.terminating]


def expect(mode: Mode, *, proto: str, local_only: bool, receiving_node: str, receiving_ip: str,
           client_ip: str, endpoints: Sequence[EndpointView]) -> Expectation:
    """What the client sees when it hits a frontend through receiving_node.

    - No usable endpoint anywhere: the connection is refused (ICMP port unreachable), even for eTP Local.
    - externalTrafficPolicy Local: only endpoints on the receiving node, which see the client's address;
      none there: the packet is dropped.
    - externalTrafficPolicy Cluster: any endpoint; a local one sees the client's address, a remote one sees
      the receiving node's address under SNAT, the client's under DSR (Hybrid: DSR for TCP only).
    """
    usable = _usable(endpoints)
    if not usable:
        return Expectation(REFUSED, why="no endpoints")
    if local_only:
        local = _usable([e for e in endpoints if e.node == receiving_node])
        if not local:
            return Expectation(DROP, why=f"eTP Local, no local pod on {receiving_node}")
        return Expectation(ANSWER, {e.pod: client_ip for e in local}, "eTP Local")
    dsr = mode == Mode.DSR or (mode == Mode.HYBRID and proto == "TCP")
    sees = {e.pod: client_ip if (e.node == receiving_node or dsr) else receiving_ip for e in usable}
    return Expectation(ANSWER, sees, "eTP Cluster")


@dataclass
class Scenario:
    """One frontend of one Service port, what should happen there, and the probes that find out."""

    service: str           # namespace/name
    port_name: str
    port: int              # the Service port
    proto: str
    svc_type: str
    etp: str
    kind: str              # NodePort | LoadBalancer | ExternalIP
    addr: str
    frontend_port: int
    via: str | None        # the node the frontend is reached through
    expectation: Expectation
    probes: list[Probe] = field(default_factory=list)

    @property
    def frontend(self) -> str:
        return f"{self.addr}:{self.frontend_port}"


def endpoints_for(svc: KubeObject, port: Mapping[str, Any], slices: Iterable[KubeObject]) -> list[EndpointView]:
    """The endpoints the Service's EndpointSlices list for one Service port (matched by name and protocol)."""
    meta = svc.get("metadata") or {}
    ns, name = meta.get("namespace", "default"), meta.get("name")
    out = []
    for sl in slices:
        smeta = sl.get("metadata") or {}
        if smeta.get("namespace", "default") != ns or \
                (smeta.get("labels") or {}).get("kubernetes.io/service-name") != name:
            continue
        if not any(p.get("name", "") == port.get("name", "") and p.get("protocol", "TCP") == port.get("protocol", "TCP")
                   for p in sl.get("ports") or []):
            continue
        for ep in sl.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False
            ref = ep.get("targetRef") or {}
            out.append(EndpointView(pod=ref.get("name") or ep["addresses"][0], node=ep.get("nodeName"),
                                    ready=ready, serving=cond.get("serving", ready) is not False,
                                    terminating=bool(cond.get("terminating"))))
    return out


def plan(services: Iterable[KubeObject], slices: Sequence[KubeObject], nodes: int, mode: Mode,
         timeout: float = 1.0) -> list[Scenario]:
    """Every north-south frontend of every Service, with its expectation and probes."""
    scenarios = []
    client_ip = str(topology.CLIENT_IP)
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", "default"), s["metadata"]["name"])):
        meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
        key = f"{meta.get('namespace', 'default')}/{meta['name']}"
        svc_type = spec.get("type", "ClusterIP")
        etp = spec.get("externalTrafficPolicy") or "Cluster"
        not_ours = None
        if (meta.get("labels") or {}).get(PROXY_NAME_LABEL):
            not_ours = f"{PROXY_NAME_LABEL} set: another proxy's Service"
        lb_ips = [i.get("ip") for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
                  if i.get("ip")] if svc_type == "LoadBalancer" else []
        for port in spec.get("ports") or []:
            proto = port.get("protocol", "TCP")
            frontends: list[tuple[str, str, int]] = []
            if port.get("nodePort") and svc_type in ("NodePort", "LoadBalancer"):
                frontends += [("NodePort", str(topology.node_ip(k)), port["nodePort"]) for k in range(1, nodes + 1)]
            frontends += [("LoadBalancer", ip, port["port"]) for ip in lb_ips]
            frontends += [("ExternalIP", ip, port["port"]) for ip in spec.get("externalIPs") or []]
            endpoints = endpoints_for(svc, port, slices)
            for kind, addr, fport in frontends:
                try:
                    parsed = ip_address(addr)
                except ValueError:
                    continue
                k = topology.receiving_node(parsed, nodes) if isinstance(parsed, IPv4Address) else None
                via = topology.node_name(k) if k else None
                if not_ours:
                    exp = Expectation(SKIP, why=not_ours)
                elif k is None:
                    exp = Expectation(SKIP, why="not routable from the client")
                else:
                    exp = expect(mode, proto=proto, local_only=etp == "Local",
                                 receiving_node=topology.node_name(k), receiving_ip=str(topology.node_ip(k)),
                                 client_ip=client_ip, endpoints=endpoints)
                probes: list[Probe] = []
                if exp.outcome != SKIP:
                    if proto == "TCP":
                        probes = [HttpProbe(addr, fport, ("/hostname",), timeout),
                                  HttpProbe(addr, fport, ("/clientip",), timeout)]
                    else:
                        probes = [UdpProbe(addr, fport, ("hostname", "clientip"), timeout)]
                scenarios.append(Scenario(key, port.get("name", ""), port["port"], proto, svc_type, etp, kind,
                                          addr, fport, via, exp, probes))
    return scenarios


@dataclass
class CheckRow:
    """One probe's verdict."""

    service: str
    port_name: str
    kind: str
    frontend: str
    proto: str
    via: str | None
    request: str
    expected: str
    answered: str | None
    client_seen: str | None
    error: str | None
    verdict: str          # PASS | FAIL | SKIP
    reason: str = ""


def _request_text(probe: Probe | None) -> str:
    if isinstance(probe, HttpProbe):
        return " ".join(f"GET {p}" for p in probe.paths)
    if isinstance(probe, UdpProbe):
        return "UDP " + "+".join(probe.messages)
    return "-"


def judge(exp: Expectation, result: ProbeResult) -> tuple[str, str]:
    """PASS/FAIL of one probe result against an expectation, with the reason for a FAIL."""
    if exp.outcome == REFUSED:
        if result.error == "connection refused":
            return "PASS", ""
        return "FAIL", f"got {_got(result)}"
    if exp.outcome == DROP:
        if result.error == "timeout":
            return "PASS", ""
        return "FAIL", f"got {_got(result)}"
    if result.error is not None:
        return "FAIL", f"got {result.error}"
    if result.pod is None or result.pod not in exp.sees:
        return "FAIL", f"answer from {result.pod}, which may not serve this frontend"
    want = exp.sees[result.pod]
    if result.client_ip != want:
        return "FAIL", f"{result.pod} saw {result.client_ip}, expected {want}"
    return "PASS", ""


def _got(result: ProbeResult) -> str:
    if result.error is None:
        return f"an answer from {result.pod}"
    return result.error


def _row(sc: Scenario, request: str, result: ProbeResult | None, verdict: str, reason: str = "") -> CheckRow:
    return CheckRow(service=sc.service, port_name=sc.port_name, kind=sc.kind, frontend=sc.frontend,
                    proto=sc.proto, via=sc.via, request=request, expected=sc.expectation.text(),
                    answered=result.pod if result else None, client_seen=result.client if result else None,
                    error=result.error if result else None, verdict=verdict, reason=reason)


def evaluate(scenarios: Sequence[Scenario], results: Sequence[ProbeResult]) -> list[CheckRow]:
    """Rows for scenarios, given the results of their probes in plan order."""
    rows = []
    it = iter(results)
    for sc in scenarios:
        if not sc.probes:
            rows.append(_row(sc, "-", None, "SKIP"))
            continue
        for probe in sc.probes:
            result = next(it)
            verdict, reason = judge(sc.expectation, result)
            rows.append(_row(sc, _request_text(probe), result, verdict, reason))
    return rows


@dataclass
class CheckReport:
    lab: str
    mode: str
    rows: list[CheckRow]
    elapsed: float = 0.0

    @property
    def failed(self) -> int:
        return sum(r.verdict == "FAIL" for r in self.rows)

    @property
    def passed(self) -> int:
        return sum(r.verdict == "PASS" for r in self.rows)

    @property
    def skipped(self) -> int:
        return sum(r.verdict == "SKIP" for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        return {"lab": self.lab, "mode": self.mode, "ok": self.ok, "passed": self.passed, "failed": self.failed,
                "skipped": self.skipped, "elapsed": round(self.elapsed, 3), "rows": [asdict(r) for r in self.rows]}

    def render(self) -> str:
        """The human report: one table per Service port, then a summary line."""
        out: list[str] = []
        groups: dict[tuple[str, str, str], list[CheckRow]] = {}
        for row in self.rows:
            groups.setdefault((row.service, row.port_name, row.proto), []).append(row)
        if not groups:
            out.append("no NodePort, LoadBalancer or externalIP frontends: nothing to check")
        for (service, port_name, proto), rows in groups.items():
            label = f"port {port_name} " if port_name else ""
            out.append(f"Service {service} {label}({proto}), mode {self.mode}")
            header = ("FRONTEND", "KIND", "VIA", "REQUEST", "EXPECTED", "ANSWERED", "CLIENT SEEN", "RESULT")
            out += format_table(header, [
                (r.frontend, r.kind, r.via or "-", r.request, r.expected,
                 r.answered or (f"({r.error})" if r.error else "-"), r.client_seen or "-",
                 r.verdict + (f": {r.reason}" if r.reason else "")) for r in rows], indent="  ")
            out.append("")
        verdict = "PASS" if self.ok else "FAIL"
        out.append(f"{verdict}: {self.passed} passed, {self.failed} failed, {self.skipped} skipped "
                   f"({self.elapsed:.1f}s)")
        return "\n".join(out)
