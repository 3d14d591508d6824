"""The agent's Kubernetes source against the emulated API: list+watch of Services, EndpointSlices, Nodes and
the agent ConfigMap; an API outage keeps the last objects (never an empty view), then a resync. The
privileged tests run the real agent (BPF maps in the kernel, tc on a scratch namespace's eth0) on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from bpflb.agent import Agent, AgentOptions
from bpflb.control.report import NodeReporter
from bpflb.datapath.lbmaps import SyncReport
from bpflb.datapath.memory import MemoryDatapath, MemoryPins
from bpflb.inspect import collect
from bpflb.kubeapi import KubeClient, anonymous
from bpflb.model import translate as translate_module
from bpflb.model.endpoints import SliceEntry, slice_record
from bpflb.model.records import ServiceRecord, service_record
from bpflb.model.translate import Translator, translate
from bpflb.sources.base import Snapshot
from bpflb.sources.kube import KubeSource
from bpflb_lab.apiserver import EmulatedAPI
from bpflb_lab.scratch import NODE1
from tests.control.helpers import agent_on_scratch_node, existing, wait_for

SVC = "/api/v1/namespaces/default/services"
EPS = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


def node(name: str = "node1", ip: str = NODE1) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def service(name: str, node_port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": node_port}]}}


def endpoint_slice(service_name: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-abc", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node2"} for ip in ips]}


def config(mode: str = "SNAT", **extra: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bpflb-agent", "namespace": "kube-system"},
            "data": {"bpfLBMode": mode, **extra}}


def list_comparisons(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every list comparison the translator makes from now on (the length of each list compared): none when
    it follows the source's changes instead."""
    compared: list[int] = []
    update = translate_module._Objects.update

    def counting(self: Any, raws: list[Any]) -> set[str]:
        compared.append(len(raws))
        return update(self, raws)

    monkeypatch.setattr(translate_module._Objects, "update", counting)
    return compared


@pytest.fixture
def source(api: EmulatedAPI, client: KubeClient) -> Iterator[KubeSource]:
    src = KubeSource(KubeClient(anonymous(api.url)), "node1", backoff_first=0.05, backoff_max=0.2)
    try:
        yield src
    finally:
        src.close()


def test_the_first_snapshot_waits_for_every_list_and_then_holds_everything(
        client: KubeClient, source: KubeSource) -> None:
    client.create("/api/v1/nodes", node())
    client.create("/api/v1/nodes", node("node2", "198.18.0.12"))
    client.create(SVC, service("echo", 30080))
    client.create(EPS, endpoint_slice("echo", "10.244.2.10"))
    client.create("/api/v1/namespaces/kube-system/configmaps", config("DSR"))
    client.create("/api/v1/namespaces/kube-system/configmaps",
                  {"metadata": {"name": "unrelated", "namespace": "kube-system"}, "data": {"bpfLBMode": "x"}})
    snap = source.snapshot()
    assert [s["metadata"]["name"] for s in snap.services] == ["echo"]
    assert [s["metadata"]["name"] for s in snap.endpointslices] == ["echo-abc"]
    assert sorted(n["metadata"]["name"] for n in snap.nodes) == ["node1", "node2"]
    assert snap.config == {"bpfLBMode": "DSR"}
    assert source.last_config == {"bpfLBMode": "DSR"}


