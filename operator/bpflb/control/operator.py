"""The bpflb operator (kopf): reconciles the cni-cilium ModuleConfig into the agents' ConfigMap and
DaemonSet, validates it (admission webhook and again in the operator), and aggregates the agents' per-node
reports into the ModuleConfig status.

Handlers (registered by make_registry):
- login: credentials from --kubeconfig, $KUBECONFIG or the in-cluster service account;
- validate (admission): refuses an invalid cni-cilium ModuleConfig with every problem named;
- reconcile (resume/create/update): validates again; an invalid spec never replaces the configuration in
  force, a valid one is written to the ConfigMap and the DaemonSet is created and kept in shape;
  enabled: false tells the agents to uninstall, waits for their reports, then deletes the DaemonSet;
- status (a loop started at start-up): conditions, effective mode/tunnel and node counts from the indexed
  ModuleConfig, reports and Nodes; now and then it also restores the ConfigMap and DaemonSet if they drifted.
Only the ModuleConfig named cni-cilium is acted on; other ModuleConfigs belong to other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from bpflb.control.manifests import (
    DAEMONSET_NAME,
    DEFAULT_IMAGE,
    NAMESPACE,
    AgentPod,
    agent_configmap,
    agent_daemonset,
    contains,
    daemonset_drifted,
    daemonset_patch,
)
from bpflb.control.report import LABELS, REPORT_NAMESPACE, UNINSTALLED, report_name
from bpflb.control.status import compute_status, same_status
from bpflb.control.webhook import WebhookServer, publish_ca_bundle
from bpflb.kubeapi import KubeClient, load_credentials, resource_path
from bpflb.model.settings import (
    CONFIG_GENERATION_KEY,
    GROUP,
    MAINTENANCE_NO_RECONCILIATION,
    MODULE_NAME,
    PLURAL,
    UNINSTALL_KEY,
    VERSION,
    Invalid,
    ModuleSpec,
    agent_config_data,
    validate_spec,
)
from bpflb.sources.base import AGENT_CONFIG_NAME

log = logging.getLogger("bpflb.operator")

ANNOTATION_PREFIX = "bpflb.deckhouse.io"
STATUS_INTERVAL = 1.0          # seconds between two status computations
WEBHOOK_ID = "validate-cni-cilium"

CM_PATH = resource_path("v1", "configmaps", NAMESPACE, AGENT_CONFIG_NAME)
DS_PATH = resource_path("apps/v1", "daemonsets", NAMESPACE, DAEMONSET_NAME)
MC_STATUS_PATH = resource_path(f"{GROUP}/{VERSION}", PLURAL, None, MODULE_NAME, "status")


@dataclass
class OperatorOptions:
    kubeconfig: str | None = None
    namespace: str = NAMESPACE
    image: str = DEFAULT_IMAGE
    webhook_listen: str | None = None        # "ADDR:PORT": serve the admission webhook there (HTTPS)
    webhook_host: str | None = None          # the host name/address the API server reaches it by
    webhook_cadump: str | None = None        # write the webhook's CA bundle there
    webhook_managed: str | None = None       # kopf-managed ValidatingWebhookConfiguration (development)
    webhook_configuration: str | None = None # chart-made ValidatingWebhookConfiguration: publish the CA there
    webhook_cert_dir: str | None = None      # serve tls.crt/tls.key from there instead of a self-signed pair
    health_listen: str | None = None         # "ADDR:PORT": kopf's liveness endpoint, GET /healthz
    agent_pod: AgentPod | None = None        # the agents' pod settings (the chart's values); None: defaults
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
    last_status: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    said: set[str] = field(default_factory=set)   # spec fields not acted on, logged once each
    rounds: int = 0                          # status rounds done (waits in tests count these, not seconds)
    reasserts: int = 0                       # re-assert rounds done (drift of the ConfigMap and DaemonSet)


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
        client, vwc = _state(memo).client, options.webhook_configuration
        certdir = options.webhook_cert_dir
        settings.admission.server = WebhookServer(
            addr=addr or None, port=int(port), host=options.webhook_host, cadump=options.webhook_cadump,
            certfile=f"{certdir}/tls.crt" if certdir else None, pkeyfile=f"{certdir}/tls.key" if certdir else None,
            publish=(lambda cadata: publish_ca_bundle(client, vwc, cadata)) if vwc else None)
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
    # A report counts only under its own node's name (the agents' admission policy enforces the same).
    if namespace != REPORT_NAMESPACE or not isinstance(node, str) or \
            (body.get("metadata") or {}).get("name") != report_name(node):
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
    log.debug("admission: allowed ModuleConfig %s (%s)", name, spec.settings)


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
    take_effect(state, spec)
    reports = _reports(kwargs["report_index"])
    elapsed = runtime.total_seconds() if hasattr(runtime, "total_seconds") else 0.0
    events, pending = await asyncio.to_thread(apply_module, state, spec, reports, elapsed)
    for kind, reason, message in events:
        logger.info(message)
        kopf.event(body, type=kind, reason=reason, message=message)
    if pending:
        raise kopf.TemporaryError(pending, delay=2)


def take_effect(state: State, spec: ModuleSpec) -> None:
    """The operator's own share of a valid spec: debugLogging sets its log level, and each Deckhouse field
    it does not act on is said once in its log (never dropped silently)."""
    level = logging.DEBUG if spec.settings.debugLogging else logging.NOTSET
    if logging.getLogger("bpflb").level != level:
        logging.getLogger("bpflb").setLevel(level)
        log.info("debugLogging %s: the operator logs at %s", str(spec.settings.debugLogging).lower(),
                 "DEBUG" if level == logging.DEBUG else "its command-line level")
    for text in spec.not_acted_on:
        if text not in state.said:
            state.said.add(text)
            log.warning("ModuleConfig %s: %s", MODULE_NAME, text)


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
    if spec.maintenance == MAINTENANCE_NO_RECONCILIATION:
        text = (f"spec.maintenance is {MAINTENANCE_NO_RECONCILIATION}: ConfigMap {NAMESPACE}/{AGENT_CONFIG_NAME} and "
                f"DaemonSet {NAMESPACE}/{DAEMONSET_NAME} are left as they are")
        if text not in state.said:
            state.said.add(text)
            events.append(("Normal", "Maintenance", text))
        return events, None
    state.said.discard(next((s for s in state.said if s.startswith("spec.maintenance is")), ""))
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
        wanted = agent_daemonset(options.image, options.agent_pod)
        if ds is None:
            client.create(resource_path("apps/v1", "daemonsets", NAMESPACE), wanted)
            events.append(("Normal", "AgentsCreated", (f"created DaemonSet {NAMESPACE}/{DAEMONSET_NAME} "
                           f"(image {options.image})")))
        elif daemonset_drifted(ds, wanted):
            client.merge_patch(DS_PATH, daemonset_patch(ds, wanted))
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
# Status: a loop of the operator's own (a kopf timer would put a finalizer on the ModuleConfig, which
# would then block its deletion whenever the operator is not running).


def module_index(name: str | None, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]] | None:
    """The cni-cilium ModuleConfig as last seen (the status loop reads it from here)."""
    return {name: copy.deepcopy(dict(body))} if name == MODULE_NAME else None


async def status_loop(state: State, indices: Mapping[str, Any]) -> None:
    """Every STATUS_INTERVAL: compute the status from the indexed Nodes and reports, patch it when it
    changed, post an Event for every condition change, and now and then restore drifted objects."""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        try:
            await update_status(state, indices)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the API may be away: try again next round
            log.warning("status update failed: %s; retrying in %.0fs", exc, STATUS_INTERVAL)
        state.rounds += 1


async def update_status(state: State, indices: Mapping[str, Any]) -> None:
    bodies = [b for store in indices["module_index"].values() for b in store]
    if not bodies:
        return
    body = bodies[-1]
    if not state.applied_loaded:
        await asyncio.to_thread(_load_applied, state)
    reports = _reports(indices["report_index"])
    observed = body.get("status") or {}
    new = compute_status(body.get("spec"), state.applied, sorted(indices["node_index"].keys()), reports,
                         time.time(), previous=observed, generation=(body.get("metadata") or {}).get("generation"))
    if not same_status(observed, new) and not same_status(state.last_status, new):
        await asyncio.to_thread(state.client.merge_patch, MC_STATUS_PATH, {"status": new})
        state.last_status = new
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
        log.log(logging.WARNING if warning else logging.INFO, "ModuleConfig %s: %s", MODULE_NAME, text)
        await asyncio.to_thread(post_event, state.client, body, "Warning" if warning else "Normal",
                                cond["reason"], text)

    if state.applied and time.monotonic() - state.last_assert > state.options.reassert_interval:
        state.last_assert = time.monotonic()
        state.last_status = None
        try:
            spec = validate_spec(body.get("spec"))
        except Invalid:
            state.reasserts += 1
            return
        if spec.enabled:
            events, _pending = await asyncio.to_thread(apply_module, state, spec, reports)
            for kind, reason, message in events:
                log.info("ModuleConfig %s: %s", MODULE_NAME, message)
                await asyncio.to_thread(post_event, state.client, body, kind, reason, message)
        state.reasserts += 1


def post_event(client: KubeClient, obj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """A core/v1 Event about obj (cluster-scoped objects' Events go to the default namespace)."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.create(resource_path("v1", "events", namespace), {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'bpflb')}.", "namespace": namespace},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "type": kind, "reason": reason, "message": message[:1024],
        "source": {"component": "bpflb-operator"}, "reportingComponent": "bpflb-operator",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    })


