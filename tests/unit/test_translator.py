"""The translator with a memory (model.translate.Translator): the same result as translate() sync after sync,
re-translating only what changed, saying so (DesiredState.changes), and nothing at all for a re-list or a
watch replay (new objects with the resourceVersions already seen)."""

from __future__ import annotations

import copy
import itertools
import random
from typing import Any, cast

import pytest

from bpflb.kubeapi import KubeObject
from bpflb.model import frontends as frontends_module
from bpflb.model import translate as translate_module
from bpflb.model.endpoints import slice_record
from bpflb.model.records import ServiceRecord, service_record
from bpflb.model.translate import Translator, translate
from bpflb.model.types import DesiredState
from bpflb.sources.base import Changes, Snapshot, new_origin
from bpflb.sources.kube import service_view
from tests.unit.helpers import NODE, endpoint, endpoint_slice, lb_service, node, service

_rv = itertools.count(1)


def versioned(obj: KubeObject) -> KubeObject:
    obj["metadata"]["resourceVersion"] = str(next(_rv))
    return obj


def cluster() -> Snapshot:
    services = [versioned(service(f"s{i}", ports=[{"name": "http", "port": 80, "targetPort": 8080,
                                                   "nodePort": 30000 + i}])) for i in range(8)]
    slices = [versioned(endpoint_slice(f"s{i}", [endpoint(f"10.0.{i}.1", NODE, f"s{i}-a"),
                                                 endpoint(f"10.0.{i}.2", "node-b", f"s{i}-b")]))
              for i in range(8)]
    return Snapshot(services=services, endpointslices=slices, nodes=[node()], config={"bpfLBMode": "SNAT"})


def test_it_agrees_with_translate_and_says_what_changed() -> None:
    snap = cluster()
    translator = Translator(NODE)
    first = translator.translate(snap)
    assert first.changes is None and first.frontends == translate(snap, NODE).frontends
    snap.endpointslices[3] = versioned(endpoint_slice("s3", [endpoint("10.0.3.9", NODE, "s3-z")]))
    snap.services = snap.services[1:]
    second = translator.translate(snap)
    assert second.frontends == translate(snap, NODE).frontends
    assert second.base == first.generation and second.changes is not None
    assert {fe.l4.port for fe in (*first.frontends.values(), *second.frontends.values())
            if fe.l4 in second.changes} == {30000, 30003}
    assert second.services_changed == {"default/s0", "default/s3"}
    unchanged = [k for k in second.frontends if k not in second.changes]
    assert unchanged and all(second.frontends[k] is first.frontends[k] for k in unchanged)


def test_a_relist_with_the_same_resource_versions_retranslates_nothing() -> None:
    snap = cluster()
    translator = Translator(NODE)
    first = translator.translate(snap)
    relisted = Snapshot(services=copy.deepcopy(snap.services), endpointslices=copy.deepcopy(snap.endpointslices),
                        nodes=snap.nodes, config=snap.config)
    again = translator.translate(relisted)
    assert again.changes == set() and again.services_changed == set()
    assert all(again.frontends[k] is fe for k, fe in first.frontends.items())
    relisted.endpointslices[0] = versioned(copy.deepcopy(relisted.endpointslices[0]))   # a new version: read
    relisted.endpointslices[0]["endpoints"] = []
    third = translator.translate(relisted)
    assert third.services_changed == {"default/s0"} and third.frontends == translate(relisted, NODE).frontends


def test_the_sources_records_translate_as_the_objects_they_were_read_from() -> None:
    """The Kubernetes source keeps each EndpointSlice as the model's record (slice_record), not the decoded
    object: the translation of records equals that of the objects, whatever they hold (a plain slice, one with
    not-ready, terminating and repeated endpoints, an unusable one with its problems), and the record keeps
    nothing of the object."""
    snap = cluster()
    snap.endpointslices[1]["endpoints"] = [
        endpoint("10.0.1.1", NODE, "s1-a"), endpoint("10.0.1.1", "node-b", "s1-dup"),
        {**endpoint("10.0.1.3", "node-b", "s1-c"), "conditions": {"ready": False, "serving": True,
                                                                 "terminating": True}},
        {**endpoint("10.0.1.4", NODE, "s1-d"), "conditions": {"ready": False}}]
    snap.endpointslices[2]["addressType"] = "FQDN"
    snap.endpointslices[4]["endpoints"] = [{"addresses": ["10.0.4.1", "not-an-ip"]}]
    records = [slice_record(copy.deepcopy(s)) for s in snap.endpointslices]
    assert all(r.raw is None for r in records) and records[0].parsed is not None and records[0].parsed.plain
    assert records[1].parsed is not None and not records[1].parsed.plain
    # The Kubernetes source hands the translator these records where Snapshot types raw objects (its slice_view
    # returns Any): the same cast here.
    from_records = Snapshot(services=snap.services, endpointslices=cast(list[KubeObject], records), nodes=snap.nodes,
                            config=snap.config)
    want, got = translate(snap, NODE), Translator(NODE).translate(from_records)
    assert got.frontends == want.frontends and got.problems == want.problems and got.notes == want.notes
    assert {p.obj for p in want.problems} >= {"EndpointSlice default/s2-abc", "EndpointSlice default/s4-abc"}
    assert any(fe.draining for fe in got.frontends.values())          # the rules were applied, not skipped


