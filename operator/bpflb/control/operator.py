"""The bpflb operator (kopf): reconciles the cni-cilium ModuleConfig into the agents' ConfigMap and
DaemonSet, validates it (admission webhook and again in the operator), and aggregates the agents' per-node
reports into the ModuleConfig status.

One replica acts (leader election on the Lease <namespace>/bpflb-operator, control.leader): the others
stand by, serving only the admission webhook (when its certificate is shared), and take over when the
leader stops renewing; a leader that cannot renew stops acting and exits (its pod restarts as a standby).

Handlers (registered by make_registry):
- login: the kubernetes package's configuration of kubeapi (--kubeconfig, $KUBECONFIG or the in-cluster
  service account; exec plugins and rotating tokens included);
- validate (admission): refuses an invalid cni-cilium ModuleConfig with every problem named;
- reconcile (resume/create/update): validates again; an invalid spec never replaces the configuration in
  force, a valid one is written to the ConfigMap and the DaemonSet is created and kept in shape;
  enabled: false tells the agents to uninstall, waits for their reports, then deletes the DaemonSet;
- status (a loop started at start-up): conditions, effective mode/tunnel and node counts from the indexed
  ModuleConfig, reports and Nodes; now and then it also restores the ConfigMap and DaemonSet if they drifted,
  and removes the reports of Nodes that are gone; kopf's liveness probe fails when the loop stops turning.
Only the ModuleConfig named cni-cilium is acted on; other ModuleConfigs belong to other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from bpflb.control.leader import LeaseElector, LeaseTimes
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
from bpflb.control.report import LABELS, STALE_AFTER, UNINSTALLED, orphaned, report_name
from bpflb.control.status import compute_status, same_status
from bpflb.control.webhook import WebhookServer, publish_ca_bundle
from bpflb.kubeapi import ApiError, KubeClient, load_config, resource_path
from bpflb.metrics import MetricsServer, OperatorMetrics
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

STATUS_STALE = 60.0            # kopf's liveness probe fails when the status loop has not turned for this long


def cm_path(namespace: str) -> str:
    return resource_path("v1", "configmaps", namespace, AGENT_CONFIG_NAME)


def ds_path(namespace: str) -> str:
    return resource_path("apps/v1", "daemonsets", namespace, DAEMONSET_NAME)


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
    leader_elect: bool = True                # one replica acts (the Lease <namespace>/bpflb-operator)
    identity: str | None = None              # this replica in the Lease; default: $POD_NAME, else host-pid-random
    lease: LeaseTimes = field(default_factory=LeaseTimes)
    metrics_listen: str | None = None        # "ADDR:PORT": Prometheus metrics (GET /metrics)
    report_gc_after: float = STALE_AFTER     # a Node gone and its report silent this long: the report goes


class LeadershipLost(RuntimeError):
    """The Lease could not be renewed in time: this replica stopped acting (the CLI exits non-zero)."""

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
    last_round: float = 0.0                  # monotonic time the status loop last turned (liveness)
    serve_webhook: bool = True               # this kopf run serves the admission webhook
    elector: LeaseElector | None = None
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    reports_removed: int = 0

    @property
    def namespace(self) -> str:
        return self.options.namespace

    @property
    def acting(self) -> bool:
        """Not standing by: leader election off, or this replica holds the Lease and renews it."""
        return self.elector is None or self.elector.leading


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
    if options.webhook_listen and _state(memo).serve_webhook:
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
    """kopf's credentials are kubeapi's: whatever kubeconfig kubectl accepts, rotating tokens read again."""
    info = _state(memo).client.connection_info()
    return kopf.ConnectionInfo(server=info.server, ca_path=info.ca_path, ca_data=info.ca_data,
                               insecure=info.insecure or None, scheme=info.scheme, token=info.token,
                               certificate_path=info.certificate_path, private_key_path=info.private_key_path,
                               expiration=info.expiration)


def status_loop_alive(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """kopf's liveness probe: fails (500) when the status loop has not turned for STATUS_STALE seconds."""
    state = _state(memo)
    age = time.monotonic() - state.last_round if state.last_round else 0.0
    if age > STATUS_STALE:
        raise kopf.PermanentError(f"the status loop has not turned for {age:.0f}s")
    return {"rounds": state.rounds, "age": round(age, 1), "leader": state.acting}


