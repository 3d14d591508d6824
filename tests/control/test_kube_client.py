"""How bpflb's one Kubernetes client and the agent's source talk to the API (the emulated one, which pages,
resumes watches, compacts and sends bookmarks as a real API server does): lists come in pages; a watch the
server ends resumes from the last resourceVersion without listing again; a resourceVersion compacted away
(410 Gone) lists again; bookmarks move the resume point on a quiet resource; retries back off with jitter;
a write naming a stale resourceVersion is refused (409), which the leader election relies on."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from bpflb.kubeapi import ApiError, KubeClient, anonymous, backoff_delays
from bpflb.sources.kube import KubeSource
from bpflb_lab.apiserver import EmulatedAPI, Seen
from tests.control.helpers import existing, wait_for

SVC = "/api/v1/namespaces/default/services"


def service(name: str, port: int = 30080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": port}]}}


def requests_to(api: EmulatedAPI, path: str, *, watch: bool) -> list[Seen]:
    return [r for r in api.requests() if r.path == path and (r.query.get("watch") == "true") == watch]


def pager_whose_first_page_is_compacted_away(api: EmulatedAPI, client: KubeClient) -> KubeClient:
    """Services s0..s4 and a client listing them 2 at a time; after its first page the API moves on (s5 is
    created) and compacts, so the first page's resourceVersion is gone when the continue token comes back."""
    for i in range(5):
        client.create(SVC, service(f"s{i}", 30080 + i))
    pager = KubeClient(anonymous(api.url), page_size=2)
    real_request = pager.request
    calls = itertools.count()

    def compact_after_first_page(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        answer = real_request(method, path, *args, **kwargs)
        if next(calls) == 0:
            client.create(SVC, service("s5", 30085))
            api.compact()
        return answer

    pager.request = compact_after_first_page  # type: ignore[method-assign]
    return pager


@pytest.fixture
def source(api: EmulatedAPI) -> Iterator[KubeSource]:
    src = KubeSource(KubeClient(anonymous(api.url), page_size=2), "node1", backoff_first=0.05, backoff_max=0.2,
                     watch_timeout=1)
    try:
        yield src
    finally:
        src.close()


def test_lists_come_in_pages(api: EmulatedAPI, client: KubeClient) -> None:
    for i in range(5):
        client.create(SVC, service(f"s{i}", 30080 + i))
    items, version = KubeClient(anonymous(api.url), page_size=2).list("/api/v1/services")
    assert [i["metadata"]["name"] for i in items] == ["s0", "s1", "s2", "s3", "s4"]
    assert version and int(version) > 0
    pages = requests_to(api, "/api/v1/services", watch=False)
    assert [r.query.get("limit") for r in pages] == ["2", "2", "2"]
    assert "continue" not in pages[0].query and all(r.query.get("continue") for r in pages[1:])


def test_an_expired_continue_token_starts_the_list_again(api: EmulatedAPI, client: KubeClient) -> None:
    pager = pager_whose_first_page_is_compacted_away(api, client)
    items, _ = pager.list("/api/v1/services")
    assert [i["metadata"]["name"] for i in items] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    pages = requests_to(api, "/api/v1/services", watch=False)
    assert len(pages) == 1 + 1 + 3            # first page, the refused continue, then the list again (6 in 3)


def test_a_reduced_list_keeps_what_reduce_returns_even_across_an_expired_token(
        api: EmulatedAPI, client: KubeClient) -> None:
    """list(reduce=...): each item reduced as its page arrives (the next page asked for meanwhile), None dropped,
    in order; an expired continue token starts it again from the first page, nothing kept twice."""
    pager = pager_whose_first_page_is_compacted_away(api, client)
    names, version = pager.list("/api/v1/services",
                                reduce=lambda obj: None if obj["metadata"]["name"] == "s2" else obj["metadata"]["name"])
    assert names == ["s0", "s1", "s3", "s4", "s5"] and version
    assert len(requests_to(api, "/api/v1/services", watch=False)) == 1 + 1 + 3


def test_a_watch_the_server_ends_resumes_where_it_was_without_listing_again(
        api: EmulatedAPI, client: KubeClient, source: KubeSource) -> None:
    client.create(SVC, service("a"))
    wait_for("the first list", lambda: [s["metadata"]["name"] for s in source.snapshot().services] == ["a"])
    created = client.create(SVC, service("b", 30081))
    wait_for("b seen", lambda: len(source.snapshot().services) == 2)
    # timeoutSeconds=1: the server ends each watch; each new one starts at the last version seen.
    wait_for("a resumed watch", lambda: any(r.query.get("resourceVersion") == created["metadata"]["resourceVersion"]
                                            for r in requests_to(api, "/api/v1/services", watch=True)))
    client.delete(f"{SVC}/a")
    wait_for("a's deletion followed", lambda: [s["metadata"]["name"] for s in source.snapshot().services] == ["b"])
    watches = requests_to(api, "/api/v1/services", watch=True)
    assert all(r.query.get("allowWatchBookmarks") == "true" and r.query.get("timeoutSeconds") == "1"
               for r in watches)
    assert len(watches) >= 2
    assert len(requests_to(api, "/api/v1/services", watch=False)) == 1      # listed once, ever
    assert source.relists == 0


def test_a_compacted_resource_version_lists_again(api: EmulatedAPI, client: KubeClient,
                                                  source: KubeSource) -> None:
    client.create(SVC, service("a"))
    wait_for("the first list", lambda: len(source.snapshot().services) == 1)
    api.stop()                                 # watches broken; meanwhile the API moves on and compacts
    wait_for("the outage noticed", lambda: not source.connected)
    api.preload("v1", "nodes", [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}])
    api.compact()
    api.preload("v1", "services", [service("late", 30090)])
    api.start()
    wait_for("the list again", lambda: {s["metadata"]["name"] for s in source.snapshot().services} == {"a", "late"})
    assert source.relists >= 1
    wait_for("connected again", lambda: source.connected)


