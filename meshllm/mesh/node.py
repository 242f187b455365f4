"""Membership and leader election for one peer.

Algorithm: Raft's leader election, without a replicated log.

* Every peer keeps a *term*. Every ``heartbeat_interval_s`` each peer sends a small heartbeat to
  every peer it is connected to: its term, role, the leader it follows, its name and addresses
  and the members it knows (id -> addresses). Heartbeats are re-sent constantly, so losing one
  costs nothing, and members spread: a peer that joined through one member learns all others
  from that member's heartbeats and dials them.
* In a peer's *view*, a member is alive if it was heard from within ``dead_after_s``.
* A peer that has heard from no leader of its term for a randomised election timeout (uniform
  in ``[election_timeout_min_s, election_timeout_max_s]``, drawn afresh each time) becomes a
  candidate: it increments its term, votes for itself and asks every alive member for a vote.
* A peer grants at most one vote per term, to the first candidate that asks, and none while it
  has heard from a live leader within ``election_timeout_min_s`` (leader stickiness: a peer that
  was briefly cut off cannot depose a healthy leader by showing up with a higher term).
* A candidate holding votes from a strict majority of its alive view (itself included) becomes
  leader of that term and heartbeats as leader at once. Any message carrying a higher term makes
  the receiver adopt that term and step down to follower.

Safety: a peer votes once per term, so while the peers' views agree two candidates cannot both
win the same term: at most one leader per term. A new leader follows a dead one after about
one election timeout (< 2 s with the defaults).

Split brain: quorums are counted against the *alive view*, not a fixed roster, so a mesh of
phones keeps a leader as members leave (down to a lone survivor, which leads itself). The price
is paid in a network partition: each side declares the other dead after ``dead_after_s`` and
elects its own leader, possibly with the same term number, and each side goes on serving
alone. When the partition heals, heartbeats carry terms: a leader that hears a leader of a
higher term steps down, and of two leaders of the same term the one with the larger peer id
steps down, so the mesh converges on one leader within a heartbeat interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import cbor2
import structlog
import trio

from meshllm import wire
from meshllm.config import MeshSection
from meshllm.mesh.contain import contain_sync
from meshllm.mesh.transport import AdmissionRefused, Endpoint, Message, PeerUnreachable
from meshllm.wire import BadMessage

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
PROTOCOL_VERSION = 1
_MAX_MEMBERS = 256
_MAX_ADDRS = 16
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


def _addrs(value: Any, what: str) -> list[str]:
    return wire.seq_of(value, what, _MAX_ADDRS, lambda v, w: wire.text(v, w, 512, empty=False))


def decode_message(
    payload: bytes, decode_extra: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """Decode and validate one control message; raises BadMessage.

    *decode_extra* turns a heartbeat's ``x`` (the state the layer above publishes) into its
    typed value; without it ``x`` must still be a map.
    """
    msg = wire.mapping(wire.loads(payload), "control message")
    if msg.get("v") != PROTOCOL_VERSION:
        raise BadMessage("not a version-1 control message")
    kind = msg.get("t")
    out: dict[str, Any] = {"t": kind, "term": wire.integer(msg.get("term"), "term")}
    if kind == "hb":
        role = msg.get("role")
        if role not in (FOLLOWER, CANDIDATE, LEADER):
            raise BadMessage(f"bad role {wire.show(role)}")
        out["role"] = role
        out["leader"] = wire.optional(msg.get("leader"), "leader", wire.peer_id)
        out["name"] = wire.text(msg.get("name"), "name", 128)
        out["addrs"] = _addrs(msg.get("addrs"), "addrs")
        members = wire.mapping(msg.get("members"), "members", _MAX_MEMBERS)
        out["members"] = {
            wire.peer_id(k, "member"): _addrs(v, "member addrs") for k, v in members.items()
        }
        extra = msg.get("x", {})
        out["x"] = decode_extra(extra) if decode_extra else wire.mapping(extra, "state")
    elif kind == "vres":
        out["granted"] = wire.flag(msg.get("granted"), "granted")
    elif kind == "app":
        out["body"] = wire.mapping(msg.get("body"), "app message")
    elif kind != "vreq":
        raise BadMessage(f"unknown message type {wire.show(kind)}")
    return out


def encode_message(kind: str, term: int, **fields: Any) -> bytes:
    return cbor2.dumps({"v": PROTOCOL_VERSION, "t": kind, "term": term, **fields})


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
        self._quorum = 1
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
        return rec.last_seen is not None and self.now() - rec.last_seen <= self.config.dead_after_s

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
            self._on_vote_request(sender, term)
            return
        if term > self.term:
            self._adopt_term(term)
        if kind == "vres":
            self._on_vote(sender, term, body["granted"])
        elif kind == "app":
            if self.on_app_message is not None:
                self.on_app_message(sender, body["body"])
        else:
            self._on_heartbeat(sender, body)

    def _adopt_term(self, term: int) -> None:
        if self.role != FOLLOWER:
            self.log.info("stepped_down", term=term, was=self.role)
        self.term = term
        self.role = FOLLOWER
        self.voted_for = None
        self.leader = None

    def _on_heartbeat(self, sender: str, hb: dict[str, Any]) -> None:
        now = self.now()
        rec = self._record(sender)
        was_alive = self.is_alive(rec)
        first = rec.last_seen is None
        rec.last_seen = now
        rec.role, rec.term, rec.leader, rec.name = hb["role"], hb["term"], hb["leader"], hb["name"]
        changed = first
        if hb["addrs"] and hb["addrs"] != rec.addrs:
            rec.addrs, changed = hb["addrs"], True
        if not was_alive:
            self.log.info("peer_alive", other=sender, name=rec.name)
        if hb["role"] == LEADER and hb["term"] == self.term:
            if self.role == LEADER:
                # Two leaders of one term can only meet after a partition heals.
                if sender < self.peer_id:
                    self.log.info("stepped_down", term=self.term, to=sender)
                    self.role, self.leader = FOLLOWER, sender
            else:
                if self.leader != sender:
                    self.log.info("leader_recognised", leader=sender, term=self.term)
                self.role, self.leader = FOLLOWER, sender
                self._last_leader_contact = now
                self._reset_election_deadline()
        for pid, addrs in hb["members"].items():
            if pid == self.peer_id or not addrs:
                continue
            known = self.peers.get(pid)
            if known is None and len(self.peers) >= _MAX_MEMBERS:
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
        return self.now() - self._last_leader_contact < self.config.election_timeout_min_s

    def _on_vote_request(self, sender: str, term: int) -> None:
        rec = self._record(sender)
        rec.last_seen = self.now()
        if self.role == LEADER or self._leader_recently_heard():
            # Stickiness: a working leader is not deposed by a peer that merely lost touch.
            # A leader that is really gone from the others' view is replaced anyway, and steps
            # down when it hears the new leader's higher term.
            granted = False
        else:
            if term > self.term:
                self._adopt_term(term)
            granted = term == self.term and self.voted_for in (None, sender)
            if granted:
                self.voted_for = sender
                self._reset_election_deadline()
        self._spawn_send(sender, encode_message("vres", self.term, granted=granted))

    def _on_vote(self, sender: str, term: int, granted: bool) -> None:
        if self.role != CANDIDATE or term != self.term or not granted:
            return
        self._votes.add(sender)
        if len(self._votes) >= self._quorum:
            self._become_leader()

    def _start_election(self) -> None:
        self.term += 1
        self.role = CANDIDATE
        self.leader = None
        self.voted_for = self.peer_id
        self._votes = {self.peer_id}
        voters = self.alive_peers()
        self._quorum = (len(voters) + 1) // 2 + 1
        self.log.info("election_started", term=self.term, voters=len(voters) + 1)
        self._reset_election_deadline()
        self._note_leader()
        if len(self._votes) >= self._quorum:
            self._become_leader()
            return
        for pid in voters:
            self._spawn_send(pid, encode_message("vreq", self.term))

    def _become_leader(self) -> None:
        self.role = LEADER
        self.leader = self.peer_id
        self.log.info("leader_elected", term=self.term, votes=len(self._votes))
        self._note_leader()
        self._wake.set()  # announce at once

    async def _election_loop(self) -> None:
        while True:
            await trio.sleep_until(self._election_deadline)
            if self.now() < self._election_deadline:
                continue  # the deadline moved while we slept
            if self.role == LEADER:
                self._election_deadline = math.inf
                await self._until_not_leader()
                self._reset_election_deadline()
            else:
                self._start_election()

    async def _until_not_leader(self) -> None:
        while self.role == LEADER:
            await trio.sleep(self.config.heartbeat_interval_s)

    # -- heartbeats and dialling --------------------------------------------------------------
    def _heartbeat(self) -> bytes:
        members = {p: r.addrs for p, r in self.peers.items() if r.addrs and self.is_alive(r)}
        extra = self.extra_provider() if self.extra_provider is not None else {}
        return encode_message(
            "hb", self.term, role=self.role, leader=self.current_leader(), name=self.name,
            addrs=self.endpoint.listen_addrs(), members=members, x=extra,
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
        with trio.move_on_after(self.config.heartbeat_interval_s * 4), suppress(PeerUnreachable):
            await self.endpoint.send(peer_id, payload)

    async def _heartbeat_loop(self) -> None:
        nursery = self._nursery
        assert nursery is not None
        while True:
            self._forget_stale()
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
            with trio.move_on_after(self.config.heartbeat_interval_s):
                await self._wake.wait()

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