# ---------------------------------------------------------------------------------------------------------
# Indexes: the cluster's Nodes and the agents' reports


def node_index(name: str, **_: Any) -> dict[str, bool]:
    return {name: True}


def report_index(namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, dict[str, str]] | None:
    data = body.get("data") or {}
    node = data.get("node")
    # A report counts only under its own node's name (the agents' admission policy enforces the same).
    if namespace != _state(memo).namespace or not isinstance(node, str) or \
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
        state.metrics.reconciled("invalid")
        logger.warning(f"invalid configuration, not applied: {exc}; {kept}")
        kopf.warn(body, reason="InvalidConfiguration", message=f"not applied: {exc}; {kept}")
        return
    take_effect(state, spec)
    reports = _reports(kwargs["report_index"])
    elapsed = runtime.total_seconds() if hasattr(runtime, "total_seconds") else 0.0
    try:
        events, pending = await asyncio.to_thread(apply_module, state, spec, reports, elapsed)
    except Exception:
        state.metrics.reconciled("error")
        raise
    state.metrics.reconciled("pending" if pending else "ok")
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
    cm = state.client.get(cm_path(state.namespace))
    data = (cm or {}).get("data")
    state.applied = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) and data else None
    state.applied_loaded = True


def apply_module(state: State, spec: ModuleSpec, reports: Mapping[str, Mapping[str, str]],
                 elapsed: float = 0.0) -> tuple[list[tuple[str, str, str]], str | None]:
    """Write the ConfigMap and create/patch/delete the DaemonSet for a valid spec. Returns the Events to post
    and, when enabled: false is still waiting for agents to uninstall, why (the caller retries)."""
    client, options, ns = state.client, state.options, state.namespace
    cm_at, ds_at = cm_path(ns), ds_path(ns)
    events: list[tuple[str, str, str]] = []
    if spec.maintenance == MAINTENANCE_NO_RECONCILIATION:
        text = (f"spec.maintenance is {MAINTENANCE_NO_RECONCILIATION}: ConfigMap {ns}/{AGENT_CONFIG_NAME} and "
                f"DaemonSet {ns}/{DAEMONSET_NAME} are left as they are")
        if text not in state.said:
            state.said.add(text)
            events.append(("Normal", "Maintenance", text))
        return events, None
    state.said.discard(next((s for s in state.said if s.startswith("spec.maintenance is")), ""))
    data = agent_config_data(spec.settings, uninstall=not spec.enabled)
    cm = client.get(cm_at)
    if cm is None:
        client.create(resource_path("v1", "configmaps", ns), agent_configmap(data, ns))
        events.append(("Normal", "ConfigCreated", (f"created ConfigMap {ns}/{AGENT_CONFIG_NAME}: "
                       f"{_summary(data)}{'; agents told to uninstall' if not spec.enabled else ''}")))
    else:
        live = {str(k): str(v) for k, v in (cm.get("data") or {}).items()}
        if live != data or not contains(cm, agent_configmap(data, ns)):
            client.merge_patch(cm_at, {"metadata": {"labels": agent_configmap(data, ns)["metadata"]["labels"]},
                                         "data": {**{k: None for k in live if k not in data}, **data}})
            changed = ", ".join(f"{k} {live.get(k, '(unset)')} -> {v}" for k, v in data.items()
                                if live.get(k) != v and k != CONFIG_GENERATION_KEY) or "labels restored"
            events.append(("Normal", "ConfigUpdated", (f"updated ConfigMap {ns}/{AGENT_CONFIG_NAME}: "
                           f"{changed} (generation {data[CONFIG_GENERATION_KEY]}); the agents reprogram "
                           "their datapath in place")))
    state.applied = data
    state.applied_loaded = True

    ds = client.get(ds_at)
    if spec.enabled:
        wanted = agent_daemonset(options.image, options.agent_pod, ns)
        if ds is None:
            client.create(resource_path("apps/v1", "daemonsets", ns), wanted)
            events.append(("Normal", "AgentsCreated", (f"created DaemonSet {ns}/{DAEMONSET_NAME} "
                           f"(image {options.image})")))
        elif daemonset_drifted(ds, wanted):
            client.merge_patch(ds_at, daemonset_patch(ds, wanted))
            events.append(("Normal", "AgentsUpdated", (f"restored DaemonSet {ns}/{DAEMONSET_NAME} to "
                           f"its expected spec (image {options.image})")))
    elif ds is not None:
        left = sorted(n for n, r in reports.items() if r.get("state") != UNINSTALLED)
        if left and elapsed < options.uninstall_timeout:
            return events, (f"enabled: false: waiting for {', '.join(left)} to detach their programs and "
                            f"remove their pinned maps before deleting DaemonSet {ns}/{DAEMONSET_NAME}")
        client.delete(ds_at)
        if left:
            events.append(("Warning", "AgentsRemoved", (f"deleted DaemonSet {ns}/{DAEMONSET_NAME} after "
                           f"{options.uninstall_timeout:.0f}s although {', '.join(left)} did not report "
                           "their datapath removed")))
        else:
            events.append(("Normal", "AgentsRemoved", (f"deleted DaemonSet {ns}/{DAEMONSET_NAME}: every "
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
    changed, post an Event for every condition change, now and then restore drifted objects, and remove
    the reports of Nodes that are gone. Nothing is written while this replica is not the leader."""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        if state.acting:
            try:
                await remove_orphaned_reports(state, indices)
                await update_status(state, indices)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the API may be away: try again next round
                log.warning("status update failed: %s; retrying in %.0fs", exc, STATUS_INTERVAL)
        state.rounds += 1
        state.last_round = time.monotonic()
        state.metrics.status_round(state.acting)


async def remove_orphaned_reports(state: State, indices: Mapping[str, Any]) -> None:
    """Delete the node reports of Nodes that no longer exist (once their agent has gone quiet too)."""
    reports = _reports(indices["report_index"])
    for node in orphaned(reports, set(indices["node_index"].keys()), time.time(), state.options.report_gc_after):
        path = resource_path("v1", "configmaps", state.namespace, report_name(node))
        try:
            gone = await asyncio.to_thread(state.client.delete, path)
        except ApiError as exc:
            log.warning("cannot remove the report of the deleted Node %s (%s): %s", node, path, exc)
            continue
        if gone:
            log.info("removed the report %s/%s: Node %s no longer exists", state.namespace, report_name(node), node)
            state.reports_removed += 1
            state.metrics.report_removed()


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
    state.metrics.module_status(new)
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


def make_registry(*, webhook: bool, acting: bool = True) -> kopf.OperatorRegistry:
    """The operator's handlers; the admission handler only with a webhook server to serve it. A standby
    (acting=False) logs in and validates, nothing else: no index, no reconciliation, no status."""
    reg = kopf.OperatorRegistry()
    kopf.on.startup(registry=reg)(configure)
    kopf.on.login(registry=reg)(login)
    if not acting:
        if webhook:
            kopf.on.validate(GROUP, VERSION, PLURAL, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"],
                             registry=reg)(validate)
        return reg
    kopf.on.probe(id="status-loop", registry=reg)(status_loop_alive)
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


def _is_set(flag: Any) -> bool:
    if flag is None:
        return False
    if isinstance(flag, asyncio.Future):
        return flag.done()
    return bool(flag.is_set())


def default_identity() -> str:
    """This replica's name in the Lease: the pod's ($POD_NAME), else host, pid and a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def run(options: OperatorOptions, *, stop_flag: Any = None, ready_flag: Any = None,
        state: State | None = None) -> None:
    """Run the operator until stop_flag is set (or SIGINT/SIGTERM when run from the CLI); state: the one to
    keep (for a caller that watches its rounds), else a new one. LeadershipLost when this replica led and
    could not renew its Lease (it stopped acting first)."""
    if state is None:
        state = State(client=KubeClient(load_config(options.kubeconfig), user_agent="bpflb-operator"),
                      options=options)
    client = state.client
    log.info("operator: watching ModuleConfig %s (%s/%s) and namespace %s at %s (credentials: %s)%s", MODULE_NAME,
             GROUP, VERSION, options.namespace, client.server, client.source,
             f"; admission webhook on {options.webhook_listen}" if options.webhook_listen else "")
    server = None
    if options.metrics_listen:
        server = MetricsServer(options.metrics_listen, state.metrics.registry, name="operator")
        server.start()
    try:
        asyncio.run(_main(options, state, stop_flag, ready_flag))
    finally:
        if server is not None:
            server.close()


async def _main(options: OperatorOptions, state: State, stop_flag: Any, ready_flag: Any) -> None:
    liveness = None
    if options.health_listen:
        addr, _colon, port = options.health_listen.rpartition(":")
        liveness = f"http://{addr or '0.0.0.0'}:{int(port)}/healthz"
    common: dict[str, Any] = {"standalone": True, "namespaces": [options.namespace], "memo": kopf.Memo(state=state),
                              "liveness_endpoint": liveness, "ready_flag": ready_flag}
    webhook = bool(options.webhook_listen)
    if not options.leader_elect:
        await kopf.operator(registry=make_registry(webhook=webhook), stop_flag=stop_flag, **common)
        return
    elector = LeaseElector(state.client, options.namespace, options.identity or default_identity(),
                           times=options.lease)
    state.elector = elector
    state.metrics.leading(False)
    leading = await asyncio.to_thread(elector.try_acquire_or_renew)
    if not leading and not await _stand_by(options, state, elector, stop_flag, common):
        return
    await _lead(state, elector, stop_flag, common, webhook)


async def _stand_by(options: OperatorOptions, state: State, elector: LeaseElector, stop_flag: Any,
                    common: dict[str, Any]) -> bool:
    """Serve the webhook (when its certificate is shared: a self-signed one is the leader's to publish) and
    the liveness probe until the Lease is ours (True) or the operator is stopped (False)."""
    log.info("leader election: Lease %s/%s is held by %s; %s stands by", elector.namespace, elector.name,
             elector.holder, elector.identity)
    inner = asyncio.Event()
    shared_cert = bool(options.webhook_listen and options.webhook_cert_dir)
    state.serve_webhook = shared_cert
    standby = asyncio.create_task(kopf.operator(registry=make_registry(webhook=shared_cert, acting=False),
                                                stop_flag=inner, **common))
    try:
        while not _is_set(stop_flag):
            if standby.done():
                standby.result()            # an error of kopf's is raised; a signal ends the operator
                return False
            if await asyncio.to_thread(elector.try_acquire_or_renew):
                return True
            await _sleep_unless(stop_flag, elector.times.retry_period)
        return False
    finally:
        inner.set()
        with contextlib.suppress(asyncio.CancelledError):
            await standby


async def _sleep_unless(flag: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _is_set(flag) and time.monotonic() < deadline:
        await asyncio.sleep(min(0.1, seconds))


async def _keep_lease(state: State, elector: LeaseElector) -> None:
    """Renew every retry period; return when no renewal succeeded within the renew deadline."""
    while True:
        await asyncio.sleep(elector.times.retry_period)
        if await asyncio.to_thread(elector.try_acquire_or_renew):
            continue
        if time.monotonic() - elector.last_renew >= elector.times.renew_deadline:
            return


async def _wait_flag(flag: Any) -> None:
    while not _is_set(flag):
        await asyncio.sleep(0.1)


async def _lead(state: State, elector: LeaseElector, stop_flag: Any, common: dict[str, Any], webhook: bool) -> None:
    """Act (every handler, the status loop) while the Lease is renewed; stop acting when it is not."""
    log.info("leader election: %s leads (Lease %s/%s)", elector.identity, elector.namespace, elector.name)
    state.metrics.leading(True)
    state.serve_webhook = webhook
    inner = asyncio.Event()
    acting = asyncio.create_task(kopf.operator(registry=make_registry(webhook=webhook), stop_flag=inner, **common))
    renewing = asyncio.create_task(_keep_lease(state, elector))
    stopping = asyncio.create_task(_wait_flag(stop_flag))
    done, _ = await asyncio.wait({acting, renewing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    lost = renewing in done
    if lost:
        log.error("leader election: could not renew Lease %s/%s for %.0fs: %s stops acting", elector.namespace,
                  elector.name, elector.times.renew_deadline, elector.identity)
    inner.set()
    stopping.cancel()
    state.metrics.leading(False)
    try:
        await acting                  # still renewing while kopf winds down: nobody else acts meanwhile
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        if lost:
            raise LeadershipLost(f"lost the Lease {elector.namespace}/{elector.name}")
        await asyncio.to_thread(elector.release)


__all__ = ["UNINSTALL_KEY", "WEBHOOK_ID", "LeadershipLost", "OperatorOptions", "State", "apply_module",
           "make_registry", "run"]
