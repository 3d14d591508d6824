"""The bpflb operator (kopf): reconciles the cni-cilium ModuleConfig into the agents' ConfigMap and
DaemonSet, validates it (admission webhook and again in the operator), and aggregates the agents' per-node
reports into the ModuleConfig status.

Handlers (registered by make_registry):
- login: credentials from --kubeconfig, $KUBECONFIG or the in-cluster service account;
- validate (admission): refuses an invalid cni-cilium ModuleConfig with every problem named;
- reconcile (resume/create/update): validates again; an invalid spec never replaces the configuration in
  force, a valid one is written to the ConfigMap and the DaemonSet is created and kept in shape;
  enabled: false tells the agents to uninstall, waits for their reports, then deletes the DaemonSet;
- status (a timer): conditions, effective mode/tunnel and node counts from the indexed reports and Nodes;
  every few seconds it also restores the ConfigMap and DaemonSet if they drifted.
Only the ModuleConfig named cni-cilium is acted on; other ModuleConfigs belong to other modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from bpflb.control.kubeapi import KubeClient, load_credentials, resource_path
from bpflb.control.manifests import (
    DAEMONSET_NAME,
    DEFAULT_IMAGE,
    NAMESPACE,
    agent_configmap,
    agent_daemonset,
    contains,
)
from bpflb.control.report import LABELS, REPORT_NAMESPACE, UNINSTALLED
from bpflb.control.settings import (
    CONFIG_GENERATION_KEY,
    GROUP,
    MODULE_NAME,
    PLURAL,
    UNINSTALL_KEY,
    VERSION,
    Invalid,
    ModuleSpec,
    agent_config_data,
    not_implemented,
    validate_spec,
)
from bpflb.control.status import compute_status, same_status
from bpflb.control.webhook import WebhookServer
from bpflb.sources.base import AGENT_CONFIG_NAME

log = logging.getLogger("bpflb.operator")

ANNOTATION_PREFIX = "bpflb.deckhouse.io"
STATUS_INTERVAL = 1.0          # seconds between two status computations
WEBHOOK_ID = "validate-cni-cilium"

CM_PATH = resource_path("v1", "configmaps", NAMESPACE, AGENT_CONFIG_NAME)
DS_PATH = resource_path("apps/v1", "daemonsets", NAMESPACE, DAEMONSET_NAME)


@dataclass
class OperatorOptions:
    kubeconfig: str | None = None
    namespace: str = NAMESPACE
    image: str = DEFAULT_IMAGE
    webhook_listen: str | None = None        # "ADDR:PORT": serve the admission webhook there (HTTPS)
    webhook_host: str | None = None          # the host name/address the API server reaches it by
    webhook_cadump: str | None = None        # write the webhook's CA bundle there
    webhook_managed: str | None = None       # name of the ValidatingWebhookConfiguration to keep in shape
    uninstall_timeout: float = 120.0         # enabled: false: how long to wait for the agents' reports
    reassert_interval: float = 30.0          # how often drift of the ConfigMap/DaemonSet is looked for


@dataclass
class State:
    """What the operator keeps between handler calls (kopf's memo)."""

    client: KubeClient
    options: OperatorOptions
    applied: dict[str, str] | None = None    # the agents' ConfigMap data in force
    applied_loaded: bool = False
    last_assert: float = 0.0
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)   # type -> (status, reason) posted


def _state(memo: Any) -> State:
    return cast(State, memo.state)


def _ours(name: str | None, **_: Any) -> bool:
    return name == MODULE_NAME


def _raw_spec(body: Mapping[str, Any]) -> Any:
    spec = body.get("spec")
    return dict(spec) if isinstance(spec, Mapping) else spec


def _summary(data: Mapping[str, str]) -> str:
    return (f"bpfLBMode {data.get('bpfLBMode')}, tunnelMode {data.get('tunnelMode')}, lbAlgorithm "
            f"{data.get('lbAlgorithm')} (generation {data.get(CONFIG_GENERATION_KEY)})")


