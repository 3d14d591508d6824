"""The agent on a Kubernetes node: the datapath agent fed by the API (KubeSource), reporting its state per
node (NodeReporter) in its namespace, with its metrics and probes; what `bpflb agent --kube` runs."""

from __future__ import annotations

import logging
import time

from bpflb.agent import Agent, AgentOptions, install_signal_handlers
from bpflb.control.events import ServiceEvents
from bpflb.control.report import NodeReporter, agent_report
from bpflb.datapath.lbmaps import SyncReport
from bpflb.kubeapi import PAGE_SIZE, KubeClient, load_config
from bpflb.metrics import AgentMetrics, MetricsServer
from bpflb.model.endpoints import slice_record
from bpflb.model.records import service_record
from bpflb.sources.base import own_namespace
from bpflb.sources.kube import KubeSource

log = logging.getLogger("bpflb.agent")


def kube_parts(client: KubeClient, node_name: str, namespace: str | None = None) -> tuple[KubeSource, NodeReporter]:
    """The agent's view of the API and its node report, both in bpflb's namespace: namespace (the flag),
    else $POD_NAMESPACE (the chart's downward API), else kube-system."""
    ns = own_namespace(namespace)
    source = KubeSource(client, node_name, namespace=ns, slice_view=slice_record, service_record=service_record,
                        paced=True)
    return source, NodeReporter(client, node_name, namespace=ns)


def run_kube_agent(opts: AgentOptions, *, kubeconfig: str | None = None, uninstall: bool = False,
                   once: bool = False, namespace: str | None = None, metrics_listen: str | None = None,
                   list_page_size: int | None = None) -> int:
    """Run the agent against the API until SIGTERM/SIGINT (exit code 0), or do one sync (once). namespace:
    bpflb's (its ConfigMap, the reports), default $POD_NAMESPACE, else kube-system; list_page_size: objects
    per list request (default PAGE_SIZE)."""
    try:
        config = load_config(kubeconfig)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    client = KubeClient(config, user_agent=f"bpflb-agent/{opts.node_name}", page_size=list_page_size or PAGE_SIZE)
    source, reporter = kube_parts(client, opts.node_name, namespace)
    events = ServiceEvents(client, opts.node_name, uid_of=lambda key: agent.translator.service_uid(key))

    def on_sync(agent: Agent, report: SyncReport | None) -> None:
        reporter.update(agent_report(agent, source, report))
        events.update(agent.refused)

    agent = Agent(opts, source, on_sync=on_sync)
    if uninstall:
        agent.uninstall(opts.device)
        return 0

    def stop() -> None:
        agent.stop()
        source.close()

    install_signal_handlers(stop)
    log.info("Kubernetes API source: %s (credentials: %s); reporting to ConfigMap %s", client.server,
             client.source, reporter.path)
    server: MetricsServer | None = None
    if metrics_listen and not once:
        agent.metrics = AgentMetrics(agent)
        server = agent.metrics.serve(metrics_listen)
    reporter.start()
    events.start()
    source.start()              # the lists come in while the datapath loads
    try:
        if once:
            started = time.monotonic()
            agent.start()
            loaded = time.monotonic()
            partial = agent.sync_as_listed()
            source.wait_synced()
            listed = source.synced_at or time.monotonic()       # list-complete: the last first list's end
            report = agent.sync_once()
            done = time.monotonic()
            on_sync(agent, report)
            objects = sum(len(res.objects) for res in source.resources)
            log.info("once: listed %d objects in %.3fs; the datapath loaded meanwhile in %.3fs; %d partial syncs "
                     "while the Services came; from list-complete, translated and programmed %d frontends in "
                     "%.3fs", objects, listed - started, loaded - started, partial,
                     len(agent.state.frontends) if agent.state else 0, done - listed)
            return 0 if report is not None else 1
        agent.run()
        return 0
    finally:
        source.close()
        reporter.close()
        if server is not None:
            server.close()
        events.close()