def test_watch_events_are_followed(client: KubeClient, source: KubeSource) -> None:
    # Each step waits for its own event in the snapshot: a change signal can come from the step before
    # (the Node's ADDED event may land after a snapshot), so "a change happened" is not "this change".
    client.create("/api/v1/nodes", node())
    wait_for("the Node", lambda: source.snapshot().nodes)
    client.create(SVC, service("echo", 30080))
    assert source.wait_for_change(5)
    wait_for("the Service", lambda: [s["metadata"]["name"] for s in source.snapshot().services] == ["echo"])
    client.merge_patch(f"{SVC}/echo", {"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30081}]}})
    assert source.wait_for_change(5)
    wait_for("the new nodePort", lambda: source.snapshot().services[0]["spec"]["ports"][0]["nodePort"] == 30081)
    client.delete(f"{SVC}/echo")
    assert source.wait_for_change(5)
    wait_for("the Service gone", lambda: source.snapshot().services == [])
    # A Node heartbeat (status other than addresses) is not a change for the datapath.
    source.wait_for_change(0.2)
    source.snapshot()
    client.merge_patch("/api/v1/nodes/node1", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert not source.wait_for_change(0.5)


def test_each_snapshot_says_what_changed_since_the_one_before(
        api: EmulatedAPI, client: KubeClient, source: KubeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot.changes: the Services and EndpointSlices the watch events changed since the source's previous
    snapshot, each as it is now (None: deleted); nothing known after a re-list. A translator that read the
    previous snapshot follows them instead of comparing the lists, and agrees with translate()."""
    client.create("/api/v1/nodes", node())
    client.create(SVC, service("echo", 30080))
    client.create(SVC, service("other", 30081))
    client.create(EPS, endpoint_slice("echo", "10.244.2.10"))
    client.create(EPS, endpoint_slice("other", "10.244.2.20"))
    wait_for("every object", lambda: len(source.snapshot().endpointslices) == 2)
    first = source.snapshot()
    assert first.changes is not None and (first.changes.services, first.changes.endpointslices) == ({}, {})
    translator = Translator("node1")
    translator.translate(first)
    client.merge_patch(f"{SVC}/echo", {"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30082}]}})
    client.delete(f"{EPS}/other-abc")
    wait_for("both events", lambda: len(source._slices.objects) == 1 and
             source._services.objects["default/echo"]["spec"]["ports"][0]["nodePort"] == 30082)
    snap = source.snapshot()
    changes = snap.changes
    assert changes is not None and (changes.since, changes.seq) == (first.changes.seq, first.changes.seq + 1)
    assert list(changes.services) == ["default/echo"] and changes.services["default/echo"] is next(
        s for s in snap.services if s["metadata"]["name"] == "echo")
    assert changes.endpointslices == {"default/other-abc": None}
    want = translate(snap, "node1").frontends
    compared = list_comparisons(monkeypatch)
    state = translator.translate(snap)
    assert not compared and state.frontends == want
    assert {fe.l4.port for fe in state.frontends.values()} == {30082, 30081}
    source._list(source._services)          # a re-list (as after 410 Gone) that finds nothing new: nothing changed
    same = source.snapshot()
    assert same.changes is not None and (same.changes.services, same.changes.endpointslices) == ({}, {})
    assert translator.translate(same).frontends == state.frontends and not compared
    api.preload("v1", "services", [service("late", 30090)])      # not sent to the watchers: the re-list finds it
    source._list(source._services)
    relisted = source.snapshot()
    assert relisted.changes is None                 # what changed is not known: the lists are compared
    assert {fe.l4.port for fe in translator.translate(relisted).frontends.values()} == {30082, 30081, 30090}
    assert compared


def test_the_agents_source_keeps_each_service_as_a_record_of_its_view(
        api: EmulatedAPI, client: KubeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source as the agent makes it (kube_parts: service_record, slice_record) keeps each Service as a
    ServiceRecord whose view is what a source of dicts keeps; a watch event's record is in Snapshot.changes and
    the translator follows it, agreeing with translate(); a re-list that finds nothing new keeps the records."""
    client.create("/api/v1/nodes", node())
    client.create(SVC, service("echo", 30080))
    client.create(SVC, service("other", 30081))
    client.create(EPS, endpoint_slice("echo", "10.244.2.10"))
    client.create(EPS, endpoint_slice("other", "10.244.2.20"))
    src = KubeSource(KubeClient(anonymous(api.url)), "node1", backoff_first=0.05, backoff_max=0.2,
                     slice_view=slice_record, service_record=service_record)
    plain = KubeSource(KubeClient(anonymous(api.url)), "node1", backoff_first=0.05, backoff_max=0.2)
    try:
        src.snapshot()
        first, dicts = src.snapshot(), plain.snapshot()         # (the second: it says what changed)
        assert first.changes is not None
        records: list[ServiceRecord] = [s for s in cast(list[Any], first.services) if isinstance(s, ServiceRecord)]
        assert len(records) == len(first.services) == 2
        assert sorted((r.view() for r in records), key=lambda v: v["metadata"]["name"]) == \
            sorted(dicts.services, key=lambda v: v["metadata"]["name"])
        assert {r.key for r in records} == {"default/echo", "default/other"} and \
            all(r.version == r.view()["metadata"]["resourceVersion"] for r in records)
        translator = Translator("node1")
        assert translator.translate(first).frontends == translate(dicts, "node1").frontends
        assert translator.service_uid("default/echo") == next(
            s["metadata"]["uid"] for s in dicts.services if s["metadata"]["name"] == "echo")
        client.merge_patch(f"{SVC}/echo", {"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30082}]}})
        wait_for("the patch", lambda: src._services.objects["default/echo"].view()["spec"]["ports"][0]["nodePort"]
                 == 30082)
        snap = src.snapshot()
        assert snap.changes is not None and list(snap.changes.services) == ["default/echo"]
        echo = snap.changes.services["default/echo"]
        assert isinstance(echo, ServiceRecord) and any(s is echo for s in snap.services)
        want = translate(snap, "node1").frontends
        compared = list_comparisons(monkeypatch)
        state = translator.translate(snap)
        assert not compared and state.frontends == want
        assert {fe.l4.port for fe in state.frontends.values()} == {30082, 30081}
        src._list(src._services)            # a re-list that finds nothing new: the same records, nothing changed
        same = src.snapshot()
        assert same.changes is not None and same.changes.services == {}
        assert all(a is b for a, b in zip(same.services, snap.services, strict=True))
        assert translator.translate(same).frontends == state.frontends and not compared
    finally:
        src.close()
        plain.close()


def test_an_outage_keeps_the_objects_and_a_reconnect_resyncs(
        api: EmulatedAPI, client: KubeClient, source: KubeSource) -> None:
    client.create("/api/v1/nodes", node())
    client.create(SVC, service("echo", 30080))
    assert len(source.snapshot().services) == 1
    api.stop()
    wait_for("the outage noticed", lambda: not source.connected)
    wait_for("failed retries", lambda: any("cannot reach" in e for e in source.errors()))
    snap = source.snapshot()              # the last objects, not an empty view
    assert [s["metadata"]["name"] for s in snap.services] == ["echo"]
    assert [n["metadata"]["name"] for n in snap.nodes] == ["node1"]

    # Changes made while the watchers were away arrive with the re-list.
    api.emulator.preload("v1", "services", [service("late", 30090)])   # no client connected now
    api.start()
    wait_for("the resync", lambda: {s["metadata"]["name"] for s in source.snapshot().services} == {"echo", "late"})
    wait_for("connected again", lambda: source.connected)


def test_the_agents_source_keeps_slim_records_and_a_relist_keeps_the_unchanged_ones(
        api: EmulatedAPI, client: KubeClient) -> None:
    """What `bpflb agent --kube` runs: Services trimmed to what the translation reads, EndpointSlices as the
    model's records (the decoded objects dropped as each page arrives, pages of 2 here); a list that finds the
    resourceVersions it has seen keeps the very same records, so the translation redoes nothing."""
    client.create("/api/v1/nodes", node())
    big = service("echo", 30080)
    big["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    big["status"] = {"conditions": [{"type": "Ready", "status": "True"}], "loadBalancer": {}}
    client.create(SVC, big)
    client.create(SVC, service("other", 30081))
    client.create(EPS, endpoint_slice("echo", "10.244.2.10", "10.244.2.11"))
    src = KubeSource(KubeClient(anonymous(api.url), page_size=2), "node1", backoff_first=0.05, backoff_max=0.2,
                     slice_view=slice_record)
    try:
        snap = src.snapshot()
        echo = next(s for s in snap.services if s["metadata"]["name"] == "echo")
        assert "managedFields" not in echo["metadata"] and echo["status"] == {"loadBalancer": {}}
        assert echo["spec"]["ports"][0]["nodePort"] == 30080 and echo["metadata"]["resourceVersion"]
        [record] = snap.endpointslices
        assert isinstance(record, SliceEntry) and record.raw is None and record.key == "default/echo-abc"
        assert record.parsed is not None and [ep.ip for ep in record.parsed.endpoints] == [0x0AF4020A, 0x0AF4020B]
        client.merge_patch(f"{SVC}/other", {"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30082}]}})
        wait_for("the patch", lambda: any(s["spec"]["ports"][0]["nodePort"] == 30082 for s in src.snapshot().services))
        for res in src.resources[:2]:
            src._list(res)                  # a re-list, as after 410 Gone
        again = src.snapshot()
        assert next(s for s in again.services if s["metadata"]["name"] == "echo") is echo
        assert again.endpointslices[0] is record
    finally:
        src.close()


def test_partial_snapshots_hold_the_services_listed_so_far_with_every_slice_and_pace_the_list(
        api: EmulatedAPI, client: KubeClient) -> None:
    """Before list-complete the agent gets the Services listed so far, never before every EndpointSlice, Node
    and the ConfigMap are in (a Service must not be programmed without its endpoints), and the list waits for
    it: with pages of 2 and a consumer slower than the API, each partial snapshot holds at most a page more
    than the one before (the list paced), and ending the pacing lets the list finish on its own."""
    client.create("/api/v1/nodes", node())
    client.create("/api/v1/namespaces/kube-system/configmaps", config("DSR"))
    names = [f"svc{i}" for i in range(9)]
    for i, name in enumerate(names):
        client.create(SVC, service(name, 30080 + i))
        client.create(EPS, endpoint_slice(name, f"10.244.2.{10 + i}"))
    src = KubeSource(KubeClient(anonymous(api.url), page_size=2), "node1", backoff_first=0.05, backoff_max=0.2)
    try:
        sizes: list[int] = []
        while True:
            snap = src.partial_snapshot(5.0)
            if snap is None:
                break
            assert snap.partial
            assert len(snap.endpointslices) == len(names) and len(snap.nodes) == 1
            assert snap.config == {"bpfLBMode": "DSR"}
            got = [s["metadata"]["name"] for s in snap.services]
            assert got == names[:len(got)]                    # in list order, each once
            sizes.append(len(got))
            threading.Event().wait(0.15)    # slower than the API: without pacing the list would run ahead
            if len(sizes) == 2:
                break
        assert sizes and all(b - a <= 2 for a, b in zip([0, *sizes], sizes, strict=False))
        assert not src.synced                                 # held a page ahead of the consumer
        src.end_partial()                                     # the consumer is done: the list goes on alone
        assert src.wait_synced(10)
        assert src.partial_snapshot(0.1) is None              # complete: snapshot() is the one to call now
        assert [s["metadata"]["name"] for s in src.snapshot().services] == names
        assert src.synced_at is not None
    finally:
        src.close()


def test_the_agent_programs_as_the_services_are_listed_and_a_failed_partial_sync_only_ends_that(
        api: EmulatedAPI, client: KubeClient, tmp_path: Path) -> None:
    """The agent on the paced source (in-memory maps): its partial syncs program the Services page by page;
    when one fails, the list goes on alone and the complete sync programs everything."""
    client.create("/api/v1/nodes", node())
    client.create("/api/v1/namespaces/kube-system/configmaps", config("SNAT"))
    for i in range(6):
        client.create(SVC, service(f"svc{i}", 30080 + i))
        client.create(EPS, endpoint_slice(f"svc{i}", f"10.244.2.{10 + i}"))
    for fail in (False, True):
        src = KubeSource(KubeClient(anonymous(api.url), page_size=2), "node1", slice_view=slice_record,
                         service_record=service_record, paced=True)
        agent = Agent(AgentOptions("node1", tmp_path / str(fail), device="eth0", health_servers=False), src,
                      datapath=MemoryDatapath(MemoryPins()))
        seen: list[int] = []
        real = agent._sync_once

        def partial_sync(snap: Snapshot, real: Any = real, fail: bool = fail, seen: list[int] = seen
                         ) -> SyncReport | None:
            if snap.partial:
                seen.append(len(snap.services))
                if fail:
                    raise RuntimeError("a bug in a partial sync")
            result: SyncReport | None = real(snap)
            return result

        agent._sync_once = partial_sync         # type: ignore[method-assign]
        try:
            agent.start()
            src.start()
            partial = agent.sync_as_listed()
            report = agent.sync_once()
        finally:
            src.close()
        assert report is not None and agent.state is not None and len(agent.state.by_service) == 6
        if fail:
            assert partial == 0 and len(seen) == 1        # the first one failed: no more were tried
            assert report.frontends_added == 6
        else:
            assert partial == len(seen) >= 2 and seen == sorted(seen)
            assert report.frontends_added < 6             # the partial syncs did the rest


def test_a_closed_source_never_hands_out_a_partial_view(api: EmulatedAPI, source: KubeSource) -> None:
    api.stop()
    threading.Timer(0.3, source.close).start()
    with pytest.raises(RuntimeError, match="closed before every resource was listed"):
        source.snapshot()


# ---------------------------------------------------------------------------------------------------------
# The real agent on the API


def frontends(pin_root: Path) -> dict[str, list[str]]:
    try:
        return {f["frontend"]: f["backends"] for f in collect(pin_root)["frontends"]}
    except Exception:  # noqa: BLE001 - maps not there (yet or any more)
        return {}


@pytest.mark.privileged
def test_the_agent_programs_the_maps_from_the_api_and_survives_an_outage(
        api: EmulatedAPI, client: KubeClient, pin_root: Path) -> None:
    client.create("/api/v1/nodes", node())
    client.create("/api/v1/namespaces/kube-system/configmaps", config("SNAT", configGeneration="g1"))
    client.create(SVC, service("echo", 30080))
    client.create(EPS, endpoint_slice("echo", "10.244.2.10"))
    agent_client = KubeClient(anonymous(api.url))
    source = KubeSource(agent_client, "node1", backoff_first=0.05, backoff_max=0.2)
    reporter = NodeReporter(agent_client, "node1")
    with agent_on_scratch_node(source, reporter, pin_root, "bpflb-kt") as (_agent, sn):
        fe = f"{NODE1}:30080/TCP"
        wait_for("the frontend", lambda: frontends(pin_root).get(fe) == ["10.244.2.10:8080"])
        report = wait_for("the node report", lambda: (c := client.get(
            "/api/v1/namespaces/kube-system/configmaps/bpflb-node-node1")) and
            c["data"].get("state") == "Ready" and c["data"])
        assert report["bpfLBMode"] == "SNAT" and report["configGeneration"] == "g1"
        assert report["frontends"] == "1"

        # EndpointSlice changed -> backends follow; Service changed -> frontend follows; deleted -> gone.
        client.merge_patch(f"{EPS}/echo-abc", endpoint_slice("echo", "10.244.2.10", "10.244.3.10"))
        wait_for("two backends", lambda: sorted(frontends(pin_root).get(fe) or []) ==
                 ["10.244.2.10:8080", "10.244.3.10:8080"])
        client.merge_patch(f"{SVC}/echo", {"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                                                "nodePort": 30081}]}})
        wait_for("the new nodePort", lambda: set(frontends(pin_root)) == {f"{NODE1}:30081/TCP"})
        client.create(SVC, service("other", 30082))
        wait_for("a second Service", lambda: f"{NODE1}:30082/TCP" in frontends(pin_root))
        client.delete(f"{SVC}/other")
        wait_for("the Service removed", lambda: set(frontends(pin_root)) == {f"{NODE1}:30081/TCP"})

        # The API goes away for a while: the datapath stays exactly as programmed.
        before = frontends(pin_root)
        api.stop()
        wait_for("every watcher noticed the outage",
                 lambda: not source.connected and len(source.errors()) == len(source.resources))
        assert frontends(pin_root) == before
        assert not source.connected
        # ... changes made meanwhile are picked up by the resync once it is back.
        api.emulator.preload("discovery.k8s.io/v1", "endpointslices",
                             [endpoint_slice("echo", "10.244.3.10")])
        api.start()
        wait_for("the resync", lambda: frontends(pin_root).get(f"{NODE1}:30081/TCP") == ["10.244.3.10:8080"])

        # The uninstall instruction: programs detached, pinned maps removed, reported; then back.
        client.merge_patch("/api/v1/namespaces/kube-system/configmaps/bpflb-agent",
                           {"data": {"uninstall": "true"}})
        wait_for("the pins removed", lambda: not pin_root.exists())
        tc = os.popen(f"ip netns exec {sn.ns} tc filter show dev eth0 ingress").read()
        assert "lb_ingress" not in tc
        wait_for("the Uninstalled report", lambda: existing(
            client, "/api/v1/namespaces/kube-system/configmaps/bpflb-node-node1")["data"]["state"] == "Uninstalled")
        client.merge_patch("/api/v1/namespaces/kube-system/configmaps/bpflb-agent",
                           {"data": {"uninstall": "false"}})
        wait_for("the datapath back", lambda: f"{NODE1}:30081/TCP" in frontends(pin_root))
