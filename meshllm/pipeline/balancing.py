"""The balancer (leader): moves layers away from a stage that has slowed down, while serving.

Every quarter second it shows the plan's balancing policy (a plugin, see
:mod:`meshllm.balance`) what each stage's recent step time is against its own baseline. A
verdict that repeats over three looks is priced: the leader re-plans with the measured
slowdowns and adopts the new plan only when the predicted gain is worth it. The new plan is
staged first (every peer loads its new part while the current plan keeps serving), so the
switch costs a KV move, not a reload.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import trio

from meshllm.balance import Decision, Observation, StageObservation
from meshllm.config import Config
from meshllm.errors import MeshError
from meshllm.mesh.contain import supervised
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.pipeline.leader import Leader
from meshllm.pipeline.loader import SegmentLoader
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.profiling import predict
from meshllm.pipeline.serving_state import ServingState
from meshllm.plugins import BalancingPolicyRegistry

log = structlog.get_logger("meshllm.serve")

LOOK_EVERY_S = 0.25
REPEATS = 3  # consecutive looks with the same verdict before layers move
STAGING_TIMEOUT_S = 120.0


class Balancer:
    def __init__(
        self,
        config: Config,
        node: MeshNode,
        state: ServingState,
        leader: Leader,
        loader: SegmentLoader,
        policies: BalancingPolicyRegistry,
    ):
        self.config = config
        self.node = node
        self.state = state
        self.leader = leader
        self.loader = loader
        self.policies = policies
        self.me = node.peer_id
        self.status: dict[str, Any] = {}  # what it saw and decided last (for status)
        self.staged: Plan | None = None  # the plan being prepared (published)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await supervised("balancer", self._loop)

    def _observe(self, plan: Plan, age_s: float) -> Observation | None:
        stages = []
        for st in plan.stages:
            raw = self.state.stage_stats_of(st.peer)
            if not isinstance(raw, dict) or raw.get("epoch") != plan.epoch:
                return None
            try:
                stages.append(
                    StageObservation(
                        peer=st.peer,
                        start=st.start,
                        stop=st.stop,
                        steps=int(raw["steps"]),
                        baseline_s=float(raw["baseline_s"]),
                        recent_s=float(raw["recent_s"]),
                    )
                )
            except (KeyError, TypeError, ValueError):
                return None
        cfg = self.config.balance
        return Observation(
            epoch=plan.epoch,
            age_s=age_s,
            stages=tuple(stages),
            slowdown_threshold=cfg.slowdown,
            min_steps=cfg.min_steps,
        )

    async def _loop(self) -> None:
        cfg = self.config.balance
        epoch, live_since, last_change = 0, 0.0, -float("inf")
        # A policy's verdict must repeat over consecutive looks (0.75 s) before layers move:
        # one noisy stretch on a busy device is not a slowdown.
        streak: tuple[frozenset[str], int] = (frozenset(), 0)
        while True:
            await trio.sleep(LOOK_EVERY_S)
            plan = self.state.plan
            if plan is None or self.node.role != LEADER or plan.balance == "none":
                continue
            now = trio.current_time()
            if plan.epoch != epoch:
                epoch, live_since = plan.epoch, now
            obs = self._observe(plan, now - live_since) if self.state.plan_ready() else None
            if obs is None:
                continue
            self.status.update(
                policy=plan.balance,
                epoch=plan.epoch,
                slowdowns={p[-8:]: round(f, 3) for p, f in obs.relative_slowdowns().items()},
                speed_factors=dict(self.leader.speed_factors),
            )
            if now - last_change < cfg.cooldown_s:
                continue
            try:
                decision = self.policies.get(plan.balance).decide(obs)
            except Exception as exc:  # a policy plugin's bug must not stop the leader
                log.error("balancing_policy_failed", policy=plan.balance, error=repr(exc))
                continue
            if decision is None:
                streak = (frozenset(), 0)
                continue
            slow = frozenset(decision.factors)
            streak = (slow, streak[1] + 1 if streak[0] == slow else 1)
            if streak[1] < REPEATS:
                continue
            streak = (frozenset(), 0)
            if await self._rebalance(plan, decision):
                last_change = trio.current_time()

    async def _rebalance(self, plan: Plan, decision: Decision) -> bool:
        """Re-plan with *decision*'s slowdowns; adopt when the predicted gain is worth it."""
        factors = dict(self.leader.speed_factors)
        for peer, f in decision.factors.items():
            factors[peer] = factors.get(peer, 1.0) * f
        objective = (plan.predicted or {}).get("objective") or self.config.plan.objective
        metric = "bottleneck_s" if objective == "throughput" else "step_s"
        try:
            # Moving layers is the optimiser's job whatever split the plan started from.
            candidate, ctx = await self.leader.build_plan(
                plan.model, "lp", objective, plan.balance, factors
            )
            if not ctx[1]:
                raise MeshError("no peer profiles to re-plan from")
            now_cost = predict(*ctx, plan.stages)[metric]
        except MeshError as exc:
            self._decided(plan, decision, "failed", reason=str(exc))
            return False
        new_cost = (candidate.predicted or {}).get(metric, now_cost)
        gain = now_cost / new_cost if new_cost > 0 else 1.0
        if gain < self.config.balance.min_gain or candidate.stages == plan.stages:
            self._decided(plan, decision, "kept", gain=gain)
            return False
        # Stage it: every peer fetches and loads its new part while the current plan keeps
        # serving; only then does the switch (and the requests' replay) happen.
        t0 = trio.current_time()
        self.staged = candidate
        self.node.announce()
        self.loader.prepare(candidate)
        peers = {st.peer for st in candidate.stages}
        with trio.move_on_after(STAGING_TIMEOUT_S):
            while not all(self._prepared(p) >= candidate.epoch for p in peers):
                await self.state.news(0.1)
        self.staged = None
        if self.state.plan is not plan or candidate.epoch <= self.leader.max_epoch_seen():
            self._decided(plan, decision, "dropped", reason="the plan changed while staging")
            return False
        self.leader.speed_factors = factors
        self._decided(
            plan,
            decision,
            "replanned",
            gain=gain,
            epoch=candidate.epoch,
            staged_s=trio.current_time() - t0,
            stages=[str(st.range) for st in candidate.stages],
        )
        self.state.adopt(candidate)
        return True

    def _prepared(self, peer: str) -> int:
        if peer == self.me:
            return self.loader.prepared_epoch
        return self.state.state_of(peer).prepared

    def _decided(self, plan: Plan, decision: Decision, outcome: str, **extra: Any) -> None:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()}
        record = {
            "at": time.time(),
            "epoch": plan.epoch,
            "outcome": outcome,
            "reason": decision.reason,
            "factors": {p[-8:]: f for p, f in decision.factors.items()},
            **rounded,
        }
        self.status["last_decision"] = record
        history = self.status.setdefault("history", [])
        history.append(record)
        del history[:-8]
        log.info("balancing_decision", **record)
