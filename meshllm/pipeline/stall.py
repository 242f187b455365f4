"""Why a query got no token: the coordinator's reading of what each stage last published.

A query that waits out its step timeout used to fail with "no token from the mesh within
30 s" and nothing else, while every stage looked healthy. The coordinator knows more than
that: every stage publishes its serving state and its stage figures on its heartbeats. This
module turns them into the first reason a user can act on (a stage not heard from, still on
an older plan, still loading its segment, frames queued but no step run for seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshllm.pipeline.plan import Plan

# A stage that has frames waiting and has not finished a step for this long is stuck there.
STUCK_AFTER_S = 5.0


@dataclass(frozen=True)
class StageView:
    """What the coordinator knows of one stage's peer."""

    name: str  # the peer's name, or a short id
    alive: bool
    serving: dict[str, Any]  # PeerState.serving, or {} if nothing was heard
    stats: dict[str, float | int] | None  # PeerState.stage_stats
    refused: str | None = None  # why its published state did not decode, if it did not


def first_unready(plan: Plan, view: Callable[[str], StageView]) -> str | None:
    """The first stage of *plan* not ready for it, and why (None if every one is)."""
    for i, st in enumerate(plan.stages):
        v = view(st.peer)
        who = f"stage {i} ({v.name}, layers {st.range})"
        if not v.alive:
            return f"{who} is not heard from"
        if v.refused is not None:
            return f"{who} publishes a state this peer cannot read: {v.refused}"
        epoch, state = v.serving.get("epoch"), v.serving.get("state")
        if epoch != plan.epoch:
            return f"{who} is on plan {epoch}, not plan {plan.epoch}"
        if state != "ready":
            detail = v.serving.get("detail")
            progress = v.serving.get("progress")
            extra = f": {detail}" if detail else ""
            if isinstance(progress, float | int) and state in ("fetching", "loading"):
                extra += f" ({progress:.0%})"
            return f"{who} is {state} its segment{extra}"
    return None


def why_stalled(plan: Plan, view: Callable[[str], StageView]) -> str:
    """The first stage of *plan* that cannot be answering, and why; else what is known."""
    unready = first_unready(plan, view)
    if unready is not None:
        return unready
    for i, st in enumerate(plan.stages):
        v = view(st.peer)
        who = f"stage {i} ({v.name}, layers {st.range})"
        stats = v.stats or {}
        queued, busy = stats.get("queued", 0), stats.get("busy", 0)
        idle = stats.get("idle_s", 0.0)
        if stats.get("epoch") == plan.epoch and (queued or busy) and idle >= STUCK_AFTER_S:
            doing = "is running a step" if busy else "has not started a step"
            return f"{who} {doing} for {idle:.0f} s, with {queued} frame(s) waiting"
    return (
        f"every stage of plan {plan.epoch} reports ready and none is stuck with frames "
        "waiting: a frame was lost between stages (see the stages' logs for request_failed)"
    )