def _records(views: list[KubeObject]) -> list[KubeObject]:
    """ServiceRecords of views, typed as Snapshot types them (the Kubernetes source's view returns Any)."""
    return cast(list[KubeObject], [service_record(copy.deepcopy(v)) for v in views])


def _varied_services() -> list[KubeObject]:
    """Services of every shape the translation reads, as the Kubernetes source's views: NodePort, LoadBalancer
    with its status, externalIPs, externalTrafficPolicy Local with a healthCheckNodePort, session affinity,
    annotations and labels, and broken ones (a bad field: a Problem; unusable metadata: skipped)."""
    plain = service("plain", ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}])
    lb = lb_service("lb", ingress=["198.51.100.7", "2001:db8::1"],
                    ports=[{"name": "http", "port": 80, "nodePort": 30081, "protocol": "TCP"},
                           {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}])
    local = lb_service("local", ingress=["198.51.100.8"], externalTrafficPolicy="Local", healthCheckNodePort=32000,
                       ports=[{"name": "http", "port": 80, "nodePort": 30082}])
    ext = service("ext", type_="ClusterIP", clusterIP="10.96.0.10", clusterIPs=["10.96.0.10"],
                  externalIPs=["192.0.2.50", NODE_INTERNAL_ADDR], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
                  ports=[{"name": "web", "port": 8080, "protocol": "TCP"}])
    ext["metadata"]["labels"] = {"app": "ext", "tier": "front"}
    ext["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "maglev", "note": "Ünïcode ✓"}
    broken = service("broken", ports=[{"name": "a", "port": 80, "nodePort": 30083, "protocol": "SCTP"},
                                      {"name": "b", "port": 81, "nodePort": 99999},
                                      {"name": "c", "port": 82, "nodePort": 30084}])
    broken["metadata"]["annotations"] = {"service.cilium.io/lb-algorithm": "round-robin"}
    bad_labels = service("bad-labels", ports=[{"name": "http", "port": 80, "nodePort": 30085}])
    bad_labels["metadata"]["labels"] = ["not", "a", "mapping"]
    other_proxy = service("other-proxy", ports=[{"name": "http", "port": 80, "nodePort": 30086}])
    other_proxy["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "foo"}
    selectorless = service("no-selector", selector={}, ports=[{"name": "http", "port": 80, "nodePort": 30087}])
    nameless = service("x")
    del nameless["metadata"]["name"]
    odd_spec: KubeObject = {"metadata": {"name": "odd-spec", "namespace": "other"}, "spec": ["not", "a", "mapping"]}
    no_namespace = service("no-ns", ports=[{"name": "http", "port": 80, "nodePort": 30088}])
    del no_namespace["metadata"]["namespace"]
    out = []
    for i, svc in enumerate([plain, lb, local, ext, broken, bad_labels, other_proxy, selectorless, nameless,
                             odd_spec, no_namespace]):
        svc["metadata"].update(uid=f"00000000-0000-0000-0000-{i:012d}", resourceVersion=str(100 + i),
                               creationTimestamp=f"2026-01-01T00:00:{i:02d}Z", managedFields=[{"manager": "x"}])
        out.append(service_view(svc))
    return out


NODE_INTERNAL_ADDR = "192.0.2.1"


def test_service_records_translate_exactly_as_the_views_they_were_made_from() -> None:
    """The Kubernetes source keeps each Service as a ServiceRecord (its view packed): a record's view is the
    view it was made from, and its translation equals the view's, Problems and notes word for word, whatever
    the Service holds; the translator's uid of each is the view's."""
    views = _varied_services()
    records = _records(views)
    assert [cast(ServiceRecord, r).view() for r in records] == views
    assert all(cast(ServiceRecord, r).view() is not cast(ServiceRecord, r).view() for r in records)
    # A record of unusable metadata has no key (the translator reads its view to say why); the others are read as
    # they are (their metadata is plain).
    assert [cast(ServiceRecord, r).key for r in records] == [
        "default/plain", "default/lb", "default/local", "default/ext", "default/broken", None, "default/other-proxy",
        "default/no-selector", None, "other/odd-spec", "default/no-ns"]
    slices = [endpoint_slice(name, [endpoint("10.0.0.1", NODE, f"{name}-a"), endpoint("10.0.0.2", "node-b")])
              for name in ("plain", "lb", "local", "ext", "broken", "bad-labels", "other-proxy")]
    config = {"bpfLBMode": "SNAT", "extraLoadBalancerAlgorithmsEnabled": "true"}
    want_snap = Snapshot(services=views, endpointslices=slices, nodes=[node()], config=config)
    got_snap = Snapshot(services=records, endpointslices=slices, nodes=[node()], config=config)
    want, translator = translate(want_snap, NODE), Translator(NODE)
    got = translator.translate(got_snap)
    assert got.frontends == want.frontends and got.problems == want.problems and got.notes == want.notes
    assert got.health_checks == want.health_checks and dict(got.service_rank) == dict(want.service_rank)
    assert got.frontends and want.problems and want.notes and want.health_checks     # every rule had its say
    assert {p.obj for p in want.problems} >= {"Service default/broken", "Service default/bad-labels",
                                              "Service default/<unnamed #8>"}
    uids = {f"{v['metadata'].get('namespace') or 'default'}/{v['metadata'].get('name')}": v["metadata"]["uid"]
            for v in views}
    for key in got.service_rank:
        assert translator.service_uid(key) == uids[key]
    assert translate(got_snap, NODE).frontends == want.frontends     # translate() reads records too


def test_a_relist_of_service_records_with_the_same_resource_versions_retranslates_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records made again from the same objects (a re-list: new records, the same resourceVersions) are the
    same Services: nothing is translated again; a new resourceVersion is."""
    translated: list[str] = []
    real = frontends_module._translate_service

    def counting(meta: Any, *args: Any) -> Any:
        translated.append(meta.key)
        return real(meta, *args)

    monkeypatch.setattr(translate_module, "_translate_service", counting)
    snap = cluster()
    views = [service_view(copy.deepcopy(s)) for s in snap.services]
    translator = Translator(NODE)
    records = Snapshot(services=_records(views), endpointslices=snap.endpointslices, nodes=snap.nodes,
                       config=snap.config)
    first = translator.translate(records)
    assert len(translated) == 8 and first.frontends == translate(snap, NODE).frontends
    translated.clear()
    relisted = Snapshot(services=_records(views), endpointslices=copy.deepcopy(snap.endpointslices),
                        nodes=snap.nodes, config=snap.config)
    assert all(a == b and a is not b for a, b in zip(records.services, relisted.services, strict=True))
    again = translator.translate(relisted)
    assert translated == [] and again.changes == set() and again.services_changed == set()
    assert all(again.frontends[k] is fe for k, fe in first.frontends.items())
    views[2] = versioned(copy.deepcopy(views[2]))                  # a new version, the same content: read again
    views[3] = versioned(copy.deepcopy(views[3]))
    views[3]["spec"]["ports"][0]["nodePort"] = 31003
    third = translator.translate(Snapshot(services=_records(views), endpointslices=relisted.endpointslices,
                                          nodes=snap.nodes, config=snap.config))
    assert sorted(translated) == ["default/s2", "default/s3"] == sorted(third.services_changed or ())
    assert third.frontends == translate(Snapshot(services=views, endpointslices=relisted.endpointslices,
                                                 nodes=snap.nodes, config=snap.config), NODE).frontends


class _Source:
    """What KubeSource keeps and says, without the API: objects by namespace/name and the keys each change
    touched since the last snapshot (None after a re-list: not known)."""

    def __init__(self) -> None:
        self.origin, self.seq = new_origin(), 0
        self.services: dict[str, KubeObject] = {}
        self.slices: dict[str, Any] = {}
        self.changed: tuple[set[str], set[str]] | None = None

    def put(self, kind: str, key: str, obj: Any) -> None:
        objects = self.services if kind == "svc" else self.slices
        if obj is None:
            objects.pop(key, None)
        else:
            objects[key] = obj
        if self.changed is not None:
            self.changed[0 if kind == "svc" else 1].add(key)

    def snapshot(self) -> Snapshot:
        changes = None
        if self.changed is not None:
            changes = Changes(self.origin, self.seq, self.seq + 1,
                              {k: self.services.get(k) for k in self.changed[0]},
                              {k: self.slices.get(k) for k in self.changed[1]})
        self.seq += 1
        self.changed = (set(), set())
        return Snapshot(services=list(self.services.values()), endpointslices=list(self.slices.values()),
                        nodes=[node()], config={"bpfLBMode": "SNAT"}, changes=changes)


def _outcome(state: DesiredState) -> tuple[Any, ...]:
    return (state.frontends, sorted(map(str, state.problems)), sorted(map(str, state.notes)), state.health_checks,
            dict(state.by_service), dict(state.service_rank))


@pytest.mark.parametrize("records", [False, True], ids=["dicts", "service-records"])
def test_following_the_sources_changes_equals_comparing_the_lists(monkeypatch: pytest.MonkeyPatch,
                                                                  records: bool) -> None:
    """A source that says what changed (Snapshot.changes, as KubeSource does): the translator follows that
    instead of comparing the lists, with the same result as a translator comparing them and as translate(),
    through 300 random steps: Services added, changed, deleted, claiming each other's nodePorts; slices moved
    between Services, emptied, deleted; re-lists (new objects, the same resourceVersions; the changes unknown);
    a snapshot the translator never saw (the chain broken: it compares the lists). The Services as dicts, or
    as the ServiceRecords the agent's Kubernetes source keeps."""
    compared = {"n": 0}
    update = translate_module._Objects.update

    def counting(self: Any, raws: list[Any]) -> set[str]:
        compared["n"] += 1
        return update(self, raws)

    monkeypatch.setattr(translate_module._Objects, "update", counting)
    rng = random.Random(7)
    src = _Source()
    follower, comparer = Translator(NODE), Translator(NODE)
    names = [f"s{i}" for i in range(12)]
    followed = 0
    for step in range(300):
        for _ in range(rng.randint(1, 3)):
            name, what = rng.choice(names), rng.random()
            if what < 0.4:
                port = 30000 + rng.randrange(8)                 # 8 nodePorts for 12 Services: conflicts
                obj = versioned(service(name, ports=[{"name": "http", "port": 80, "targetPort": 8080,
                                                      "nodePort": port}]))
                obj["metadata"]["creationTimestamp"] = f"2026-01-01T00:00:{rng.randrange(60):02d}Z"
                src.put("svc", f"default/{name}", service_record(service_view(obj)) if records else obj)
            elif what < 0.5:
                src.put("svc", f"default/{name}", None)
            elif what < 0.85:
                owner = rng.choice(names)
                eps = [endpoint(f"10.0.{rng.randrange(4)}.{rng.randrange(1, 9)}", rng.choice([NODE, "node-b"]),
                                f"{owner}-{i}") for i in range(rng.randrange(4))]
                raw = versioned(endpoint_slice(owner, eps, name=f"{name}-slice"))
                src.put("eps", f"default/{name}-slice", slice_record(raw))
            else:
                src.put("eps", f"default/{name}-slice", None)
        if step % 50 == 49:               # a re-list: other objects with the same resourceVersions
            src.services = {k: service_record(v.view()) if isinstance(v, ServiceRecord) else copy.deepcopy(v)
                            for k, v in src.services.items()}
            src.changed = None
        if step % 70 == 69:
            src.snapshot()                  # taken by someone else: the next one does not follow the last seen
        snap = src.snapshot()
        before = compared["n"]
        got = follower.translate(snap)
        if compared["n"] == before:
            followed += 1
        listed = Snapshot(services=snap.services, endpointslices=snap.endpointslices, nodes=snap.nodes,
                          config=snap.config)
        want = comparer.translate(listed)
        assert _outcome(got) == _outcome(want), f"step {step}"
        assert got.frontends == translate(listed, NODE).frontends, f"step {step}"
        assert got.services_changed == want.services_changed and got.changes == want.changes, f"step {step}"
    assert followed >= 280          # every step but the first, the re-lists and the broken chains
