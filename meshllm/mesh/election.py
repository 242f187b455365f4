"""Leader election: Raft's, with pre-vote and check-quorum, and a roster as the one thing the
leader commits. The rules, and what they cost, are written in :mod:`meshllm.mesh.node`."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import trio

from meshllm.config import MeshSection
from meshllm.mesh.ctlmsg import CANDIDATE, FOLLOWER, LEADER, encode_message
from meshllm.mesh.members import Members
from meshllm.mesh.roster import NO_VERSION, Roster, Version
from meshllm.mesh.stats import ElectionStats

Send = Callable[[str, bytes], None]  # start sending a control message to one peer


class Election:
    def __init__(
        self,
        me: str,
        config: MeshSection,
        members: Members,
        stats: ElectionStats,
        rng: random.Random,
        log: Any,
        send: Send,
        announce: Callable[[], None],
    ):
        self.me = me
        self.config = config
        self.members = members
        self.stats = stats
        self.rng = rng
        self.log = log
        self._send = send
        self._announce = announce
        self.term = 0
        self.role = FOLLOWER
        self.leader: str | None = None
        self.voted_for: str | None = None
        self._votes: set[str] = set()
        # The voting members as the leader last committed them; None until a leader is heard
        # (a fresh start), when the peers heard lately vote instead.
        self.roster: Roster | None = None
        self._election_roster = Roster(frozenset())
        self._prevotes: set[str] | None = None  # granted so far, while a pre-vote runs
        self.leaving = False
        self._last_known_leader: str | None = None
        self._last_leader_contact = -math.inf
        self._deadline = math.inf
        self._leader_noted: str | None = None
        self._leader_changed = trio.Event()

    # -- who leads ------------------------------------------------------------------------------
    def current_leader(self) -> str | None:
        """The leader this peer recognises now (None during an election)."""
        if self.role == LEADER:
            return self.me
        if self.leader is not None and self.members.alive(self.leader):
            return self.leader
        return None

    @property
    def leader_changed(self) -> trio.Event:
        """Set when :meth:`current_leader` next changes (take it, then check the leader)."""
        return self._leader_changed

    def note_leader(self) -> None:
        leader = self.current_leader()
        if leader != self._leader_noted:
            self._leader_noted = leader
            if leader is not None and leader != self._last_known_leader:
                self.stats.leader_changes += 1  # the first leader it recognises counts too
                self._last_known_leader = leader
            self._leader_changed.set()
            self._leader_changed = trio.Event()

    def adopt_term(self, term: int) -> None:
        if self.role != FOLLOWER:
            self.log.info("stepped_down", term=term, was=self.role)
            if self.role == LEADER:
                self.stats.stepdowns += 1
        self._prevotes = None
        self.term = term
        self.role = FOLLOWER
        self.voted_for = None
        self.leader = None

    def on_heartbeat(self, sender: str, hb: dict[str, Any]) -> None:
        """What a heartbeat says about leadership (its term is adopted already)."""
        if self.leader == sender and (hb["role"] != LEADER or hb["term"] != self.term):
            self.leader = None  # it stepped down (it lost its quorum, say): no leader here now
        if hb["role"] != LEADER or hb["term"] != self.term:
            return
        if self.role == LEADER:
            # Two leaders of one term can only meet after a partition heals.
            if sender < self.me:
                self.log.info("stepped_down", term=self.term, to=sender)
                self.role, self.leader = FOLLOWER, sender
                self.stats.stepdowns += 1
        else:
            if self.leader != sender:
                self.log.info("leader_recognised", leader=sender, term=self.term)
            self.role, self.leader = FOLLOWER, sender
            self._last_leader_contact = self.members.now()
            self._prevotes = None
            self.reset_deadline()
        if self.leader == sender and hb["roster"] is not None:
            self._adopt_roster(hb["roster"])

    # -- votes ----------------------------------------------------------------------------------
    def reset_deadline(self) -> None:
        c = self.config
        timeout = self.rng.uniform(c.election_timeout_min_s, c.election_timeout_max_s)
        self._deadline = self.members.now() + timeout

    def _leader_recently_heard(self) -> bool:
        """Whether this peer still has a leader: heard within the election timeout, or
        still alive in its view (connected, and not silent for ``unresponsive_after_s``)."""
        if self.members.now() - self._last_leader_contact < self.config.election_timeout_min_s:
            return True
        return self.role != LEADER and self.current_leader() is not None

    def roster_version(self) -> Version:
        return self.roster.version if self.roster is not None else NO_VERSION

    def _voters(self) -> Roster:
        if self.roster is not None:
            return self.roster
        # Never heard a leader (a fresh start): the peers heard lately vote, so a new mesh,
        # or a lone peer, elects its first leader.
        return Roster(frozenset([self.me, *self.members.alive_peers()]))

    def _adopt_roster(self, roster: Roster) -> None:
        # Only from the leader this peer follows; an equal version too, since two leaders of
        # one term (a healed partition) may each have committed one.
        if self.roster is None or roster.version >= self.roster.version:
            self.roster = roster

    def _can_grant(self, term: int, version: Version) -> bool:
        """Whether a (pre-)vote for a candidate of *term* with a roster of *version* may be
        granted (besides one vote per term)."""
        if self.role == LEADER or self._leader_recently_heard():
            # Stickiness: a working leader is not deposed by a peer that merely lost touch.
            return False
        # A candidate that missed a roster change would count its quorum against the past.
        return version >= self.roster_version()

    def on_prevote_request(self, sender: str, term: int, version: Version) -> None:
        self.members.record(sender).last_seen = self.members.now()
        granted = term > self.term and self._can_grant(term, version)
        self._send(sender, encode_message("pvres", term if granted else self.term, granted=granted))

    def on_prevote(self, sender: str, term: int, granted: bool) -> None:
        if not granted:
            if term > self.term:
                self.adopt_term(term)
            return
        if self._prevotes is None or self.role != FOLLOWER or term != self.term + 1:
            return  # a stale answer, to a round that is over
        self._prevotes.add(sender)
        if self._voters().is_quorum(self._prevotes):
            self._start_election()

    def on_vote_request(self, sender: str, term: int, version: Version) -> None:
        self.members.record(sender).last_seen = self.members.now()
        granted = False
        if self.role != LEADER and not self._leader_recently_heard():
            # A working leader is sticky: it is replaced only once the others lost it too,
            # and steps down when it hears the new leader's higher term.
            if term > self.term:
                self.adopt_term(term)
            granted = (
                term == self.term
                and self.voted_for in (None, sender)
                and self._can_grant(term, version)
            )
            if granted:
                self.voted_for = sender
                self.reset_deadline()
        self._send(sender, encode_message("vres", self.term, granted=granted))

    def on_vote(self, sender: str, term: int, granted: bool) -> None:
        if self.role != CANDIDATE or term != self.term or not granted:
            return
        self._votes.add(sender)
        if self._election_roster.is_quorum(self._votes):
            self._become_leader()

    def _start_prevote(self) -> None:
        """Ask the roster whether an election could be won before starting one: a peer that
        only lost touch (starved, cut off) learns that it cannot win, without raising its
        term, so it does not depose a working leader when it hears the others again."""
        voters = self._voters()
        self.reset_deadline()
        self.role = FOLLOWER  # a candidate whose election ran out (a split vote) asks again
        self._prevotes = {self.me}
        self.stats.prevotes += 1
        if voters.is_quorum(self._prevotes):
            self._start_election()
            return
        self.log.debug("prevote_started", term=self.term + 1, voters=len(voters.members))
        payload = encode_message("pvreq", self.term + 1, rv=list(self.roster_version()))
        for pid in sorted(voters.members - {self.me}):
            self._send(pid, payload)

    def _start_election(self) -> None:
        self._prevotes = None
        self.term += 1
        self.role = CANDIDATE
        self.leader = None
        self.voted_for = self.me
        self._votes = {self.me}
        voters = self._election_roster = self._voters()
        self.stats.elections += 1
        self.log.info("election_started", term=self.term, voters=len(voters.members))
        self.reset_deadline()
        self.note_leader()
        if voters.is_quorum(self._votes):
            self._become_leader()
            return
        payload = encode_message("vreq", self.term, rv=list(self.roster_version()))
        for pid in sorted(voters.members - {self.me}):
            self._send(pid, payload)

    def _become_leader(self) -> None:
        self.role = LEADER
        self.leader = self.me
        base = self.roster or self._election_roster
        self.roster = base.changed(base.members, self.term)
        self.stats.won += 1
        self.log.info("leader_elected", term=self.term, votes=len(self._votes))
        self.note_leader()
        self._announce()  # at once

    # -- the roster -----------------------------------------------------------------------------
    def keep_roster(self) -> None:
        """Leader, every heartbeat: step down unless the peers heard lately are a quorum of
        the roster (check-quorum); while they are, commit them as the roster, so members that
        died leave it and members that joined enter it."""
        if self.role != LEADER or self.roster is None:
            return
        heard = frozenset([self.me, *self.members.alive_peers()])
        if not self.roster.is_quorum(heard):
            self.log.warning(
                "stepped_down",
                term=self.term,
                reason="lost quorum",
                heard=len(heard),
                roster=len(self.roster.members),
            )
            self.role, self.leader = FOLLOWER, None
            self.stats.stepdowns += 1
            self.reset_deadline()
            self.note_leader()
            return
        if heard != self.roster.members:
            self._commit_roster(heard)

    def _commit_roster(self, members: frozenset[str]) -> None:
        assert self.roster is not None
        old = self.roster.members
        self.roster = self.roster.changed(members, self.term)
        self.stats.roster_changes += 1
        self.log.info(
            "roster_changed",
            version=list(self.roster.version),
            size=len(members),
            added=sorted(members - old),
            removed=sorted(old - members),
        )
        self._announce()

    def on_bye(self, sender: str, roster: Roster | None) -> None:
        rec = self.members.peers.get(sender)
        if rec is None:
            return
        rec.left_at = self.members.now()
        self.log.info("peer_left", other=sender, name=rec.name)
        if sender == self.leader and self.role != LEADER:
            # The leader stopping hands over the roster without itself: the others elect a
            # successor among themselves (one alone leads itself).
            if roster is not None and sender not in roster.members:
                self._adopt_roster(roster)
            self.leader = None
            self._last_leader_contact = -math.inf
        elif self.role == LEADER and self.roster is not None and sender in self.roster.members:
            # It said so itself: no quorum is needed to believe it is gone.
            self._commit_roster(self.roster.members - {sender})

    def leave(self) -> dict[str, Any]:
        """Stop taking part; the goodbye's fields (a leader's roster without itself)."""
        self.leaving = True
        fields: dict[str, Any] = {}
        if self.role == LEADER and self.roster is not None and len(self.roster.members) > 1:
            fields["roster"] = self.roster.changed(
                self.roster.members - {self.me}, self.term
            ).to_wire()
        self.role, self.leader = FOLLOWER, None
        return fields

    # -- the timer ------------------------------------------------------------------------------
    async def run(self) -> None:
        self.reset_deadline()
        while True:
            await trio.sleep_until(self._deadline)
            if self.members.now() < self._deadline:
                continue  # the deadline moved while we slept
            if self.leaving:
                return
            if self.role == LEADER:
                self._deadline = math.inf
                while self.role == LEADER:
                    await trio.sleep(self.config.heartbeat_interval_s)
                self.reset_deadline()
            elif self._leader_recently_heard():
                self.reset_deadline()  # late, not gone: wait for it a while yet
            else:
                self._start_prevote()
