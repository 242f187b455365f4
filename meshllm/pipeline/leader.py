"""The leader's planning: plans for serve requests, and new plans when a stage's peer is lost.

Only the elected leader makes plans; every peer adopts the newest it hears from the leader.
:meth:`Leader.plan_for` answers a ``serve`` request (through the serve desk); :meth:`run`
watches the live plan and replaces it when one of its peers is gone, saying on heartbeats why
when it cannot. Profiles come from the peers themselves (each profiles itself when asked), and
the balancer's measured slowdowns (:attr:`Leader.speed_factors`) price later plans.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

import structlog
import trio

from meshllm.config import OBJECTIVES, Config
from meshllm.errors import MeshError
from meshllm.mesh.contain import supervised
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.model.manifest import Manifest
from meshllm.partitioners import uses_profiles
from meshllm.pipeline import appmsg
from meshllm.pipeline.plan import Plan, PlanError, Stage
from meshllm.pipeline.profiling import Profiler, partition_request, predict, slowed
from meshllm.pipeline.serving_state import ServingState
from meshllm.plugins import PartitionerRegistry

log = structlog.get_logger("meshllm.serve")

EPOCH_LEAP = 1 << 20  # how far ahead of this peer's plan another's epoch may credibly be
WATCH_EVERY_S = 0.2
REPLAN_EVERY_S = 2.0  # while a plan that lost a peer cannot be replaced
MODEL_TRIES, MODEL_RETRY_S = 12, 0.5  # for a model named in a serve request to be advertised


class Leader:
    def __init__(
        self,
        config: Config,
        node: MeshNode,
        state: ServingState,
        profiler: Profiler,
        partitioners: PartitionerRegistry,
    ):
        self.config = config
        self.node = node
        self.state = state
        self.profiler = profiler
        self.partitioners = partitioners
        self.me = node.peer_id
        # Measured slowdowns (peer -> factor) that later plans keep accounting for.
        self.speed_factors: dict[str, float] = {}
        # The last failure to replace a plan that lost a peer: {epoch, error} (published).
        self.replan_error: dict[str, Any] | None = None

    # -- serve requests -----------------------------------------------------------------------
    async def plan_for(self, ask: appmsg.ServeAsk) -> int:
        """Make and publish the plan a serve request asks for; its epoch (raises MeshError
        with the reason when none can be made)."""
        # An explicit serve starts afresh: slowdowns measured under an earlier plan may
        # have passed (the phone cooled down, the other app closed).
        self.speed_factors = {}
        # A model imported a moment ago is advertised within a couple of heartbeats: retry
        # for a few seconds before giving up. A plan that cannot exist (the model does not
        # fit) is not retried.
        for attempt in range(MODEL_TRIES):
            try:
                plan = await self.make_plan(
                    ask.model,
                    ask.partitioner or self.config.plan.partitioner,
                    ask.objective or self.config.plan.objective,
                    ask.balance or self.config.balance.policy,
                )
                return plan.epoch
            except PlanError:
                raise
            except MeshError:
                if attempt == MODEL_TRIES - 1:
                    raise
            await trio.sleep(MODEL_RETRY_S)
        raise AssertionError("unreachable")

    # -- models -------------------------------------------------------------------------------
    def find_model(self, model: str) -> tuple[dict[str, Any], str]:
        """(facts, source peer) of a model imported on some live peer."""
        self.state.models = self.state.local_models()
        found = self.imported().get(model)
        if found is None:
            raise MeshError(f"no live peer has imported a model named {model!r}")
        info, holders = found
        return info, holders[0]

    def imported(self) -> dict[str, tuple[dict[str, Any], list[str]]]:
        """Models imported on live peers, as last advertised: name -> (facts, holders), this
        peer first among the holders."""
        found: dict[str, tuple[dict[str, Any], list[str]]] = {
            name: (info, [self.me]) for name, info in self.state.models.items()
        }
        for pid in self.node.alive_peers():
            for name, facts in self.state.state_of(pid).models.items():
                found.setdefault(name, (facts.to_obj(), []))[1].append(pid)
        return found

    # -- profiles and plans -------------------------------------------------------------------
    async def gather_profiles(
        self, sha: str, source: str, peers: list[str], *, refresh: bool, timeout: float = 90.0
    ) -> dict[str, Any]:
        """Have *peers* (this one included) profile themselves for *sha*, one after another.

        One at a time, because peers sharing hardware (a testbed, or phones on one charger
        hub's Wi-Fi) would otherwise slow each other's timings down.
        """
        found: dict[str, Any] = {}
        body = appmsg.ProfileAsk(sha, source, refresh).to_obj()
        for pid in peers:
            asked = time.time()
            if pid == self.me:
                with contextlib.suppress(MeshError, OSError, ValueError):
                    found[pid] = await self.profiler.profile(sha, source, refresh=refresh)
                continue
            with contextlib.suppress(MeshError):
                await self.node.send_app(pid, body)
            with trio.move_on_after(timeout):
                while True:
                    prof = self.profiler.profile_of(pid, sha)
                    if prof is not None and (not refresh or prof.measured_at >= asked - 1):
                        found[pid] = prof
                        break
                    if prof is None and self.profiler.error_of(pid, sha) is not None:
                        break  # it tried and failed: it said why on its heartbeats
                    await self.state.news(0.1)
        missing = [p for p in peers if p not in found]
        if missing:
            log.warning("profiles_missing", peers=missing)
        return found

    def stage_peers(self) -> list[str]:
        """The live peers the planner may give layers: not those that run no stages."""
        mine = [self.me] if self.config.peer.stages else []
        others = [p for p in self.node.alive_peers() if self.state.state_of(p).stages]
        return sorted([*mine, *others])

    async def make_plan(
        self,
        model: str,
        partitioner: str,
        objective: str | None = None,
        balance: str | None = None,
    ) -> Plan:
        """Assign the model's layers to the live peers and publish the plan."""
        plan, _ctx = await self.build_plan(model, partitioner, objective, balance)
        self.state.adopt(plan)
        return plan

    async def build_plan(
        self,
        model: str,
        partitioner: str,
        objective: str | None,
        balance: str | None,
        factors: dict[str, float] | None = None,
    ) -> tuple[Plan, tuple]:
        """A plan (not adopted) and what priced it, for comparing with another plan."""
        if objective not in OBJECTIVES:
            objective = self.config.plan.objective
        balance = balance or self.config.balance.policy
        config = replace(self.config, plan=replace(self.config.plan, objective=objective))
        info, source = self.find_model(model)
        sha = str(info["sha"])
        workers = self.stage_peers()
        if not workers:
            raise PlanError(f"cannot serve {model}: no live peer runs layers ([peer] stages)")
        impl = self.partitioners.get(partitioner)
        manifest = Manifest.read(await self.profiler.meta_dir(sha, source))
        ends = await self.profiler.end_bytes(sha, source)
        # Profiles cost a few seconds once per model; they are skipped where nothing uses
        # them (a partitioner that ignores them, and no balancer that would re-plan).
        if uses_profiles(impl) or balance != "none":
            profiles = await self.gather_profiles(sha, source, workers, refresh=False)
        else:  # what is known already still predicts the plan's speed
            known = {w: self.profiler.profile_of(w, sha) for w in workers}
            profiles = {w: p for w, p in known.items() if p is not None}
            if len(profiles) != len(workers):
                profiles = {}
        factors = self.speed_factors if factors is None else factors
        profiles = {w: slowed(p, factors.get(w, 1.0)) for w, p in profiles.items()}
        request = partition_request(workers, profiles, manifest, ends, config)
        from meshllm.plan import Infeasible

        try:
            assignment = await trio.to_thread.run_sync(
                self.partitioners.assign, partitioner, request
            )
        except Infeasible as exc:
            raise PlanError(f"cannot serve {model} on these {len(workers)} peers: {exc}") from None
        stages = tuple(
            Stage(w, r.start, r.stop)
            for w, r in zip(workers, assignment, strict=True)
            if r is not None
        )
        ctx = (workers, profiles, manifest, ends, config)
        predicted = predict(*ctx, stages) if profiles else None
        epoch = max(self.state.epoch, self.max_epoch_seen()) + 1
        plan = Plan(
            epoch=epoch,
            model=model,
            model_sha=sha,
            source=source,
            num_layers=int(info["layers"]),
            partitioner=partitioner,
            stages=stages,
            predicted=predicted,
            balance=balance,
        )
        log.info(
            "plan_made",
            epoch=epoch,
            model=model,
            stages=[str(s.range) for s in plan.stages],
            predicted_step_ms=None if predicted is None else round(predicted["step_s"] * 1e3, 2),
        )
        return plan, ctx

    def majority_plan(self) -> Plan | None:
        """A plan newer than this peer's that most of the live peers publish, if any."""
        others = self.node.alive_peers()
        mine = self.state.plan
        seen: list[tuple[Plan, int]] = []  # plans are not hashable (predicted is a dict)
        for pid in others:
            plan = self.state.state_of(pid).plan
            if plan is None or (mine is not None and plan.epoch <= mine.epoch):
                continue
            i = next((i for i, (p, _) in enumerate(seen) if p == plan), None)
            if i is None:
                seen.append((plan, 1))
            else:
                seen[i] = (plan, seen[i][1] + 1)
        best = max(seen, key=lambda pc: pc[1], default=None)
        return best[0] if best is not None and 2 * best[1] > len(others) else None

    def max_epoch_seen(self) -> int:
        """The newest plan epoch any peer publishes, so a new plan's is higher still. One far
        ahead of this peer's own (a peer publishing epoch 2**62 - 1 would leave no epoch
        that decodes) is not credible and not counted."""
        mine = self.state.epoch
        best = 0
        for pid in list(self.node.peers):  # dead ones too: a plan they made may come back
            plan = self.state.state_of(pid).plan
            if plan is not None and plan.epoch <= mine + EPOCH_LEAP:
                best = max(best, plan.epoch)
        return best

    # -- surviving lost peers -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replace a plan one of whose stages' peers is gone, until that works (while this
        peer leads)."""
        task_status.started()
        await supervised("plan_watch", self._watch_plan)

    async def _watch_plan(self) -> None:
        last_try = -float("inf")
        while True:
            await trio.sleep(WATCH_EVERY_S)
            plan = self.state.plan
            if plan is None or self.node.role != LEADER:
                continue
            alive = {self.me, *self.node.alive_peers()}
            lost = [s.peer for s in plan.stages if s.peer not in alive]
            if not lost or trio.current_time() - last_try < REPLAN_EVERY_S:
                continue
            last_try = trio.current_time()
            log.warning("plan_lost_peers", epoch=plan.epoch, peers=lost)
            objective = (plan.predicted or {}).get("objective")
            try:
                await self.make_plan(plan.model, plan.partitioner, objective, plan.balance)
                self.replan_error = None
            except MeshError as exc:
                # Not enough peers (or the model's source is gone): say why on heartbeats,
                # so queries fail with the reason; retried while peers come and go.
                self.replan_error = {"epoch": plan.epoch, "error": str(exc)}
                log.warning("replan_failed", epoch=plan.epoch, reason=str(exc))
            self.node.announce()

    def replan_failure(self, epoch: int) -> str | None:
        """Why the leader could not replace plan *epoch*, if it said so."""
        leader = self.node.current_leader()
        if leader == self.me:
            err = self.replan_error
            mine = (err["epoch"], str(err["error"])) if err else None
        else:
            mine = self.state.state_of(leader).replan_error
        return mine[1] if mine is not None and mine[0] == epoch else None
