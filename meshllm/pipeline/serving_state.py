"""What the serving components of one peer share: the plan it follows, its own state for that
plan, its stage, the served model's manifest and tokenizer, and what the other peers publish.

One object, owned by :class:`~meshllm.pipeline.service.ServingService` and handed to every
component, so that each reads the same plan and none calls back into another to learn it.
Changes are announced with events: :meth:`ServingState.plan_changed` fires when a plan is
adopted, :meth:`ServingState.news` on any change (a plan, a peer's heartbeat, this peer's
state), so components wait for what they need instead of polling.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from meshllm.mesh.node import MeshNode
from meshllm.model.manifest import Manifest
from meshllm.model.store import ModelStore
from meshllm.model.tokenizer import ChatTokenizer
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.stage import StageRunner
from meshllm.pipeline.stall import StageView

log = structlog.get_logger("meshllm.serve")

NO_STATE = PeerState()


class ServingState:
    def __init__(self, node: MeshNode, store: ModelStore):
        self.node = node
        self.store = store
        self.me = node.peer_id
        self.plan: Plan | None = None
        self.replaced: Plan | None = None  # the plan the current one replaced
        # This peer's state for the plan, as published: {epoch, state, progress, ...}.
        self.state: dict[str, Any] = {"epoch": 0, "state": "idle"}
        self.stage: StageRunner | None = None
        self.manifest: Manifest | None = None
        self.tokenizer: ChatTokenizer | None = None
        self.models = self.local_models()
        self._plan_changed = trio.Event()
        self._news = trio.Event()

    # -- this peer ----------------------------------------------------------------------------
    def local_models(self) -> dict[str, dict[str, Any]]:
        """Models imported here, as advertised: name -> {sha, layers}."""
        return {
            m.name: {"sha": m.manifest.model_sha256, "layers": m.manifest.architecture.num_layers}
            for m in self.store.list()
        }

    @property
    def epoch(self) -> int:
        return self.plan.epoch if self.plan is not None else 0

    def set_state(self, state: str, **extra: Any) -> None:
        self.state = {"epoch": self.epoch, "state": state, **extra}
        self.node.announce()
        self.poke()

    def adopt(self, plan: Plan) -> None:
        """Follow *plan* from now on (the segment loader takes it from here)."""
        if self.plan is not None and self.plan.epoch < plan.epoch:
            self.replaced = self.plan
        self.plan = plan
        self._plan_changed.set()
        self._plan_changed = trio.Event()
        self.poke()
        log.info("plan_adopted", epoch=plan.epoch, stage=plan.stage_of(self.me))

    # -- waiting for changes -------------------------------------------------------------------
    def poke(self) -> None:
        """Wake whoever waits for the serving state to change (a plan, a peer's state)."""
        self._news.set()
        self._news = trio.Event()

    def plan_changed(self) -> trio.Event:
        """An event set when the next plan is adopted (take it before reading :attr:`plan`)."""
        return self._plan_changed

    async def news(self, timeout: float) -> None:
        """Return at the next change, or after *timeout* seconds."""
        with trio.move_on_after(timeout):
            await self._news.wait()

    # -- the other peers ----------------------------------------------------------------------
    def state_of(self, peer: str | None) -> PeerState:
        """What *peer* last published (empty if nothing yet)."""
        state = self.node.state_of(peer)
        return state if isinstance(state, PeerState) else NO_STATE

    def serving_of(self, pid: str) -> dict[str, Any]:
        """A peer's serving state for its plan; empty when it is not alive."""
        if pid == self.me:
            return self.state
        if not self.node.peer_alive(pid):
            return {}
        return self.state_of(pid).serving

    def plan_ready(self) -> bool:
        """Every stage of the plan is loaded and says so, and this peer has the manifest."""
        plan = self.plan
        if plan is None or self.manifest is None:
            return False
        for s in plan.stages:
            state = self.serving_of(s.peer)
            if state.get("epoch") != plan.epoch or state.get("state") != "ready":
                return False
        return True

    def stage_view(self, pid: str) -> StageView:
        """What this peer knows of *pid*'s stage, to say why a stage does not answer."""
        if pid == self.me:
            stats = self.stage.stats() if self.stage is not None else None
            return StageView(self.node.name or pid[-8:], True, self.state, stats)
        rec = self.node.peers.get(pid)
        name = rec.name if rec is not None and rec.name else pid[-8:]
        state = self.state_of(pid)
        return StageView(
            name,
            self.node.peer_alive(pid),
            state.serving,
            state.stage_stats,
            rec.state_refused if rec is not None else None,
        )

    def stage_stats_of(self, pid: str) -> Any:
        """A peer's stage figures as last published (this peer's, live)."""
        if pid == self.me:
            return self.stage.stats() if self.stage is not None else None
        return self.state_of(pid).stage_stats