async def start_status_loop(memo: kopf.Memo, **kwargs: Any) -> None:
    state = _state(memo)
    indices = {name: kwargs[name] for name in ("module_index", "node_index", "report_index")}
    state.task = asyncio.get_running_loop().create_task(status_loop(state, indices))


async def stop_status_loop(memo: kopf.Memo, **_: Any) -> None:
    task = _state(memo).task
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
    kopf.index(GROUP, VERSION, PLURAL, registry=reg)(module_index)
    kopf.on.startup(registry=reg)(start_status_loop)
    kopf.on.cleanup(registry=reg)(stop_status_loop)
    return reg


def run(options: OperatorOptions, *, stop_flag: Any = None, ready_flag: Any = None,
        state: State | None = None) -> None:
    """Run the operator until stop_flag is set (or SIGINT/SIGTERM when run from the CLI); state: the one to
    keep (for a caller that watches its rounds), else a new one."""
    if state is None:
        state = State(client=KubeClient(load_credentials(options.kubeconfig), user_agent="bpflb-operator"),
                      options=options)
    client = state.client
    memo = kopf.Memo(state=state)
    log.info("operator: watching ModuleConfig %s (%s/%s) and namespace %s at %s%s", MODULE_NAME, GROUP,
             VERSION, options.namespace, client.creds.server,
             f"; admission webhook on {options.webhook_listen}" if options.webhook_listen else "")
    liveness = None
    if options.health_listen:
        addr, _colon, port = options.health_listen.rpartition(":")
        liveness = f"http://{addr or '0.0.0.0'}:{int(port)}/healthz"
    asyncio.run(kopf.operator(registry=make_registry(webhook=bool(options.webhook_listen)), standalone=True,
                              namespaces=[options.namespace], memo=memo, stop_flag=stop_flag,
                              ready_flag=ready_flag, liveness_endpoint=liveness))


__all__ = ["UNINSTALL_KEY", "WEBHOOK_ID", "OperatorOptions", "State", "apply_module", "make_registry", "run"]
