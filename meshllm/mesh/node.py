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
import random
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import structlog
import trio

from meshllm.config import MeshSection
from meshllm.mesh.contain import contain_sync
from meshllm.mesh.ctlmsg import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    decode_message,
    encode_message,
)
from meshllm.mesh.election import Election
from meshllm.mesh.members import FORGET_AFTER_MIN_S, Members, PeerRecord
from meshllm.mesh.roster import Roster
from meshllm.mesh.stats import ElectionStats
from meshllm.mesh.transport import Endpoint, Message, PeerUnreachable
from meshllm.wire import BadMessage

__all__ = [
    "CANDIDATE",
    "FOLLOWER",
    "FORGET_AFTER_MIN_S",
    "LEADER",
    "ElectionStats",
    "MeshNode",
    "PeerRecord",
    "encode_message",
]

log = structlog.get_logger("meshllm.mesh")


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
        self.on_peer_extra: Callable[[str, Any], None] | None = None
        self.on_app_message: Callable[[str, dict[str, Any]], None] | None = None
        # Turns a heartbeat's published state into its typed value (raises BadMessage).
        self.decode_extra: Callable[[Any], Any] | None = None
        self.endpoint = endpoint
        self.config = config
        self.name = name
        self.log = log.bind(peer=endpoint.peer_id)
        self.stats = ElectionStats()
        self._wake = trio.Event()
        self.members = Members(
            endpoint, config, self.log, self.stats, self.announce, on_members_changed
        )
        self.election = Election(
            endpoint.peer_id,
            config,
            self.members,
            self.stats,
            rng or random.Random(),
            self.log,
            self._spawn_send,
            self.announce,
        )
        self.started_at = 0.0
        self._nursery: trio.Nursery | None = None

    @property
    def peer_id(self) -> str:
        return self.endpoint.peer_id

    # -- views ------------------------------------------------------------------------------
    @property
    def peers(self) -> dict[str, PeerRecord]:
        return self.members.peers

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def role(self) -> str:
        return self.election.role

    @property
    def roster(self) -> Roster | None:
        return self.election.roster

    @property
    def forget_after_s(self) -> float:
        """How long a member named by others but never heard from is kept (and redialled)."""
        return self.members.forget_after_s

    def now(self) -> float:
        return trio.current_time()

    def is_alive(self, rec: PeerRecord) -> bool:
        return self.members.is_alive(rec)

    def patience(self, rec: PeerRecord) -> float:
        """How long a connected peer may stay silent before it is dead in this view."""
        return self.members.patience(rec)

    def peer_alive(self, peer_id: str) -> bool:
        """Whether *peer_id* is this peer or one heard from recently enough."""
        return peer_id == self.peer_id or self.members.alive(peer_id)

    def alive_peers(self) -> list[str]:
        return self.members.alive_peers()

    def state_of(self, peer: str | None) -> Any:
        """What *peer* last published on its heartbeats, as ``decode_extra`` made it (None if
        nothing yet)."""
        rec = self.peers.get(peer) if peer else None
        return rec.extra if rec is not None else None

    @property
    def leader_changed(self) -> trio.Event:
        """Set when :meth:`current_leader` next changes (take it, then check the leader)."""
        return self.election.leader_changed

    def current_leader(self) -> str | None:
        """The leader this peer recognises now (None during an election)."""
        return self.election.current_leader()

    def status(self) -> dict[str, Any]:
        now = self.now()
        leader = self.current_leader()
        peers = [
            r.describe(
                now=now,
                alive=self.is_alive(r),
                leads=pid == leader,
                connected=self.endpoint.is_connected(pid),
            )
            for pid, r in sorted(self.peers.items())
        ]
        roster = self.roster
        return {
            "self": {
                "id": self.peer_id,
                "name": self.name,
                "role": self.role,
                "addrs": self.endpoint.listen_addrs(),
                "uptime_s": round(now - self.started_at, 3),
            },
            "term": self.term,
            "leader": leader,
            "members": sorted([self.peer_id, *self.alive_peers()]),
            "peers": peers,
            "election": {
                **dataclasses.asdict(self.stats),
                "roster": roster.describe() if roster is not None else None,
            },
        }

    # -- running ----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started_at = self.now()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self.election.run)
            task_status.started()

    async def add_peer(self, addr: str) -> str:
        """Dial *addr* now (admission included) and remember the member; returns its id."""
        peer_id = await self.endpoint.dial(addr)
        rec = self.members.record(peer_id)
        if addr not in rec.addrs:
            rec.addrs.insert(0, addr)
        rec.refused = None
        await self._send_heartbeat(peer_id)
        self.members.changed()
        return peer_id

    async def _receive_loop(self) -> None:
        async for msg in self.endpoint.messages:
            # One message that fails (to decode, or in the layer above's callbacks) is
            # dropped and logged; the next one is handled as usual.
            contain_sync("control_message", msg.sender, self._handle, msg)

    def _handle(self, msg: Message) -> None:
        try:
            self._handle_message(msg)
        finally:
            self.election.note_leader()

    def _handle_message(self, msg: Message) -> None:
        body = decode_message(msg.payload)
        sender = msg.sender
        if sender == self.peer_id:
            raise BadMessage("message claims to come from ourselves")
        term = body["term"]
        kind = body["t"]
        election = self.election
        if kind == "vreq":
            election.on_vote_request(sender, term, body["rv"])
            return
        if kind == "pvreq":  # asks; changes nothing here, the term included
            election.on_prevote_request(sender, term, body["rv"])
            return
        if kind == "pvres":  # a granted one carries the term asked about, not the sender's
            election.on_prevote(sender, term, body["granted"])
            return
        if term > election.term:
            election.adopt_term(term)
        if kind == "vres":
            election.on_vote(sender, term, body["granted"])
        elif kind == "app":
            if self.on_app_message is not None:
                self.on_app_message(sender, body["body"])
        elif kind == "bye":
            election.on_bye(sender, body["roster"])
        else:
            self._on_heartbeat(sender, body)

    def _on_heartbeat(self, sender: str, hb: dict[str, Any]) -> None:
        rec = self.members.record(sender)
        if rec.left_at is not None:
            if self.now() - rec.left_at <= self.config.dead_after_s:
                return  # sent before its goodbye, overtaken on another stream
            rec.left_at = None  # it came back (restarted)
        was_alive = self.is_alive(rec)
        first = rec.last_seen is None
        self.members.heard(rec)
        rec.role, rec.term, rec.leader, rec.name = hb["role"], hb["term"], hb["leader"], hb["name"]
        changed = first
        if hb["addrs"] and hb["addrs"] != rec.addrs:
            rec.addrs, changed = hb["addrs"], True
        if not was_alive:
            self.log.info("peer_alive", other=sender, name=rec.name)
        self.election.on_heartbeat(sender, hb)
        if self.members.learn(self.peer_id, hb["members"]) or changed:
            self.members.changed()
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

    async def leave(self) -> None:
        """Tell every connected peer this one is stopping (a daemon's graceful stop), so
        they drop it from the roster at once instead of after ``dead_after_s``; a leader
        hands the roster over without itself. Sends nothing more afterwards."""
        payload = encode_message("bye", self.term, **self.election.leave())
        async with trio.open_nursery() as nursery:
            for pid in list(self.peers):
                if self.endpoint.is_connected(pid):
                    nursery.start_soon(self._send_quietly, pid, payload)

    # -- heartbeats and dialling --------------------------------------------------------------
    def _heartbeat(self) -> bytes:
        members = {p: r.addrs for p, r in self.peers.items() if r.addrs and self.is_alive(r)}
        extra = self.extra_provider() if self.extra_provider is not None else {}
        fields: dict[str, Any] = {}
        if self.role == LEADER and self.roster is not None:
            fields["roster"] = self.roster.to_wire()
        return encode_message(
            "hb",
            self.term,
            role=self.role,
            leader=self.current_leader(),
            name=self.name,
            addrs=self.endpoint.listen_addrs(),
            members=members,
            x=extra,
            **fields,
        )

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
        while not self.election.leaving:
            self.members.forget_stale()
            self.election.keep_roster()
            self.election.note_leader()  # a leader that went quiet stops being one silently
            payload = self._heartbeat()
            now = self.now()
            for pid, rec in list(self.peers.items()):
                if self.endpoint.is_connected(pid):
                    nursery.start_soon(self._send_quietly, pid, payload)
                elif self.members.due_for_dial(rec, now):
                    nursery.start_soon(self._dial_known, rec)
            self._wake = trio.Event()
            due = self.now() + self.config.heartbeat_interval_s
            with trio.move_on_at(due):
                await self._wake.wait()
            late = self.now() - due
            if late > self.stats.hb_late_max_s:
                self.stats.hb_late_max_s = round(late, 3)

    async def _dial_known(self, rec: PeerRecord) -> None:
        if await self.members.dial(rec):
            await self._send_heartbeat(rec.peer_id)
