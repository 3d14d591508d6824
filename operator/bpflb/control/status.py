"""The ModuleConfig status, computed from what the agents report: conditions Ready, Progressing and
Degraded with reasons, the effective mode and tunnel, and how many nodes run the current configuration.
A pure function of its inputs, so the operator's timer and the tests share it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bpflb.control.report import ERROR, READY, REFUSED_KEY, STALE_AFTER, UNINSTALLED, parse_time
from bpflb.model.settings import (
    CONFIG_GENERATION_KEY,
    SETTINGS_VERSIONS,
    UNINSTALL_KEY,
    Invalid,
    agent_config_data,
    validate_spec,
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _names(nodes: list[str], limit: int = 5) -> str:
    shown = ", ".join(nodes[:limit])
    return shown + (f" and {len(nodes) - limit} more" if len(nodes) > limit else "")


def compute_status(spec: Any, applied: Mapping[str, str] | None, nodes: list[str],
                   reports: Mapping[str, Mapping[str, str]], now: float,
                   previous: Mapping[str, Any] | None = None, generation: int | None = None) -> dict[str, Any]:
    """The status for a cni-cilium ModuleConfig.

    spec: the ModuleConfig spec as written (validated here again); applied: the agents' ConfigMap data in
    force (None before the first valid configuration); nodes: the cluster's Node names; reports: the node
    reports by node name; previous: the current status (keeps lastTransitionTime of unchanged conditions).
    """
    invalid: Invalid | None = None
    wanted_generation: str | None = None
    try:
        valid = validate_spec(spec)
    except Invalid as exc:
        invalid = exc
    else:
        wanted_generation = agent_config_data(valid.settings, uninstall=not valid.enabled)[CONFIG_GENERATION_KEY]
    applied = applied or {}
    generation_wanted = applied.get(CONFIG_GENERATION_KEY, "")
    enabled = applied.get(UNINSTALL_KEY, "false") != "true"
    mode_wanted = applied.get("bpfLBMode", "")
    tunnel_wanted = applied.get("tunnelMode", "")
    total = len(nodes)

    fresh: dict[str, Mapping[str, str]] = {}
    for node in nodes:
        report = reports.get(node)
        updated = parse_time(report.get("updated")) if report else None
        if report is not None and updated is not None and now - updated <= STALE_AFTER:
            fresh[node] = report
    current = sorted(n for n, r in fresh.items()
                     if r.get("state") == READY and r.get(CONFIG_GENERATION_KEY) == generation_wanted)
    failing = sorted(n for n, r in fresh.items() if r.get("state") == ERROR)
    wrong_mode = sorted(n for n in current if fresh[n].get("bpfLBMode") != mode_wanted)
    uninstalled = sorted(n for n in nodes if n not in fresh or fresh[n].get("state") == UNINSTALLED)
    modes = sorted({r.get("bpfLBMode", "") for n, r in fresh.items() if r.get("state") == READY} - {""})
    tunnels = sorted({r.get("tunnelMode", "") for n, r in fresh.items() if r.get("state") == READY} - {""})

    degraded: list[tuple[str, str]] = []
    if invalid is not None:
        kept = (f"the last valid configuration (bpfLBMode {mode_wanted}, tunnelMode {tunnel_wanted}) stays in force"
                if applied else "no valid configuration has been applied yet")
        degraded.append(("InvalidConfiguration", f"{invalid}; {kept}"))
    if enabled and applied:
        if failing:
            degraded.append(("AgentError", f"{_names(failing)}: "
                             + "; ".join(fresh[n].get("message", "") for n in failing[:3])))
        if wrong_mode:
            runs = ", ".join(f"{n} runs {fresh[n].get('bpfLBMode') or 'nothing'}" for n in wrong_mode[:5])
            degraded.append(("ModeNotSupported", (f"{runs} instead of {mode_wanted}: the datapath of "
                             f"{'this node' if len(wrong_mode) == 1 else 'these nodes'} does not implement it")))

    # A valid spec whose configuration is not the one in force yet: the operator has not reconciled it (the
    # status loop can run between a spec change and its reconciliation). Never Ready on the old one then.
    pending = bool(applied) and wanted_generation is not None and wanted_generation != generation_wanted

    conditions: list[Condition] = []
    if not applied:
        conditions += [Condition("Ready", False, "NotConfigured", "no valid configuration applied yet"),
                       Condition("Progressing", False, "NotConfigured", "nothing to roll out")]
    elif pending:
        text = (f"configuration {wanted_generation} from the current spec is not applied yet; "
                f"{generation_wanted} is in force")
        conditions += [Condition("Ready", False, "Reconciling", text),
                       Condition("Progressing", True, "Reconciling", text)]
    elif not enabled:
        left = [n for n in nodes if n not in uninstalled]
        conditions += [Condition("Ready", False, "Disabled", "spec.enabled is false: agents removed"),
                       Condition("Progressing", bool(left), "Uninstalling" if left else "Disabled",
                                 f"waiting for {_names(left)} to remove their datapath" if left
                                 else f"the datapath is removed from {_plural(total, 'node')}")]
    else:
        done = len(current) == total and total > 0
        ready = done and not wrong_mode
        conditions.append(Condition(
            "Ready", ready, "AllNodesReady" if ready else ("NoNodes" if total == 0 else "NodesNotReady"),
            f"{len(current)}/{total} nodes run {mode_wanted}, tunnel {tunnels[0] if len(tunnels) == 1 else '?'}"
            if ready else f"{len(current)}/{total} nodes run the current configuration {generation_wanted}"))
        waiting = sorted(set(nodes) - set(current))
        conditions.append(Condition(
            "Progressing", not done, "RollingOut" if not done else "RolledOut",
            f"waiting for {_names(waiting)} to apply configuration {generation_wanted}" if not done
            else f"configuration {generation_wanted} runs on {_plural(total, 'node')}"))
    conditions.append(Condition("Degraded", bool(degraded), degraded[0][0] if degraded else "AsExpected",
                                "; ".join(m for _, m in degraded) if degraded else "no problem found"))

    refused: dict[str, list[str]] = {}          # Service -> the nodes that refused it
    for node, report in sorted(fresh.items()):
        for svc in filter(None, (report.get(REFUSED_KEY) or "").split(",")):
            refused.setdefault(svc, []).append(node)
    if degraded:
        message = f"Degraded: {degraded[0][1]}"
    elif not applied:
        message = "waiting for a valid configuration"
    elif pending:
        message = f"Progressing: {conditions[1].message}"
    elif not enabled:
        message = "Disabled: " + next(c.message for c in conditions if c.type == "Progressing")
    elif conditions[0].status:
        message = f"Ready: {conditions[0].message}"
    else:
        message = f"Progressing: {conditions[1].message}"

    if refused and enabled and applied:
        shown = "; ".join(f"{svc} on {_names(nodes_)}" for svc, nodes_ in sorted(refused.items())[:5])
        message += (f"; {_plural(len(refused), 'Service')} refused, each alone (do not fit the datapath's maps; "
                    f"see the Services' Events): {shown}" + (f" and {len(refused) - 5} more" if len(refused) > 5
                                                           else ""))

    previous_conditions = {c.get("type"): c for c in (previous or {}).get("conditions") or []
                           if isinstance(c, dict)}
    out_conditions = []
    for cond in conditions:
        text = "True" if cond.status else "False"
        before = previous_conditions.get(cond.type) or {}
        since = before.get("lastTransitionTime") if before.get("status") == text else None
        out_conditions.append({"type": cond.type, "status": text, "reason": cond.reason, "message": cond.message,
                               "lastTransitionTime": since or _rfc3339(now)})
        if generation is not None:
            out_conditions[-1]["observedGeneration"] = generation

    status: dict[str, Any] = {
        "version": str(SETTINGS_VERSIONS[-1]),
        "message": message,
        "bpfLBMode": ",".join(modes),
        "tunnelMode": ",".join(tunnels),
        "configGeneration": generation_wanted,
        "nodes": {"total": total, "current": len(current), "ready": f"{len(current)}/{total}",
                  "byMode": [{"mode": m, "nodes": sum(1 for n in current if fresh[n].get("bpfLBMode") == m)}
                             for m in modes]},
        "conditions": out_conditions,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _rfc3339(now: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(now, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Equal apart from timestamps (a status patch is only sent when something a reader cares for changed)."""
    def strip(status: Mapping[str, Any] | None) -> Any:
        status = dict(status or {})
        status["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                for c in status.get("conditions") or [] if isinstance(c, dict)]
        return status
    return bool(strip(a) == strip(b))
