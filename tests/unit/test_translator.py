"""The translator with a memory (model.translate.Translator): the same result as translate() sync after sync,
re-translating only what changed, saying so (DesiredState.changes), and nothing at all for a re-list or a
watch replay (new objects with the resourceVersions already seen)."""

from __future__ import annotations

import copy
import itertools

from bpflb.model.translate import Translator, translate
from bpflb.sources.base import Snapshot
from tests.unit.helpers import NODE, endpoint, endpoint_slice, node, service

_rv = itertools.count(1)


def versioned(obj: dict[str, object]) -> dict[str, object]:
    obj["metadata"]["resourceVersion"] = str(next(_rv))        # type: ignore[index]
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
