"""Membership and leader election for one peer.

Algorithm: Raft's leader election with pre-vote and check-quorum, without a replicated log;
the one thing the leader commits is the *roster*, the set of voting members.

* Every peer keeps a *term*. Every ``heartbeat_interval_s`` each peer sends a small heartbeat to
  every peer it is connected to: its term, role, the leader it follows, its name and addresses
  and the members it knows (id -> addresses); the leader's also carries the roster. Heartbeats
  are re-sent constantly, so losing one costs nothing, and members spread: a peer that joined
  through one member learns all others from that member's heartbeats and dials them.
* In a peer's *view*, a member is alive if it was heard from within ``dead_after_s``, or, while
  its connection is still open, within its *patience*: ``unresponsive_after_s``, or twice the
  longest silence the member has already come back from, whichever is longer, but at most
  three times ``unresponsive_after_s``. A busy phone's heartbeats come seconds late, and one
  that was late before will be again; a crashed or stopped peer's connection closes at once.
* Quorum: a set of peers is a quorum of a roster if it holds a strict majority of it, or exactly
  half of it including the roster's lowest peer id (the tie-break). Any two quorums of one
  roster share a peer, so one roster cannot elect two leaders.
* The roster: each follower keeps the newest roster its leader sent (rosters are versioned by
  the committing leader's term and a change number). Every heartbeat interval the leader checks
  that the peers it hears are a quorum of the roster (check-quorum): if not, it steps down; if
  so, it commits exactly those peers as the next roster, so a peer that died leaves it once it
  is dead in the leader's view and a new one enters it as soon as it is heard. A peer that stops
  gracefully says goodbye: it leaves the roster at once, and a leader that stops hands its
  followers the roster without itself. A peer that has never heard a leader (a fresh start)
  counts its alive view instead of a roster, so a new mesh, or a lone peer, elects its first
  leader.
* Pre-vote: a peer that has heard from no leader of its term for a randomised election timeout
  (uniform in ``[election_timeout_min_s, election_timeout_max_s]``, drawn afresh each time), and
  whose leader is dead in its view, first asks the roster whether it could win, without changing
  its term. A peer grants a pre-vote (or a vote) only if it is not the leader, has not heard
  from a live leader within ``election_timeout_min_s`` and no longer counts it alive (it lost
  the leader too), and the candidate's roster is not older than its own.
* With pre-votes from a quorum of its roster (itself included) the peer becomes a candidate: it
  increments its term, votes for itself and asks the roster for votes. A peer grants at most one
  vote per term. A candidate with votes from a quorum of its roster becomes leader of that term
  and heartbeats as leader at once. Any message carrying a higher term makes the receiver adopt
  that term and step down to follower.

Safety: a peer votes once per term and quorums of one roster overlap, so at most one leader per
term. A new leader follows a crashed one about ``dead_after_s`` plus one election timeout
after it died (2 to 3 s with the defaults); one that froze with its connections open is
replaced after ``unresponsive_after_s``.

Starved and cut-off peers: a phone whose CPU is saturated, or whose link is cut, stops hearing
the others and sees them all dead, but its pre-votes are refused (the others hear their leader),
so it neither raises its term nor elects itself; when it hears the leader again it follows it.
A leader cut off from its quorum steps down once the quorum is dead in its view.

Split brain: in a partition only a side holding a quorum of the roster elects (or keeps) a
leader; the other side has none and does not serve until the partition heals, when it follows
the leader of the higher term. Two halves of an even roster: the half with the lowest id leads.
Between the cut and the old leader's check-quorum the old leader may still
think it leads while the quorum side elects a newer one; the higher term wins when they meet.

What the rule costs: the mesh needs a quorum of its last roster to elect. Peers that die one
after another shrink the roster one at a time (down to a lone survivor, which leads itself),
but if a majority dies at once, or in a roster of two the peer with the lower id crashes, the
survivors wait (a crash cannot be told from a cut link). Restarting a survivor's daemon starts
it afresh, leading the peers it can hear. A graceful stop never costs this.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from meshllm.config import MeshSection
from meshllm.mesh.contain import contain_sync
from meshllm.mesh.ctlmsg import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    MAX_MEMBERS,
    decode_message,
    encode_message,
)
from meshllm.mesh.roster import NO_VERSION, Roster, Version
from meshllm.mesh.transport import AdmissionRefused, Endpoint, Message, PeerUnreachable
from meshllm.wire import BadMessage

FORGET_AFTER_MIN_S = 60.0

log = structlog.get_logger("meshllm.mesh")


@dataclass
class PeerRecord:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    name: str = ""
    role: str = FOLLOWER
    term: int = 0
    leader: str | None = None
    last_seen: float | None = None
    extra: Any = None  # what the peer last published on its heartbeats (see decode_extra)
    next_dial: float = 0.0
    dial_backoff: float = 0.5
    refused: str | None = None
    learned_at: float = 0.0  # when this record was made (see MeshNode._forget_stale)
    state_refused: str | None = None  # why its published state did not decode, if it did not
    left_at: float | None = None  # when it said goodbye (a stopping daemon), if it did
    gap_max_s: float = 0.0  # its longest silence between two heartbeats (under a minute)


@dataclass
class ElectionStats:
    """Counters for ``status``: on a healthy mesh they stay still once it has formed."""

    prevotes: int = 0  # pre-vote rounds this peer started (it had lost its leader)
    elections: int = 0  # terms this peer started, having won a pre-vote
    won: int = 0  # times it became leader
    stepdowns: int = 0  # times it stopped being leader
    leader_changes: int = 0  # times the leader it recognises became a different peer
    roster_changes: int = 0  # rosters it committed as leader
    # How late this peer's event loop ran: its heartbeat timer's worst lateness, and the
    # longest silence between two heartbeats of one peer (its or ours to blame) under a
    # minute, with how many of those silences outlasted dead_after_s.
    hb_late_max_s: float = 0.0
    hb_gap_max_s: float = 0.0
    hb_gaps_over_dead: int = 0
    # The slowest heartbeat send (its write to one peer's stream, until it was handed to the
    # transport or given up), to tell a silence the sender caused from one on the way.
    hb_send_max_s: float = 0.0
    hb_sends_slow: int = 0  # sends that took longer than one heartbeat interval


class MeshNode:
    """One peer's membership view and election state, driving an :class:`Endpoint`."""

    def __init__(
        self,
        endpoint: Endpoint,
        config: MeshSection,
        *,
        name: str = "",
        rng: random.Random | None = None,
        on_members_changed: Callable[[dict[str, list[str]]], None] | None = None,
    ):
        # Set by the layer above (serving): small state riding on every heartbeat, a hook for
        # heartbeats received, and one for application messages.
        self.extra_provider: Callable[[], dict[str, Any]] | None = None
        self.on_peer_extra: Callable[[str, dict[str, Any]], None] | None = None
        self.on_app_message: Callable[[str, dict[str, Any]], None] | None = None
        # Turns a heartbeat's published state into its typed value (raises BadMessage).
        self.decode_extra: Callable[[Any], Any] | None = None
        self.endpoint = endpoint
        self.config = config
        self.name = name
        self.rng = rng or random.Random()
        self.on_members_changed = on_members_changed
        self.peers: dict[str, PeerRecord] = {}
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
        self._leaving = False
        self._last_known_leader: str | None = None
        self.stats = ElectionStats()
        self._last_leader_contact = -math.inf
        self._election_deadline = math.inf
        self._wake = trio.Event()
        self._leader_noted: str | None = None
        self._leader_changed = trio.Event()
        self.started_at = 0.0
        self._nursery: trio.Nursery | None = None
        self.log = log.bind(peer=endpoint.peer_id)

    @property
    def peer_id(self) -> str:
        return self.endpoint.peer_id

    # -- views ------------------------------------------------------------------------------
    def now(self) -> float:
        return trio.current_time()

    def is_alive(self, rec: PeerRecord) -> bool:
        if rec.left_at is not None or rec.last_seen is None:
            return False
        silent = self.now() - rec.last_seen
        if silent <= self.config.dead_after_s:
            return True
        # Silence alone is weak evidence on a busy phone (its heartbeats come seconds late
        # while it profiles or loads on a quarter of a core); a crashed or stopped peer's
        # connection closes at once. So a peer still connected gets longer.
        return silent <= self.patience(rec) and self.endpoint.is_connected(rec.peer_id)

    def patience(self, rec: PeerRecord) -> float:
        """How long a connected peer may stay silent before it is dead in this view."""
        # Scaled by what the peer has shown: one that already went quiet for seconds and came
        # back (a phone that profiles or loads on a quarter of a core) will do it again, so it
        # gets twice its longest silence, up to three times the configured patience.
        base = self.config.unresponsive_after_s
        return min(3 * base, max(base, 2 * rec.gap_max_s))

    def peer_alive(self, peer_id: str) -> bool:
        """Whether *peer_id* is this peer or one heard from recently enough."""
        if peer_id == self.peer_id:
            return True
        rec = self.peers.get(peer_id)
        return rec is not None and self.is_alive(rec)

    def alive_peers(self) -> list[str]:
        return sorted(p for p, r in self.peers.items() if self.is_alive(r))

    def state_of(self, peer: str | None) -> Any:
        """What *peer* last published on its heartbeats, as ``decode_extra`` made it (None if
        nothing yet)."""
        rec = self.peers.get(peer) if peer else None
        return rec.extra if rec is not None else None

    @property
    def leader_changed(self) -> trio.Event:
        """Set when :meth:`current_leader` next changes (take it, then check the leader)."""
        return self._leader_changed

    def _note_leader(self) -> None:
        leader = self.current_leader()
        if leader != self._leader_noted:
            self._leader_noted = leader
            if leader is not None and leader != self._last_known_leader:
                self.stats.leader_changes += 1  # the first leader it recognises counts too
                self._last_known_leader = leader
            self._leader_changed.set()
            self._leader_changed = trio.Event()

    def current_leader(self) -> str | None:
        """The leader this peer recognises now (None during an election)."""
        if self.role == LEADER:
            return self.peer_id
        if self.leader is not None:
            rec = self.peers.get(self.leader)
            if rec is not None and self.is_alive(rec):
                return self.leader
        return None

    def status(self) -> dict[str, Any]:
        now = self.now()
        peers = []
        for pid in sorted(self.peers):
            r = self.peers[pid]
            alive = self.is_alive(r)
            peers.append({
                "id": pid,
                "name": r.name,
                "role": (LEADER if pid == self.current_leader() else r.role) if alive else "dead",
                "alive": alive,
                "last_seen_s": None if r.last_seen is None else round(now - r.last_seen, 3),
                "term": r.term,
                "addrs": list(r.addrs),
                "connected": self.endpoint.is_connected(pid),
                "gap_max_s": r.gap_max_s,
                **({"refused": r.refused} if r.refused else {}),
            })  # fmt: skip
        return {
            "self": {
                "id": self.peer_id,
                "name": self.name,
                "role": self.role,
                "addrs": self.endpoint.listen_addrs(),
                "uptime_s": round(now - self.started_at, 3),
            },
            "term": self.term,
            "leader": self.current_leader(),
            "members": sorted([self.peer_id, *self.alive_peers()]),
            "peers": peers,
            "election": {
                **dataclasses.asdict(self.stats),
                "roster": self.roster.describe() if self.roster is not None else None,
            },
        }

    # -- running ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at = self.now()
        self._reset_election_deadline()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._election_loop)
            task_status.started()

    async def add_peer(self, addr: str) -> str:
        """Dial *addr* now (admission included) and remember the member; returns its id."""
        peer_id = await self.endpoint.dial(addr)
        rec = self._record(peer_id)
        if addr not in rec.addrs:
            rec.addrs.insert(0, addr)
        rec.refused = None
        await self._send_heartbeat(peer_id)
        self._members_changed()
        return peer_id

    def _record(self, peer_id: str) -> PeerRecord:
        rec = self.peers.get(peer_id)
        if rec is None:
            rec = self.peers[peer_id] = PeerRecord(peer_id, learned_at=self.now())
            self.log.info("peer_discovered", other=peer_id)
        return rec

    @property
    def forget_after_s(self) -> float:
        """How long a member named by others but never heard from is kept (and redialled)."""
        return max(FORGET_AFTER_MIN_S, 40 * self.config.dead_after_s)

    def _forget_stale(self) -> None:
        """Drop members that a heartbeat named but that never answered within
        :attr:`forget_after_s` (a peer can name any ids it likes). Members once heard from
        directly are kept and redialled however long they are away: a phone off the Wi-Fi
        for an hour still rejoins."""
        now = self.now()
        limit = self.forget_after_s
        stale = [
            pid for pid, rec in self.peers.items()
            if rec.last_seen is None and not self.endpoint.is_connected(pid)
            and now - rec.learned_at > limit
        ]  # fmt: skip
        for pid in stale:
            del self.peers[pid]
            self.log.info("peer_forgotten", other=pid)
        if stale:
            self._members_changed()

    def _members_changed(self) -> None:
        if self.on_members_changed is not None:
            # Only members heard from directly: ids that others merely named are not kept.
            self.on_members_changed({p: list(r.addrs) for p, r in self.peers.items()
                                     if r.addrs and r.last_seen is not None})  # fmt: skip

    async def _receive_loop(self) -> None:
        async for msg in self.endpoint.messages:
            # One message that fails (to decode, or in the layer above's callbacks) is
            # dropped and logged; the next one is handled as usual.
            contain_sync("control_message", msg.sender, self._handle, msg)

    def _handle(self, msg: Message) -> None:
        try:
            self._handle_message(msg)
        finally:
            self._note_leader()

    def _handle_message(self, msg: Message) -> None:
        body = decode_message(msg.payload)
        sender = msg.sender
        if sender == self.peer_id:
            raise BadMessage("message claims to come from ourselves")
        term = body["term"]
        kind = body["t"]
        if kind == "vreq":
            self._on_vote_request(sender, term, body["rv"])
            return
        if kind == "pvreq":  # asks; changes nothing here, the term included
            self._on_prevote_request(sender, term, body["rv"])
            return
        if kind == "pvres":  # a granted one carries the term asked about, not the sender's
            self._on_prevote(sender, term, body["granted"])
            return
        if term > self.term:
            self._adopt_term(term)
        if kind == "vres":
            self._on_vote(sender, term, body["granted"])
        elif kind == "app":
            if self.on_app_message is not None:
                self.on_app_message(sender, body["body"])
        elif kind == "bye":
            self._on_bye(sender, body["roster"])
        else:
            self._on_heartbeat(sender, body)

    def _adopt_term(self, term: int) -> None:
        if self.role != FOLLOWER:
            self.log.info("stepped_down", term=term, was=self.role)
            if self.role == LEADER:
                self.stats.stepdowns += 1
        self._prevotes = None
        self.term = term
        self.role = FOLLOWER
        self.voted_for = None
        self.leader = None

    def _on_heartbeat(self, sender: str, hb: dict[str, Any]) -> None:
        now = self.now()
        rec = self._record(sender)
        if rec.left_at is not None:
            if now - rec.left_at <= self.config.dead_after_s:
                return  # sent before its goodbye, overtaken on another stream
            rec.left_at = None  # it came back (restarted)
        was_alive = self.is_alive(rec)
        first = rec.last_seen is None
        if rec.last_seen is not None and now - rec.last_seen < 60:
            gap = now - rec.last_seen
            rec.gap_max_s = max(rec.gap_max_s, round(gap, 3))
            self.stats.hb_gap_max_s = max(self.stats.hb_gap_max_s, rec.gap_max_s)
            if gap > self.config.dead_after_s:
                self.stats.hb_gaps_over_dead += 1
                self.log.info("heartbeat_gap", other=sender, s=round(gap, 3))
        rec.last_seen = now
        rec.role, rec.term, rec.leader, rec.name = hb["role"], hb["term"], hb["leader"], hb["name"]
        changed = first
        if hb["addrs"] and hb["addrs"] != rec.addrs:
            rec.addrs, changed = hb["addrs"], True
        if not was_alive:
            self.log.info("peer_alive", other=sender, name=rec.name)
        if self.leader == sender and (hb["role"] != LEADER or hb["term"] != self.term):
            self.leader = None  # it stepped down (it lost its quorum, say): no leader here now
        if hb["role"] == LEADER and hb["term"] == self.term:
            if self.role == LEADER:
                # Two leaders of one term can only meet after a partition heals.
                if sender < self.peer_id:
                    self.log.info("stepped_down", term=self.term, to=sender)
                    self.role, self.leader = FOLLOWER, sender
                    self.stats.stepdowns += 1
            else:
                if self.leader != sender:
                    self.log.info("leader_recognised", leader=sender, term=self.term)
                self.role, self.leader = FOLLOWER, sender
                self._last_leader_contact = now
                self._prevotes = None
                self._reset_election_deadline()
            if self.leader == sender and hb["roster"] is not None:
                self._adopt_roster(hb["roster"])
        for pid, addrs in hb["members"].items():
            if pid == self.peer_id or not addrs:
                continue
            known = self.peers.get(pid)
            if known is None and len(self.peers) >= MAX_MEMBERS:
                continue  # full: members named by others wait until stale ones are forgotten
            if known is None or (addrs != known.addrs and not self.endpoint.is_connected(pid)):
                # New member, or one we cannot reach at the addresses we had (it restarted on
                # new ports): take the addresses a live member sees it at, and dial soon.
                rec2 = self._record(pid)
                rec2.addrs = addrs
                rec2.next_dial, rec2.dial_backoff = 0.0, 0.5
                changed = True
                self._wake.set()
        if changed:
            self._members_changed()
        # The published state is decoded on its own: a peer whose state this version cannot
        # read (a newer one, a buggy one) is still alive and still a member, only its state
        # is unknown here.
        try:
            rec.extra = self.decode_extra(hb["x"]) if self.decode_extra else hb["x"]
        except BadMessage as exc:
            rec.extra = None
            if rec.state_refused != str(exc):  # once per reason, not four times a second
                rec.state_refused = str(exc)
                self.log.warning("peer_state_refused", other=sender, reason=str(exc))
            return
        rec.state_refused = None
        if self.on_peer_extra is not None:
            self.on_peer_extra(sender, rec.extra)

    # -- election ---------------------------------------------------------------------------
    def _reset_election_deadline(self) -> None:
        c = self.config
        timeout = self.rng.uniform(c.election_timeout_min_s, c.election_timeout_max_s)
        self._election_deadline = self.now() + timeout

    def _leader_recently_heard(self) -> bool:
        """Whether this peer still has a leader: heard within the election timeout, or
        still alive in its view (connected, and not silent for ``unresponsive_after_s``)."""
        if self.now() - self._last_leader_contact < self.config.election_timeout_min_s:
            return True
        return self.role != LEADER and self.current_leader() is not None

    def _roster_version(self) -> Version:
        return self.roster.version if self.roster is not None else NO_VERSION

    def _voters(self) -> Roster:
        if self.roster is not None:
            return self.roster
        # Never heard a leader (a fresh start): the peers heard lately vote, so a new mesh,
        # or a lone peer, elects its first leader.
        return Roster(frozenset([self.peer_id, *self.alive_peers()]))

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
        return version >= self._roster_version()

    def _on_prevote_request(self, sender: str, term: int, version: Version) -> None:
        self._record(sender).last_seen = self.now()
        granted = term > self.term and self._can_grant(term, version)
        reply = encode_message("pvres", term if granted else self.term, granted=granted)
        self._spawn_send(sender, reply)

    def _on_prevote(self, sender: str, term: int, granted: bool) -> None:
        if not granted:
            if term > self.term:
                self._adopt_term(term)
            return
        if self._prevotes is None or self.role != FOLLOWER or term != self.term + 1:
            return  # a stale answer, to a round that is over
        self._prevotes.add(sender)
        if self._voters().is_quorum(self._prevotes):
            self._start_election()

    def _on_vote_request(self, sender: str, term: int, version: Version) -> None:
        self._record(sender).last_seen = self.now()
        granted = False
        if self.role != LEADER and not self._leader_recently_heard():
            # A working leader is sticky: it is replaced only once the others lost it too,
            # and steps down when it hears the new leader's higher term.
            if term > self.term:
                self._adopt_term(term)
            granted = (
                term == self.term
                and self.voted_for in (None, sender)
                and self._can_grant(term, version)
            )
            if granted:
                self.voted_for = sender
                self._reset_election_deadline()
        self._spawn_send(sender, encode_message("vres", self.term, granted=granted))

    def _on_vote(self, sender: str, term: int, granted: bool) -> None:
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
        self._reset_election_deadline()
        self.role = FOLLOWER  # a candidate whose election ran out (a split vote) asks again
        self._prevotes = {self.peer_id}
        self.stats.prevotes += 1
        if voters.is_quorum(self._prevotes):
            self._start_election()
            return
        self.log.debug("prevote_started", term=self.term + 1, voters=len(voters.members))
        payload = encode_message("pvreq", self.term + 1, rv=list(self._roster_version()))
        for pid in sorted(voters.members - {self.peer_id}):
            self._spawn_send(pid, payload)

    def _start_election(self) -> None:
        self._prevotes = None
        self.term += 1
        self.role = CANDIDATE
        self.leader = None
        self.voted_for = self.peer_id
        self._votes = {self.peer_id}
        voters = self._election_roster = self._voters()
        self.stats.elections += 1
        self.log.info("election_started", term=self.term, voters=len(voters.members))
        self._reset_election_deadline()
        self._note_leader()
        if voters.is_quorum(self._votes):
            self._become_leader()
            return
        payload = encode_message("vreq", self.term, rv=list(self._roster_version()))
        for pid in sorted(voters.members - {self.peer_id}):
            self._spawn_send(pid, payload)

    def _become_leader(self) -> None:
        self.role = LEADER
        self.leader = self.peer_id
        base = self.roster or self._election_roster
        self.roster = base.changed(base.members, self.term)
        self.stats.won += 1
        self.log.info("leader_elected", term=self.term, votes=len(self._votes))
        self._note_leader()
        self._wake.set()  # announce at once

    def _keep_roster(self) -> None:
        """Leader, every heartbeat: step down unless the peers heard lately are a quorum of
        the roster (check-quorum); while they are, commit them as the roster, so members that
        died leave it and members that joined enter it."""
        if self.role != LEADER or self.roster is None:
            return
        heard = frozenset([self.peer_id, *self.alive_peers()])
        if not self.roster.is_quorum(heard):
            self.log.warning("stepped_down", term=self.term, reason="lost quorum",
                             heard=len(heard), roster=len(self.roster.members))  # fmt: skip
            self.role, self.leader = FOLLOWER, None
            self.stats.stepdowns += 1
            self._reset_election_deadline()
            self._note_leader()
            return
        if heard != self.roster.members:
            self._commit_roster(heard)

    def _commit_roster(self, members: frozenset[str]) -> None:
        assert self.roster is not None
        old = self.roster.members
        self.roster = self.roster.changed(members, self.term)
        self.stats.roster_changes += 1
        self.log.info("roster_changed", version=list(self.roster.version), size=len(members),
                      added=sorted(members - old), removed=sorted(old - members))  # fmt: skip
        self._wake.set()

    def _on_bye(self, sender: str, roster: Roster | None) -> None:
        rec = self.peers.get(sender)
        if rec is None:
            return
        rec.left_at = self.now()
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

    async def leave(self) -> None:
        """Tell every connected peer this one is stopping (a daemon's graceful stop), so
        they drop it from the roster at once instead of after ``dead_after_s``; a leader
        hands the roster over without itself. Sends nothing more afterwards."""
        self._leaving = True
        fields: dict[str, Any] = {}
        if self.role == LEADER and self.roster is not None and len(self.roster.members) > 1:
            fields["roster"] = self.roster.changed(
                self.roster.members - {self.peer_id}, self.term
            ).to_wire()
        self.role, self.leader = FOLLOWER, None
        payload = encode_message("bye", self.term, **fields)
        async with trio.open_nursery() as nursery:
            for pid in list(self.peers):
                if self.endpoint.is_connected(pid):
                    nursery.start_soon(self._send_quietly, pid, payload)

    async def _election_loop(self) -> None:
        while True:
            await trio.sleep_until(self._election_deadline)
            if self.now() < self._election_deadline:
                continue  # the deadline moved while we slept
            if self._leaving:
                return
            if self.role == LEADER:
                self._election_deadline = math.inf
                await self._until_not_leader()
                self._reset_election_deadline()
            elif self._leader_recently_heard():
                self._reset_election_deadline()  # late, not gone: wait for it a while yet
            else:
                self._start_prevote()

    async def _until_not_leader(self) -> None:
        while self.role == LEADER:
            await trio.sleep(self.config.heartbeat_interval_s)

    # -- heartbeats and dialling --------------------------------------------------------------
    def _heartbeat(self) -> bytes:
        members = {p: r.addrs for p, r in self.peers.items() if r.addrs and self.is_alive(r)}
        extra = self.extra_provider() if self.extra_provider is not None else {}
        fields: dict[str, Any] = {}
        if self.role == LEADER and self.roster is not None:
            fields["roster"] = self.roster.to_wire()
        return encode_message(
            "hb", self.term, role=self.role, leader=self.current_leader(), name=self.name,
            addrs=self.endpoint.listen_addrs(), members=members, x=extra, **fields,
        )  # fmt: skip

    async def send_app(self, peer_id: str, body: dict[str, Any]) -> None:
        """Send an application message to one peer (raises PeerUnreachable)."""
        await self.endpoint.send(peer_id, encode_message("app", self.term, body=body))

    def announce(self) -> None:
        """Send heartbeats now (state changed) instead of at the next interval."""
        self._wake.set()

    async def _send_heartbeat(self, peer_id: str) -> None:
        with suppress(PeerUnreachable):
            await self.endpoint.send(peer_id, self._heartbeat())

    def _spawn_send(self, peer_id: str, payload: bytes) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, peer_id, payload)

    async def _send_quietly(self, peer_id: str, payload: bytes) -> None:
        # A slow peer must not hold up the others: each send has its own deadline.
        t0 = self.now()
        outcome = "sent"
        with trio.move_on_after(self.config.heartbeat_interval_s * 4) as scope:
            try:
                await self.endpoint.send(peer_id, payload)
            except PeerUnreachable:
                outcome = "unreachable"
        took = self.now() - t0
        if scope.cancelled_caught:
            outcome = "timed out"
        self.stats.hb_send_max_s = max(self.stats.hb_send_max_s, round(took, 3))
        if took > self.config.heartbeat_interval_s:
            self.stats.hb_sends_slow += 1
            self.log.info("heartbeat_send_slow", other=peer_id, s=round(took, 3), outcome=outcome)

    async def _heartbeat_loop(self) -> None:
        nursery = self._nursery
        assert nursery is not None
        while not self._leaving:
            self._forget_stale()
            self._keep_roster()
            self._note_leader()  # a leader that went quiet stops being one without a message
            payload = self._heartbeat()
            now = self.now()
            for pid, rec in list(self.peers.items()):
                if self.endpoint.is_connected(pid):
                    nursery.start_soon(self._send_quietly, pid, payload)
                elif rec.addrs and now >= rec.next_dial:
                    rec.next_dial = now + rec.dial_backoff
                    rec.dial_backoff = min(rec.dial_backoff * 2, 8.0)
                    nursery.start_soon(self._dial_known, rec)
            self._wake = trio.Event()
            due = self.now() + self.config.heartbeat_interval_s
            with trio.move_on_at(due):
                await self._wake.wait()
            late = self.now() - due
            if late > self.stats.hb_late_max_s:
                self.stats.hb_late_max_s = round(late, 3)

    async def _dial_known(self, rec: PeerRecord) -> None:
        for addr in list(rec.addrs):
            try:
                with trio.fail_after(self.config.handshake_timeout_s + 1):
                    peer_id = await self.endpoint.dial(addr)
            except AdmissionRefused as exc:
                rec.refused = str(exc)
                self.log.warning("admission_refused", addr=addr, reason=str(exc))
                return
            except (PeerUnreachable, trio.TooSlowError):
                continue
            except Exception as exc:  # a transport bug must not take the daemon down
                self.log.warning("dial_failed", addr=addr, reason=repr(exc))
                continue
            if peer_id != rec.peer_id:
                self.log.warning("peer_id_mismatch", addr=addr, expected=rec.peer_id, got=peer_id)
                continue
            rec.dial_backoff = 0.5
            rec.refused = None
            await self._send_heartbeat(peer_id)
            return