def test_bookmarks_move_the_resume_point_of_a_quiet_resource(api: EmulatedAPI, client: KubeClient) -> None:
    api.emulator.bookmark_interval = 0.2
    src = KubeSource(KubeClient(anonymous(api.url)), "node1", backoff_first=0.05, backoff_max=0.2,
                     watch_timeout=60)
    try:
        client.create(SVC, service("a"))
        wait_for("the first list", lambda: len(src.snapshot().services) == 1)
        services = src.resources[0]
        before = int(services.version or 0)
        # Other resources move the API's resourceVersion on; the quiet Services watch learns it by bookmark.
        client.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
        wait_for("a bookmark past the Node", lambda: int(services.version or 0) > before)
        api.stop()
        wait_for("the outage noticed", lambda: not src.connected)
        api.start()
        wait_for("the resumed watch", lambda: any(int(r.query.get("resourceVersion") or 0) > before
                                                  for r in requests_to(api, "/api/v1/services", watch=True)))
        assert len(requests_to(api, "/api/v1/services", watch=False)) == 1
    finally:
        src.close()


def test_retries_back_off_exponentially_with_jitter() -> None:
    delays = list(itertools.islice(backoff_delays(0.2, 10.0), 12))
    bounds = [min(0.2 * 2 ** i, 10.0) for i in range(12)]
    assert all(b / 2 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert max(delays) <= 10.0 and delays[-1] >= 5.0
    # Two agents that lost the API at the same moment do not retry in step.
    assert list(itertools.islice(backoff_delays(0.2, 10.0), 12)) != delays


def test_a_patch_on_a_stale_resource_version_is_a_conflict(client: KubeClient) -> None:
    created = client.create(SVC, service("a"))
    stale = created["metadata"]["resourceVersion"]
    client.merge_patch(f"{SVC}/a", {"metadata": {"resourceVersion": stale}, "spec": {"type": "ClusterIP"}})
    with pytest.raises(ApiError) as err:
        client.merge_patch(f"{SVC}/a", {"metadata": {"resourceVersion": stale}, "spec": {"type": "NodePort"}})
    assert err.value.status == 409
    assert existing(client, f"{SVC}/a")["spec"]["type"] == "ClusterIP"
