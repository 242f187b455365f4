"""The roster's quorum rule (with its tie-break) and its strict decoding."""

from __future__ import annotations

import itertools

import pytest

from meshllm.mesh.roster import Roster
from meshllm.wire import BadMessage

IDS = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("n", range(1, 6))
def test_any_two_quorums_of_one_roster_overlap(n):
    """What makes one leader per roster: two disjoint sets cannot both be quorums."""
    roster = Roster(frozenset(IDS[:n]))
    subsets = [set(c) for k in range(n + 1) for c in itertools.combinations(IDS[:n], k)]
    quorums = [s for s in subsets if roster.is_quorum(s)]
    assert quorums  # the whole roster always is one
    for x, y in itertools.combinations(quorums, 2):
        assert x & y, (x, y)
    # Every set is a quorum or leaves one to its complement: a cut mesh keeps one leader side.
    for s in subsets:
        assert roster.is_quorum(s) or roster.is_quorum(set(IDS[:n]) - s)


def test_the_tie_break_is_the_lowest_id():
    two = Roster(frozenset({"a", "b"}))
    assert two.is_quorum({"a"}) and not two.is_quorum({"b"})
    four = Roster(frozenset({"a", "b", "c", "d"}))
    assert four.is_quorum({"a", "d"}) and not four.is_quorum({"b", "c"})
    assert not four.is_quorum({"a"}) and four.is_quorum({"b", "c", "d"})
    # Strangers do not count.
    assert not four.is_quorum({"a", "x", "y"})


def test_versions_grow_within_and_across_terms():
    r = Roster(frozenset({"a"}))
    r1 = r.changed({"a", "b"}, term=3)
    r2 = r1.changed({"a"}, term=3)
    r3 = r2.changed({"a", "c"}, term=4)
    assert r.version < r1.version < r2.version < r3.version
    assert (r1.version, r2.version, r3.version) == ((3, 0), (3, 1), (4, 0))
    assert Roster.from_wire(r3.to_wire()) == r3


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {},
        {"m": [], "v": [1, 0]},
        {"m": ["a"], "v": [1]},
        {"m": ["a"], "v": [1, -1]},
        {"m": ["a"], "v": [True, 0]},
        {"m": ["../x"], "v": [1, 0]},
        {"m": [1], "v": [1, 0]},
        {"m": ["a"] * 257, "v": [1, 0]},
        {"m": "ab", "v": [1, 0]},
        {"m": ["a"], "v": [2**62, 0]},
    ],
)
def test_bad_rosters_are_refused(obj):
    with pytest.raises(BadMessage):
        Roster.from_wire(obj)