# ---------------------------------------------------------------------------------------------------------
# Start-up


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Progress and diff-base under our own annotation prefix; Events only where we post them; webhook."""
    options = _state(memo).options
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.loggers = False
    settings.watching.server_timeout = 300
    if options.webhook_listen:
        addr, _colon, port = options.webhook_listen.rpartition(":")
        settings.admission.server = WebhookServer(addr=addr or None, port=int(port), host=options.webhook_host,
                                                  cadump=options.webhook_cadump)
        if options.webhook_managed:
            settings.admission.managed = options.webhook_managed


def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    creds = _state(memo).client.creds
    return kopf.ConnectionInfo(server=creds.server, ca_path=creds.ca_file, insecure=creds.insecure or None,
                               token=creds.bearer(), certificate_path=creds.cert_file,
                               private_key_path=creds.key_file)


# ---------------------------------------------------------------------------------------------------------
# Indexes: the cluster's Nodes and the agents' reports


def node_index(name: str, **_: Any) -> dict[str, bool]:
    return {name: True}


def report_index(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, dict[str, str]] | None:
    data = body.get("data") or {}
    node = data.get("node")
    if namespace != REPORT_NAMESPACE or not isinstance(node, str):
        return None
    return {node: {str(k): str(v) for k, v in data.items()}}


def _reports(index: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for node, store in index.items():
        for report in store:
            out[node] = report
    return out


# ---------------------------------------------------------------------------------------------------------
# Admission


def validate(name: str | None, body: kopf.Body, warnings: list[str], **_: Any) -> None:
    """Refuse an invalid cni-cilium ModuleConfig; warn about valid settings the agents do not run yet."""
    if name != MODULE_NAME:
        return
    try:
        spec = validate_spec(_raw_spec(body))
    except Invalid as exc:
        log.info("admission: refused ModuleConfig %s: %s", name, exc)
        raise kopf.AdmissionError(str(exc), code=422) from None
    warnings.extend(not_implemented(spec.settings))


# ---------------------------------------------------------------------------------------------------------
# Reconciliation


async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, runtime: Any, **kwargs: Any) -> None:
    """Make the agents' ConfigMap and DaemonSet match a valid spec; keep the configuration in force when
    the spec is invalid."""
    state = _state(memo)
    if not state.applied_loaded:
        await asyncio.to_thread(_load_applied, state)
    try:
        spec = validate_spec(_raw_spec(body))
    except Invalid as exc:
        kept = f"keeping {_summary(state.applied)}" if state.applied else "no configuration applied yet"
        logger.warning(f"invalid configuration, not applied: {exc}; {kept}")
        kopf.warn(body, reason="InvalidConfiguration", message=f"not applied: {exc}; {kept}")
        return
    reports = _reports(kwargs["report_index"])
    elapsed = runtime.total_seconds() if hasattr(runtime, "total_seconds") else 0.0
    events, pending = await asyncio.to_thread(apply_module, state, spec, reports, elapsed)
    for kind, reason, message in events:
        logger.info(message)
        kopf.event(body, type=kind, reason=reason, message=message)
    if pending:
        raise kopf.TemporaryError(pending, delay=2)


def _load_applied(state: State) -> None:
    """Recover the configuration in force from the cluster (after an operator restart)."""
    cm = state.client.get(CM_PATH)
    data = (cm or {}).get("data")
    state.applied = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) and data else None
    state.applied_loaded = True


def apply_module(state: State, spec: ModuleSpec, reports: Mapping[str, Mapping[str, str]],
                 elapsed: float = 0.0) -> tuple[list[tuple[str, str, str]], str | None]:
    """Write the ConfigMap and create/patch/delete the DaemonSet for a valid spec. Returns the Events to post
    and, when enabled: false is still waiting for agents to uninstall, why (the caller retries)."""
    client, options = state.client, state.options
    events: list[tuple[str, str, str]] = []
    data = agent_config_data(spec.settings, uninstall=not spec.enabled)
    cm = client.get(CM_PATH)
    if cm is None:
        client.create(resource_path("v1", "configmaps", NAMESPACE), agent_configmap(data))
        events.append(("Normal", "ConfigCreated", (f"created ConfigMap {NAMESPACE}/{AGENT_CONFIG_NAME}: "
                       f"{_summary(data)}{'; agents told to uninstall' if not spec.enabled else ''}")))
    else:
        live = {str(k): str(v) for k, v in (cm.get("data") or {}).items()}
        if live != data or not contains(cm, agent_configmap(data)):
            client.merge_patch(CM_PATH, {"metadata": {"labels": agent_configmap(data)["metadata"]["labels"]},
                                         "data": {**{k: None for k in live if k not in data}, **data}})
            changed = ", ".join(f"{k} {live.get(k, '(unset)')} -> {v}" for k, v in data.items()
                                if live.get(k) != v and k != CONFIG_GENERATION_KEY) or "labels restored"
            events.append(("Normal", "ConfigUpdated", (f"updated ConfigMap {NAMESPACE}/{AGENT_CONFIG_NAME}: "
                           f"{changed} (generation {data[CONFIG_GENERATION_KEY]}); the agents reprogram "
                           "their datapath in place")))
    state.applied = data
    state.applied_loaded = True

    ds = client.get(DS_PATH)
    if spec.enabled:
        wanted = agent_daemonset(options.image)
        if ds is None:
            client.create(resource_path("apps/v1", "daemonsets", NAMESPACE), wanted)
            events.append(("Normal", "AgentsCreated", (f"created DaemonSet {NAMESPACE}/{DAEMONSET_NAME} "
                           f"(image {options.image})")))
        elif not contains(ds, wanted):
            client.merge_patch(DS_PATH, {"metadata": {"labels": wanted["metadata"]["labels"]},
                                         "spec": wanted["spec"]})
            events.append(("Normal", "AgentsUpdated", (f"restored DaemonSet {NAMESPACE}/{DAEMONSET_NAME} to "
                           f"its expected spec (image {options.image})")))
    elif ds is not None:
        left = sorted(n for n, r in reports.items() if r.get("state") != UNINSTALLED)
        if left and elapsed < options.uninstall_timeout:
            return events, (f"enabled: false: waiting for {', '.join(left)} to detach their programs and "
                            f"remove their pinned maps before deleting DaemonSet {NAMESPACE}/{DAEMONSET_NAME}")
        client.delete(DS_PATH)
        if left:
            events.append(("Warning", "AgentsRemoved", (f"deleted DaemonSet {NAMESPACE}/{DAEMONSET_NAME} after "
                           f"{options.uninstall_timeout:.0f}s although {', '.join(left)} did not report "
                           "their datapath removed")))
        else:
            events.append(("Normal", "AgentsRemoved", (f"deleted DaemonSet {NAMESPACE}/{DAEMONSET_NAME}: every "
                           "agent removed its datapath (spec.enabled is false)")))
    return events, None


# ---------------------------------------------------------------------------------------------------------
# Status


async def status(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger,
                 **kwargs: Any) -> None:
    """Aggregate the node reports into the status; post an Event when a condition changes; every
    reassert_interval seconds restore the ConfigMap/DaemonSet if they drifted."""
    state = _state(memo)
    if not state.applied_loaded:
        await asyncio.to_thread(_load_applied, state)
    node_index: kopf.Index[str, bool] = kwargs["node_index"]
    reports = _reports(kwargs["report_index"])
    previous = body.get("status") or {}
    new = compute_status(_raw_spec(body), state.applied, sorted(node_index.keys()), reports, time.time(),
                         previous=previous, generation=meta.get("generation"))
    if not same_status(previous, new):
        patch["status"] = new
    for cond in new["conditions"]:
        key = (cond["status"], cond["reason"])
        if state.conditions.get(cond["type"]) == key:
            continue
        first = cond["type"] not in state.conditions
        state.conditions[cond["type"]] = key
        if first and (cond["type"] == "Progressing" or cond["status"] == "False"):
            continue                      # nothing happened: the operator just (re)started
        warning = cond["type"] == "Degraded" and cond["status"] == "True"
        text = f"{cond['type']}={cond['status']} ({cond['reason']}): {cond['message']}"
        (logger.warning if warning else logger.info)(text)
        kopf.event(body, type="Warning" if warning else "Normal", reason=cond["reason"], message=text)

    if state.applied and time.monotonic() - state.last_assert > state.options.reassert_interval:
        state.last_assert = time.monotonic()
        try:
            spec = validate_spec(_raw_spec(body))
        except Invalid:
            return
        if spec.enabled:
            events, _pending = await asyncio.to_thread(apply_module, state, spec, reports)
            for kind, reason, message in events:
                logger.info(message)
                kopf.event(body, type=kind, reason=reason, message=message)


# ---------------------------------------------------------------------------------------------------------
# Running


def make_registry(*, webhook: bool) -> kopf.OperatorRegistry:
    """The operator's handlers; the admission handler only with a webhook server to serve it."""
    reg = kopf.OperatorRegistry()
    kopf.on.startup(registry=reg)(configure)
    kopf.on.login(registry=reg)(login)
    kopf.index("", "v1", "nodes", registry=reg)(node_index)
    kopf.index("", "v1", "configmaps", labels=LABELS, registry=reg)(report_index)
    if webhook:
        kopf.on.validate(GROUP, VERSION, PLURAL, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"],
                         registry=reg)(validate)
    for cause in (kopf.on.resume, kopf.on.create, kopf.on.update):
        cause(GROUP, VERSION, PLURAL, when=_ours, registry=reg)(reconcile)
    kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL, when=_ours, registry=reg)(status)
    return reg


def run(options: OperatorOptions, *, stop_flag: Any = None, ready_flag: Any = None) -> None:
    """Run the operator until stop_flag is set (or SIGINT/SIGTERM when run from the CLI)."""
    client = KubeClient(load_credentials(options.kubeconfig), user_agent="bpflb-operator")
    memo = kopf.Memo(state=State(client=client, options=options))
    log.info("operator: watching ModuleConfig %s (%s/%s) and namespace %s at %s%s", MODULE_NAME, GROUP,
             VERSION, options.namespace, client.creds.server,
             f"; admission webhook on {options.webhook_listen}" if options.webhook_listen else "")
    asyncio.run(kopf.operator(registry=make_registry(webhook=bool(options.webhook_listen)), standalone=True,
                              namespaces=[options.namespace], memo=memo, stop_flag=stop_flag,
                              ready_flag=ready_flag))


__all__ = ["UNINSTALL_KEY", "WEBHOOK_ID", "OperatorOptions", "State", "apply_module", "make_registry", "run"]
