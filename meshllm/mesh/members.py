"""This peer's view of the other members: who they are, where, and whether each is alive.

A member is alive in this view if it was heard from within ``dead_after_s``, or, while its
connection is still open, within its *patience* (see :meth:`Members.patience` and the rule in
:mod:`meshllm.mesh.node`). Members spread by gossip: every heartbeat names the members its
sender knows, and this view dials the ones it has not met (with a backoff per member).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from meshllm.config import MeshSection
from meshllm.mesh.ctlmsg import FOLLOWER, LEADER, MAX_MEMBERS
from meshllm.mesh.stats import ElectionStats
from meshllm.mesh.transport import AdmissionRefused, Endpoint, PeerUnreachable

FORGET_AFTER_MIN_S = 60.0
GAP_WINDOW_S = 60.0  # silences longer than this are absences, not lateness
DIAL_BACKOFF_MIN_S = 0.5
DIAL_BACKOFF_MAX_S = 8.0


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
    dial_backoff: float = DIAL_BACKOFF_MIN_S
    refused: str | None = None
    learned_at: float = 0.0  # when this record was made (see Members.forget_stale)
    state_refused: str | None = None  # why its published state did not decode, if it did not
    left_at: float | None = None  # when it said goodbye (a stopping daemon), if it did
    gap_max_s: float = 0.0  # its longest silence between two heartbeats (under a minute)

    def describe(self, *, now: float, alive: bool, leads: bool, connected: bool) -> dict[str, Any]:
        """This peer's entry in ``status --json``'s ``peers``."""
        return {
            "id": self.peer_id,
            "name": self.name,
            "role": (LEADER if leads else self.role) if alive else "dead",
            "alive": alive,
            "last_seen_s": None if self.last_seen is None else round(now - self.last_seen, 3),
            "term": self.term,
            "addrs": list(self.addrs),
            "connected": connected,
            "gap_max_s": self.gap_max_s,
            **({"refused": self.refused} if self.refused else {}),
        }


class Members:
    def __init__(
        self,
        endpoint: Endpoint,
        config: MeshSection,
        log: Any,
        stats: ElectionStats,
        wake: Callable[[], None],
        on_changed: Callable[[dict[str, list[str]]], None] | None = None,
    ):
        self.endpoint = endpoint
        self.config = config
        self.log = log
        self.on_changed = on_changed
        self.peers: dict[str, PeerRecord] = {}
        self.stats = stats
        self.wake = wake  # a member was learned that should be dialled soon

    @staticmethod
    def now() -> float:
        return trio.current_time()

    # -- alive or not ---------------------------------------------------------------------------
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

    def alive(self, peer_id: str) -> bool:
        rec = self.peers.get(peer_id)
        return rec is not None and self.is_alive(rec)

    def alive_peers(self) -> list[str]:
        return sorted(p for p, r in self.peers.items() if self.is_alive(r))

    # -- records --------------------------------------------------------------------------------
    def record(self, peer_id: str) -> PeerRecord:
        rec = self.peers.get(peer_id)
        if rec is None:
            rec = self.peers[peer_id] = PeerRecord(peer_id, learned_at=self.now())
            self.log.info("peer_discovered", other=peer_id)
        return rec

    def heard(self, rec: PeerRecord) -> None:
        """A heartbeat of *rec*'s peer came now: its silence so far is measured."""
        now = self.now()
        if rec.last_seen is not None and now - rec.last_seen < GAP_WINDOW_S:
            gap = now - rec.last_seen
            rec.gap_max_s = max(rec.gap_max_s, round(gap, 3))
            self.stats.hb_gap_max_s = max(self.stats.hb_gap_max_s, rec.gap_max_s)
            if gap > self.config.dead_after_s:
                self.stats.hb_gaps_over_dead += 1
                self.log.info("heartbeat_gap", other=rec.peer_id, s=round(gap, 3))
        rec.last_seen = now

    def learn(self, me: str, members: dict[str, list[str]]) -> bool:
        """Members a heartbeat named (id -> addresses); whether any was new or moved."""
        changed = False
        for pid, addrs in members.items():
            if pid == me or not addrs:
                continue
            known = self.peers.get(pid)
            if known is None and len(self.peers) >= MAX_MEMBERS:
                continue  # full: members named by others wait until stale ones are forgotten
            if known is None or (addrs != known.addrs and not self.endpoint.is_connected(pid)):
                # New member, or one we cannot reach at the addresses we had (it restarted on
                # new ports): take the addresses a live member sees it at, and dial soon.
                rec = self.record(pid)
                rec.addrs = addrs
                rec.next_dial, rec.dial_backoff = 0.0, DIAL_BACKOFF_MIN_S
                changed = True
                self.wake()
        return changed

    @property
    def forget_after_s(self) -> float:
        """How long a member named by others but never heard from is kept (and redialled)."""
        return max(FORGET_AFTER_MIN_S, 40 * self.config.dead_after_s)

    def forget_stale(self) -> None:
        """Drop members that a heartbeat named but that never answered within
        :attr:`forget_after_s` (a peer can name any ids it likes). Members once heard from
        directly are kept and redialled however long they are away: a phone off the Wi-Fi
        for an hour still rejoins."""
        now = self.now()
        limit = self.forget_after_s
        stale = [
            pid
            for pid, rec in self.peers.items()
            if rec.last_seen is None
            and not self.endpoint.is_connected(pid)
            and now - rec.learned_at > limit
        ]
        for pid in stale:
            del self.peers[pid]
            self.log.info("peer_forgotten", other=pid)
        if stale:
            self.changed()

    def changed(self) -> None:
        if self.on_changed is not None:
            # Only members heard from directly: ids that others merely named are not kept.
            self.on_changed(
                {
                    p: list(r.addrs)
                    for p, r in self.peers.items()
                    if r.addrs and r.last_seen is not None
                }
            )

    # -- dialling -------------------------------------------------------------------------------
    def due_for_dial(self, rec: PeerRecord, now: float) -> bool:
        """Whether an unconnected member should be dialled now (and book its next try)."""
        if not rec.addrs or now < rec.next_dial:
            return False
        rec.next_dial = now + rec.dial_backoff
        rec.dial_backoff = min(rec.dial_backoff * 2, DIAL_BACKOFF_MAX_S)
        return True

    async def dial(self, rec: PeerRecord) -> bool:
        """Dial *rec*'s addresses in turn; whether one reached the expected peer."""
        for addr in list(rec.addrs):
            try:
                with trio.fail_after(self.config.handshake_timeout_s + 1):
                    peer_id = await self.endpoint.dial(addr)
            except AdmissionRefused as exc:
                rec.refused = str(exc)
                self.log.warning("admission_refused", addr=addr, reason=str(exc))
                return False
            except (PeerUnreachable, trio.TooSlowError):
                continue
            except Exception as exc:  # a transport bug must not take the daemon down
                self.log.warning("dial_failed", addr=addr, reason=repr(exc))
                continue
            if peer_id != rec.peer_id:
                self.log.warning("peer_id_mismatch", addr=addr, expected=rec.peer_id, got=peer_id)
                continue
            rec.dial_backoff = DIAL_BACKOFF_MIN_S
            rec.refused = None
            return True
        return False
