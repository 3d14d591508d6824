"""Translation for backend selection: terminating and not-ready endpoints become draining backends (kept for
their open flows, never picked), the Maglev settings of the agent ConfigMap are validated, and the backend
names Maglev hashes are unique."""

from __future__ import annotations

from ipaddress import IPv4Address

from bpflb.datapath.lbmaps import maglev_names, table_blocks
from bpflb.model.types import Algorithm, Backend, L4Addr, Proto
from tests.unit.helpers import (
    NODE,
    NODE_INTERNAL,
    endpoint,
    endpoint_slice,
    fe,
    run,
    service,
    the_problem,
)


def names(backends: tuple[Backend, ...]) -> list[str]:
    return [b.name for b in backends]


def test_a_terminating_endpoint_is_draining_while_others_are_ready() -> None:
    eps = [endpoint("10.0.1.1", NODE, "echo-a", ready=False, serving=True, terminating=True),
           endpoint("10.0.1.2", NODE, "echo-b")]
    front = fe(run([service()], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL, 30080)
    assert names(front.backends) == ["echo-b"]
    assert names(front.draining) == ["echo-a"] and front.draining[0].terminating


def test_serving_terminating_endpoints_are_used_when_none_is_ready() -> None:
    eps = [endpoint("10.0.1.1", NODE, "old", ready=False, serving=True, terminating=True),
           endpoint("10.0.1.2", NODE, "stopping", ready=False, serving=False, terminating=True),
           endpoint("10.0.1.3", NODE, "starting", ready=False, serving=False)]
    front = fe(run([service()], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL, 30080)
    assert names(front.backends) == ["old"]
    assert names(front.draining) == ["starting", "stopping"]
    assert not front.no_endpoints


def test_without_any_usable_endpoint_the_frontend_rejects_but_open_flows_keep_their_backends() -> None:
    eps = [endpoint("10.0.1.2", NODE, "stopping", ready=False, serving=False, terminating=True)]
    front = fe(run([service()], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL, 30080)
    assert front.no_endpoints and front.backends == ()
    assert names(front.draining) == ["stopping"]


def test_an_endpoint_that_left_the_slices_is_neither_eligible_nor_draining() -> None:
    front = fe(run([service()], [endpoint_slice(endpoints=[endpoint("10.0.1.2", NODE, "echo-b")])]),
               NODE_INTERNAL, 30080)
    assert names(front.backends) == ["echo-b"] and front.draining == ()


def test_local_policy_drains_only_this_nodes_endpoints() -> None:
    eps = [endpoint("10.0.1.1", NODE, "here-old", ready=False, serving=True, terminating=True),
           endpoint("10.0.1.2", NODE, "here"),
           endpoint("10.0.2.1", "node-b", "there-old", ready=False, serving=True, terminating=True)]
    front = fe(run([service(externalTrafficPolicy="Local")], [endpoint_slice(endpoints=eps)]), NODE_INTERNAL,
               30080)
    assert names(front.backends) == ["here"] and names(front.draining) == ["here-old"]


def test_maglev_settings_from_the_agent_configmap() -> None:
    state = run([service()], config={"lbAlgorithm": "Maglev", "maglevTableSize": "65521",
                                     "maglevHashSeed": "4294967295"})
    assert state.problems == []
    assert (state.settings.algorithm, state.settings.maglev_table_size, state.settings.maglev_seed) == (
        Algorithm.MAGLEV, 65521, 4294967295)
    assert fe(state, NODE_INTERNAL, 30080).algorithm == Algorithm.MAGLEV
    defaults = run([service()]).settings
    assert (defaults.maglev_table_size, defaults.maglev_seed) == (16381, 0)


def test_bad_maglev_settings_keep_their_defaults_and_say_what_is_allowed() -> None:
    state = run([service()], config={"maglevTableSize": "16384", "maglevHashSeed": "-3"})
    assert (state.settings.maglev_table_size, state.settings.maglev_seed) == (16381, 0)
    the_problem(state, "ConfigMap kube-system/bpflb-agent", "data.maglevTableSize",
                "must be one of 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071", 'got "16384"',
                "the default 16381 is used")
    the_problem(state, "data.maglevHashSeed", "must be an integer in 0..4294967295", 'got "-3"')
    state = run([service()], config={"maglevTableSize": "lots", "maglevHashSeed": "4294967296"})
    the_problem(state, "data.maglevTableSize", 'got "lots"')
    the_problem(state, "data.maglevHashSeed", 'got "4294967296"')


def test_maglev_names_are_the_stable_names_made_unique_where_they_repeat() -> None:
    def be(name: str, addr: str, port: int = 8080) -> Backend:
        return Backend(L4Addr(IPv4Address(addr), port, Proto.TCP), name, None, False)

    assert maglev_names((be("a", "10.0.0.1"), be("b", "10.0.0.2"))) == ("a", "b")
    assert maglev_names((be("a", "10.0.0.1"), be("a", "10.0.0.1", 9090), be("c", "10.0.0.3"))) == (
        "a@10.0.0.1:8080/TCP", "a@10.0.0.1:9090/TCP", "c")


def test_tables_are_cut_into_zero_padded_blocks() -> None:
    blocks = table_blocks(b"\x01\x00" * 16381)
    assert [len(b) for b in blocks] == [16384, 16384]
    assert blocks[1].endswith(b"\x00" * 6) and blocks[1][:2] == b"\x01\x00"
