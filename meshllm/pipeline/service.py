"""Serving on one peer: the components, wired together, and the control operations on them.

Components (each one job, each started by the daemon with ``nursery.start(c.run)``)::

    peer requests        profiling asked by the leader, new imports advertised  service.py
    Links                activation frames in and out (protocol ``act``)     links.py
    KVCaches             old plans' caches kept, prefetched, served (``kv``) kvcaches.py
    SegmentLoader        this peer's part of each adopted plan, loaded, run  loader.py
    Leader               plans: for serve requests, and when a peer is lost  leader.py
    Balancer             layers moved off a stage that slowed down           balancing.py
    ServeDesk            `serve` as a request and a reply with the leader    serve_desk.py

:class:`~meshllm.pipeline.gateway.QueryGateway` (queries from the control socket and the HTTP
API) and :class:`~meshllm.pipeline.serving_state.ServingState` (the plan and every peer's
published state, shared by all) have no task of their own.

What rides on heartbeats (small, re-sent, so loss costs nothing) is listed in
:mod:`meshllm.pipeline.peerstate`; it is built here (:meth:`ServingService.published`) and
decoded there, once.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pluggy
import structlog
import trio

from meshllm import wire
from meshllm.config import OBJECTIVES, Config
from meshllm.control.protocol import ControlError
from meshllm.device import resident_bytes
from meshllm.errors import MeshError
from meshllm.mesh.contain import spawn
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.mesh.transport import Endpoint
from meshllm.model.store import ModelStore
from meshllm.pipeline import appmsg, files
from meshllm.pipeline.balancing import Balancer
from meshllm.pipeline.gateway import QueryGateway, ReadyModel
from meshllm.pipeline.kvcaches import KVCaches
from meshllm.pipeline.leader import Leader
from meshllm.pipeline.links import Links
from meshllm.pipeline.loader import SegmentLoader
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.profiling import Profiler
from meshllm.pipeline.serve_desk import ServeDesk, ServeFailed, ServeTimeout
from meshllm.pipeline.serving_state import ServingState
from meshllm.plan.profile import MiB
from meshllm.plugins import BalancingPolicyRegistry, PartitionerRegistry, get_plugin_manager

log = structlog.get_logger("meshllm.serve")
MODELS_EVERY_S = 2.0  # how soon a model imported while the daemon runs is advertised

Run = Callable[..., Awaitable[None]]

__all__ = ["ReadyModel", "ServingService"]


def rss_mb() -> float | None:
    rss = resident_bytes()
    return None if rss is None else round(rss / MiB, 1)


class ServingService:
    def __init__(
        self,
        home: Path,
        config: Config,
        endpoint: Endpoint,
        node: MeshNode,
        plugins: pluggy.PluginManager | None = None,
    ):
        self.home = home
        self.config = config
        self.node = node
        self.me = endpoint.peer_id
        store = ModelStore(home / "models")
        plugins = plugins or get_plugin_manager()  # the daemon's own, passed in
        self.partitioners = PartitionerRegistry(plugins)
        self.policies = BalancingPolicyRegistry(plugins)
        self.state = ServingState(node, store)
        self.profiler = Profiler(home, config, endpoint, node, store)
        self.links = Links(
            endpoint,
            node,
            config,
            self.state,
            deliver=lambda f: self.gateway.coordinator.deliver(f),
        )
        self.kv = KVCaches(endpoint, self.state)
        self.loader = SegmentLoader(home, config, endpoint, node, self.state, self.links, self.kv)
        self.leader = Leader(config, node, self.state, self.profiler, self.partitioners)
        self.balancer = Balancer(config, node, self.state, self.leader, self.loader, self.policies)
        self.gateway = QueryGateway(config, node, self.state, self.leader, self.links.send_frame)
        self.desk = ServeDesk(node, self.leader.plan_for, lambda: self.state.plan)
        self._nursery: trio.Nursery | None = None  # for work peers ask of this one
        node.extra_provider = self.published
        node.decode_extra = PeerState.from_obj
        node.on_peer_extra = self._on_peer_extra
        node.on_app_message = self._on_app_message
        endpoint.set_stream_handler(files.PROTOCOL, files.FileServer(store).handle)

    def components(self) -> list[tuple[str, Run]]:
        """Every long-running part, in the order to start them (name, ``run``)."""
        return [
            ("peer requests", self._run_requests),  # first: it takes the peers' asks
            ("links", self.links.run),
            ("kv caches", self.kv.run),
            ("segment loader", self.loader.run),
            ("serve desk", self.desk.run),
            ("leader", self.leader.run),
            ("balancer", self.balancer.run),
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every component in one nursery (for tests; the daemon starts them one by one)."""
        async with trio.open_nursery() as nursery:
            for _name, run in self.components():
                await nursery.start(run)
            task_status.started()

    # -- heartbeat state in and out ------------------------------------------------------------
    def published(self) -> dict[str, Any]:
        """This peer's state for its heartbeats (see :mod:`meshllm.pipeline.peerstate`)."""
        st = self.state
        x: dict[str, Any] = {"models": st.models, "serving": st.state}
        rss = rss_mb()
        if rss is not None:
            x["rss_mb"] = rss
        x.update(self.profiler.extra())
        if self.leader.replan_error:
            x["replan_error"] = self.leader.replan_error
        if st.stage is not None:
            x["stage_stats"] = st.stage.stats()
        if self.balancer.staged is not None:
            x["staged"] = self.balancer.staged.to_obj()
        if self.loader.prepared_epoch:
            x["prepared"] = self.loader.prepared_epoch
        if st.plan is not None:
            x["plan"] = st.plan.to_obj()
        if not self.config.peer.stages:
            x["stages"] = False
        return x

    def _on_peer_extra(self, sender: str, state: PeerState) -> None:
        self.state.poke()
        # Plans (staged or live) are the leader's to make: one published by any other peer
        # (a stale one, a buggy one) is not adopted, except by a leader that finds most of
        # the mesh serving a newer plan than its own (it restarted, or led the smaller side
        # of a partition): one peer alone cannot impose a plan that way.
        if sender != self.node.current_leader():
            if self.node.role == LEADER:
                newer = self.leader.majority_plan()
                if newer is not None:
                    log.info("plan_taken_from_mesh", epoch=newer.epoch)
                    self.state.adopt(newer)
            return
        if state.staged is not None:
            self.loader.prepare(state.staged)
        plan = state.plan
        if plan is not None and plan.epoch > self.state.epoch:
            self.state.adopt(plan)

    def _on_app_message(self, sender: str, body: dict[str, Any]) -> None:
        if self._nursery is None:
            return
        ask = appmsg.decode(body)  # a BadMessage is logged and dropped by the node
        if isinstance(ask, appmsg.ServeAsk):
            self.desk.on_ask(sender, ask)
        elif isinstance(ask, appmsg.ServeReply):
            self.desk.on_reply(sender, ask)
        else:
            spawn(
                self._nursery,
                "profile_request",
                sender,
                self._profile_quietly,
                ask.sha,
                ask.source,
                ask.refresh,
            )

    async def _profile_quietly(self, sha: str, source: str, refresh: bool) -> None:
        with contextlib.suppress(MeshError, OSError, ValueError):
            await self.profiler.profile(sha, source, refresh=refresh)

    async def _run_requests(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Work other peers ask of this one (profiling), and new imports advertised."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                # Models imported while the daemon runs are advertised within seconds.
                await trio.sleep(MODELS_EVERY_S)
                models = await trio.to_thread.run_sync(self.state.local_models)
                if models != self.state.models:
                    self.state.models = models
                    self.node.announce()

    # -- control operations -------------------------------------------------------------------
    async def op_serve(self, args: dict[str, Any]) -> Any:
        model = args.get("model")
        partitioner = args.get("partitioner") or self.config.plan.partitioner
        timeout = args.get("wait_s", 300)
        if not isinstance(model, str) or not model:
            raise ControlError("bad_request", "serve needs args.model (a model name)")
        if not wire.is_name(model):
            raise ControlError("unknown_model", f"no model can be named {wire.show(model)}")
        if not isinstance(partitioner, str):
            raise ControlError("bad_request", "args.partitioner must be a string")
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ControlError("bad_request", "args.wait_s must be a positive number of seconds")
        self.partitioners.get(partitioner)  # unknown names fail here, with the list
        self.state.models = self.state.local_models()
        rid = secrets.token_hex(8)
        balance = args.get("balance") or self.config.balance.policy
        if not isinstance(balance, str):
            raise ControlError("bad_request", "args.balance must be a string")
        self.policies.get(balance)  # unknown names fail here, with the list
        objective = args.get("objective") or self.config.plan.objective
        if objective not in OBJECTIVES:
            raise ControlError("bad_request", f"args.objective must be one of {OBJECTIVES}")
        ask = appmsg.ServeAsk(rid, model, partitioner, objective, balance)
        # The leader may first have every peer profile itself (seconds per peer, once).
        deadline = trio.current_time() + min(float(timeout), 1e6)
        try:
            epoch = await self.desk.ask(ask, deadline - trio.current_time())
        except ServeFailed as exc:
            raise ControlError("plan_failed", str(exc)) from None
        except ServeTimeout:
            raise ControlError(
                "timeout", f"the leader made no plan for {model!r} (is it imported?)"
            ) from None
        # The answer is the plan made for this request (or a later one), once it is here.
        with trio.move_on_after(max(deadline - trio.current_time(), 0.0)):
            while self.state.epoch < epoch:
                await self.state.plan_changed().wait()
            assert self.state.plan is not None
            return {"plan": self.state.plan.to_obj()}
        raise ControlError("timeout", f"plan {epoch} for {model!r} did not reach this peer")

    async def op_profile(self, args: dict[str, Any]) -> Any:
        """Profile every live peer for a model (the one served, by default); their figures."""
        plan = self.state.plan
        model = args.get("model") or (plan.model if plan else None)
        if not isinstance(model, str) or not model:
            raise ControlError("bad_request", "profile needs args.model (nothing is served)")
        refresh = bool(args.get("refresh", False))
        try:
            info, source = self.leader.find_model(model)
        except MeshError as exc:
            raise ControlError("unknown_model", str(exc)) from None
        sha = str(info["sha"])
        peers = self.leader.stage_peers()
        found = await self.leader.gather_profiles(sha, source, peers, refresh=refresh)
        return {
            "model": model,
            "sha": sha,
            "profiles": {p: (found[p].to_obj() if p in found else None) for p in peers},
        }

    # -- status -------------------------------------------------------------------------------
    def _runtime_of(self, pid: str) -> dict[str, Any]:
        """A peer's memory and recent stage figures, as it last published them."""
        if pid == self.me:
            extra = {"rss_mb": rss_mb(), "stage_stats": self.state.stage_stats_of(pid)}
            stages = self.config.peer.stages
        else:
            state = self.state.state_of(pid)
            extra = {"rss_mb": state.rss_mb, "stage_stats": state.stage_stats}
            stages = state.stages
        if not stages:
            extra["stages"] = False  # keeps and serves files, runs no layers
        return {k: v for k, v in extra.items() if v is not None}

    def serving_status(self) -> dict[str, Any]:
        st = self.state
        peers = {self.me: st.state}
        if st.plan is not None:
            for s in st.plan.stages:
                if s.peer != self.me:
                    peers[s.peer] = st.serving_of(s.peer)
        runtime = {pid: self._runtime_of(pid) for pid in sorted({self.me, *peers})}
        stage = st.stage
        return {
            "plan": st.plan.to_obj() if st.plan else None,
            "ready": st.plan_ready(),
            "states": peers,
            "runtime": runtime,
            "models": st.models,
            "stage": None
            if stage is None
            else {
                "index": stage.index,
                "steps": stage.times.steps,
                "compute_s": round(stage.times.compute_s, 3),
                "inner_s": round(stage.inner_s, 3),
                "open_requests": len(stage.runtime.open_requests),
                # Steps started as their frame arrived; of those, run on the link's reader.
                "early_starts": stage.early_starts,
                "on_reader": stage.steps_on_reader,
            },
            "coordinating": self.gateway.coordinator.in_flight,
            "profile": None if self.profiler.latest is None else self.profiler.latest.to_obj(),
            "profiles": self._plan_profiles(),
            "balancer": self.balancer.status or None,
            "profiling": sorted(self.profiler.busy),
        }

    def _plan_profiles(self) -> dict[str, Any]:
        """Every live peer's profile for the planned model, as heard on heartbeats."""
        plan = self.state.plan
        if plan is None:
            return {}
        out = {}
        for pid in sorted([self.me, *self.node.alive_peers()]):
            prof = self.profiler.profile_of(pid, plan.model_sha)
            if prof is not None:
                out[pid] = prof.to_obj()
        return out
