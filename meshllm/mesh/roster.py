"""Who votes in an election: the roster a leader commits, and what a quorum of it is.

A peer's alive view is what it heard lately, so it shrinks to the peer alone when the peer
stops hearing others: because its CPU is saturated, because its Wi-Fi dropped, or because
the others really left. Quorums counted against that view let a starved phone elect itself.
The roster is the set of voting members as the leader last committed it; it changes only
through a leader that holds a quorum of it (see :mod:`meshllm.mesh.node` for the rules).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshllm import wire

MAX_ROSTER = 256
# (term of the leader that committed it, change number within that term): rosters compare
# by version, as Raft's logs compare by (term, index).
Version = tuple[int, int]
NO_VERSION: Version = (0, 0)


@dataclass(frozen=True)
class Roster:
    members: frozenset[str]
    version: Version = NO_VERSION

    def is_quorum(self, ids: Iterable[str]) -> bool:
        """Whether *ids* hold a strict majority of the members, or exactly half of them with
        the lowest peer id among them. The tie-break makes any two quorums of one roster
        overlap, so a roster of two (or a four-peer mesh cut in halves) has one side that
        can lead, not two."""
        have = self.members.intersection(ids)
        n = len(self.members)
        return 2 * len(have) > n or (2 * len(have) == n and n > 0 and min(self.members) in have)

    def changed(self, members: Iterable[str], term: int) -> Roster:
        """The next roster, committed by the leader of *term*."""
        seq = self.version[1] + 1 if self.version[0] == term else 0
        return Roster(frozenset(members), (term, seq))

    def to_wire(self) -> dict[str, Any]:
        return {"m": sorted(self.members), "v": list(self.version)}

    @classmethod
    def from_wire(cls, obj: Any, what: str = "roster") -> Roster:
        """Raises :class:`meshllm.wire.BadMessage`."""
        m = wire.mapping(obj, what)
        members = wire.seq_of(m.get("m"), f"{what} members", MAX_ROSTER, wire.peer_id)
        if not members:
            raise wire.BadMessage(f"{what} has no members")
        v = wire.seq(m.get("v"), f"{what} version", 2)
        if len(v) != 2:
            raise wire.BadMessage(f"{what} version must be [term, change]")
        version = (wire.integer(v[0], f"{what} term"), wire.integer(v[1], f"{what} change"))
        return cls(frozenset(members), version)

    def describe(self) -> dict[str, Any]:
        return {"members": sorted(self.members), "version": list(self.version)}
