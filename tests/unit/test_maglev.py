"""Property tests of the Maglev table (bpflb.model.maglev): every entry filled, an even spread, the same table
whatever the input order, near-minimal disruption when a backend leaves or joins, the C fill loop equal to
the plain-Python reference, and the hashes pinned (nodes running different agent versions must agree)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from ipaddress import IPv4Address

import pytest

from bpflb.model import maglev

M = maglev.DEFAULT_TABLE_SIZE


def names(n: int, prefix: str = "echo") -> list[str]:
    rng = random.Random(n)
    return [f"{prefix}-{rng.getrandbits(40):010x}" for _ in range(n)]


def moved(before: list[str], after: list[str]) -> float:
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


def test_the_native_fill_loop_is_loaded() -> None:
    assert maglev.native_available(), "run `make` to build bpf_objects/build/libbpflb_maglev.so"


@pytest.mark.parametrize(("n", "m"), [(1, 251), (2, 251), (3, 1021), (10, 1021), (100, M), (163, M),
                                      (1000, M), (1000, 131071)])
def test_every_entry_is_filled_and_every_backend_gets_its_share(n: int, m: int) -> None:
    table = maglev.build_table(names(n), m, seed=1)
    assert len(table) == m and "" not in table
    counts = Counter(table)
    assert set(counts) == set(names(n))
    # Turns make the counts differ by one at most: within 1% of even whenever m >= 100 * n.
    assert max(counts.values()) - min(counts.values()) <= 1
    if m >= 100 * n:
        even = m / n
        assert all(abs(c - even) <= 0.01 * even for c in counts.values()), counts.most_common(3)


@pytest.mark.parametrize("n", [2, 7, 100])
def test_the_same_backends_in_any_order_give_the_same_table(n: int) -> None:
    base = names(n)
    expected = maglev.build_table(base, M, seed=5)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = base[:]
        rng.shuffle(shuffled)
        assert maglev.build_table(shuffled, M, seed=5) == expected


# The default size and larger ones, up to N = M / 100. (At the small primes, 1021..4093, the classic
# algorithm moves up to ~3% more than 1/N at M = 100 * N; see the README's Maglev section.)
DISRUPTION_CASES = [(3, M), (10, M), (50, 8191), (100, M), (163, M), (327, 32749), (655, 65521)]


@pytest.mark.parametrize(("n", "m"), DISRUPTION_CASES)
def test_removing_one_backend_moves_at_most_one_nth_plus_two_percent(n: int, m: int) -> None:
    assert m >= 100 * n
    base = names(n)
    before = maglev.build_table(base, m, seed=3)
    rng = random.Random(n)
    for gone in {base[0], min(base), max(base), base[n // 2], rng.choice(base)}:
        after = maglev.build_table([x for x in base if x != gone], m, seed=3)
        share = moved(before, after)
        assert share >= before.count(gone) / m             # at least the removed backend's own entries
        assert share <= 1 / n + 0.02, (gone, share)


@pytest.mark.parametrize(("n", "m"), [(n - 1, m) for n, m in DISRUPTION_CASES])
def test_adding_one_backend_moves_at_most_one_nth_plus_two_percent(n: int, m: int) -> None:
    assert m >= 100 * (n + 1)
    base = names(n)
    before = maglev.build_table(base, m, seed=3)
    for newcomer in ("aaaa-first", "mmmm-middle", "zzzz-last"):
        after = maglev.build_table(base + [newcomer], m, seed=3)
        share = moved(before, after)
        assert after.count(newcomer) / m <= share <= 1 / (n + 1) + 0.02, (newcomer, share)


def test_near_minimal_at_the_reference_point() -> None:
    """M=16381, N=100: about 1.4% more than 1/N of the entries move when one backend leaves."""
    base = names(100)
    before = maglev.build_table(base, M, seed=0)
    extra = [moved(before, maglev.build_table(base[:i] + base[i + 1:], M, seed=0)) - 0.01 for i in range(0, 100, 10)]
    assert 0 <= sum(extra) / len(extra) <= 0.02, extra


@pytest.mark.parametrize(("n", "m"), [(1, 251), (5, 251), (37, 4093), (100, M), (300, 32749)])
def test_the_c_fill_loop_equals_the_python_reference(n: int, m: int) -> None:
    base = names(n)
    assert maglev.build_slots(base, m, 9, native=True) == maglev.build_slots(base, m, 9, native=False)


def test_seed_and_size_change_the_table_but_nodes_agree() -> None:
    base = names(20)
    assert maglev.build_table(base, M, seed=1) != maglev.build_table(base, M, seed=2)
    assert maglev.build_table(base, M, seed=1) == maglev.build_table(list(base), M, seed=1)
    assert len(maglev.build_table(base, 4093, seed=1)) == 4093


def test_slots_are_positions_in_the_given_list() -> None:
    given = ["b", "c", "a"]
    slots = maglev.build_slots(given, 251, 0)
    assert set(slots) == {1, 2, 3}
    assert [given[s - 1] for s in slots] == maglev.build_table(["a", "b", "c"], 251, 0)


def test_pinned_values_keep_every_agent_version_compatible() -> None:
    """Changing any of these breaks the promise that nodes running different bpflb versions pick the same
    backend (a rolling upgrade); the BPF tests check the datapath computes the same packet hash."""
    assert maglev.permutation("echo-a", M, 0) == (16357, 8368)
    assert maglev.jhash_3words(1, 2, 3, 0) == 0xA46158F5
    assert maglev.packet_hash(IPv4Address("198.18.0.100"), 40000, 30080, 6, 0) == 0x59149412
    digest = hashlib.sha256(maglev.build_slots(["echo-a", "echo-b", "echo-c"], 251, 0).tobytes()).hexdigest()
    assert digest == "486218cd248e70ad74b675e9b249cd483cd043f2fea2f133c5c116a65bc47106"


@pytest.mark.parametrize(("args", "message"), [
    ((["a"], 100, 0), "table size must be one of 251, 509"),
    ((["a"], 251, -1), "seed must be an integer in 0..4294967295; got -1"),
    (([], 251, 0), "no backends"),
    ((["a", "b", "a"], 251, 0), "backend names must be unique; repeated: a"),
])
def test_bad_arguments_are_refused_with_the_reason(args: tuple[list[str], int, int], message: str) -> None:
    with pytest.raises(maglev.MaglevError, match=message.replace(".", r"\.")):
        maglev.build_slots(*args)
