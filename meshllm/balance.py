"""Runtime load balancing: noticing a peer that slowed down, and deciding to move layers.

Every stage measures its own decode steps (a baseline once the plan is live, then a moving
average) and publishes them on heartbeats. About four times a second the leader turns them into an
:class:`Observation` for the plan's balancing policy (hook ``meshllm_register_balancing_policies``).
A policy that answers with a :class:`Decision` gets a re-plan: ``lp`` over the peers' profiles
with the slow peers' costs multiplied by their slowdowns, adopted only when its predicted
gain clears ``[balance] min_gain``. Requests in flight are replayed on the new plan (see
:class:`meshllm.pipeline.coordinator.Coordinator`), so balancing never changes an answer.

Built-ins: ``threshold`` (the default) and ``none``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from meshllm import hookimpl


@dataclass(frozen=True)
class StageObservation:
    peer: str
    start: int
    stop: int
    steps: int  # decode steps measured since the plan went live
    baseline_s: float  # mean decode-step compute over the plan's first steps (0: not yet)
    recent_s: float  # moving average of the latest decode steps

    @property
    def slowdown(self) -> float:
        """How many times slower this stage is now than when the plan went live."""
        return self.recent_s / self.baseline_s if self.baseline_s > 0 else 1.0


@dataclass(frozen=True)
class Observation:
    """What a policy decides from; thresholds come from ``[balance]`` in the config."""

    epoch: int
    age_s: float  # since the plan went live
    stages: tuple[StageObservation, ...]
    slowdown_threshold: float
    min_steps: int

    def relative_slowdowns(self) -> dict[str, float]:
        """Each stage's slowdown over the median stage's: a load that slows every stage
        alike (more requests, the whole device busier) is not a reason to move layers."""
        measured = [s for s in self.stages if s.baseline_s > 0]
        if not measured:
            return {}
        typical = statistics.median(s.slowdown for s in measured)
        return {s.peer: s.slowdown / typical for s in measured if typical > 0}


@dataclass(frozen=True)
class Decision:
    factors: dict[str, float]  # peer -> how many times slower to plan it as
    reason: str
    details: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class BalancingPolicy(Protocol):
    name: str

    def decide(self, observation: Observation) -> Decision | None: ...


class ThresholdPolicy:
    """Re-plan when a stage stays well slower than its own baseline, relative to the others.

    A stage counts once it has ``min_steps`` decode steps measured after its baseline, and is
    slow when its relative slowdown reaches ``slowdown_threshold`` (the moving average keeps a
    single slow step from triggering it).
    """

    name = "threshold"

    def decide(self, observation: Observation) -> Decision | None:
        rel = observation.relative_slowdowns()
        ready = {s.peer for s in observation.stages if s.steps >= observation.min_steps}
        slow = {
            peer: round(factor, 3)
            for peer, factor in rel.items()
            if peer in ready and factor >= observation.slowdown_threshold
        }
        if not slow:
            return None
        worst = max(slow, key=lambda p: slow[p])
        return Decision(
            factors=slow,
            reason=f"peer {worst[-8:]} runs {slow[worst]:.2f}x slower than when the plan went "
            f"live, relative to the other stages (threshold {observation.slowdown_threshold:g})",
            details=rel,
        )


class NoBalancing:
    """Never move layers while serving."""

    name = "none"

    def decide(self, observation: Observation) -> Decision | None:
        return None


@hookimpl(trylast=True)
def meshllm_register_balancing_policies(register):  # type: ignore[no-untyped-def]
    register(ThresholdPolicy())
    register(NoBalancing())
