"""The counters a peer reports about its membership and elections (``status --json``'s
``election``): on a healthy mesh they stay still once it has formed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ElectionStats:
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
