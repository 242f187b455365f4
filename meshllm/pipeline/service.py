"""Serving on one peer: plans, loading this peer's segment, the activation pipeline, queries.

What rides on heartbeats (small, re-sent, so loss costs nothing):
  ``models``  models imported here: name -> {sha, layers}
  ``plan``    the newest plan this peer knows (the leader makes plans; peers adopt the highest
              epoch they hear of)
  ``serving`` this peer's state for that plan: fetching / loading / ready / error, progress

Data plane: protocol ``act`` carries activation frames, one persistent stream per next hop,
read by a dedicated task per inbound stream into the stage's bounded queue.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import structlog
import trio

from meshllm import wire
from meshllm.balance import Decision, Observation, StageObservation
from meshllm.config import OBJECTIVES, Config
from meshllm.control.protocol import ControlError
from meshllm.errors import MeshError, PromptTooLong
from meshllm.mesh.contain import contain_sync, report, spawn, supervised
from meshllm.mesh.framing import BlockingFrameReader, FrameError, FrameReader, frame
from meshllm.mesh.node import LEADER, MeshNode
from meshllm.mesh.transport import Endpoint, PeerUnreachable, Stream
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.model.sampling import SamplingParams
from meshllm.model.store import ModelStore
from meshllm.model.tokenizer import ChatTokenizer, TextStream
from meshllm.pipeline import appmsg, files, kvmove
from meshllm.pipeline.coordinator import Coordinator, OnToken, QueryFailed, QueryResult
from meshllm.pipeline.frames import (
    ERROR,
    FWD,
    TOKEN,
    BadFrame,
    Frame,
    KVSource,
    bounce,
    decode_frame,
    encode_frame,
)
from meshllm.pipeline.peerstate import PeerState
from meshllm.pipeline.plan import Plan, PlanError, Stage
from meshllm.pipeline.profiling import Profiler, partition_request, predict, slowed
from meshllm.pipeline.serve_desk import ServeDesk, ServeFailed, ServeTimeout
from meshllm.pipeline.stage import StageRunner, sampling_from
from meshllm.pipeline.stall import StageView, first_unready, why_stalled
from meshllm.plan.profile import MiB, resident_bytes
from meshllm.plugins import BalancingPolicyRegistry, PartitionerRegistry, get_plugin_manager

ACT_PROTOCOL = "act"
log = structlog.get_logger("meshllm.serve")


_NO_STATE = PeerState()
EPOCH_LEAP = 1 << 20  # how far ahead of this peer's plan another's epoch may credibly be


class ReadyModel(NamedTuple):
    """The served model, ready to answer: its name and its tokenizer (chat template)."""

    name: str
    tokenizer: ChatTokenizer


def _rss_mb() -> float | None:
    rss = resident_bytes()
    return None if rss is None else round(rss / MiB, 1)


@dataclass
class _Prefetch:
    until: float  # released then
    done: trio.Event = field(default_factory=trio.Event)
    caches: kvmove.Caches = field(default_factory=dict)


class _Link:
    """The persistent activation stream to one peer; writes are serialised."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.lock = trio.Lock()


class ServingService:
    def __init__(self, home: Path, config: Config, endpoint: Endpoint, node: MeshNode):
        self.home = home
        self.config = config
        self.endpoint = endpoint
        self.node = node
        self.me = endpoint.peer_id
        self.store = ModelStore(home / "models")
        self.partitioners = PartitionerRegistry(get_plugin_manager())
        self.plan: Plan | None = None
        self.state: dict[str, Any] = {"epoch": 0, "state": "idle"}
        self.stage: StageRunner | None = None
        # One thread per incoming fast link, apart from to_thread's default limit.
        self._link_readers = trio.CapacityLimiter(1024)
        self.meta_dir: Path | None = None
        self.manifest: Manifest | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._links: dict[str, _Link] = {}
        self._models = self._local_models()
        self.coordinator = Coordinator(
            self.me, self.send_frame, config.mesh.step_timeout_s,
            current_epoch=lambda: self.plan.epoch if self.plan else 0,
            next_plan=self._next_plan,
            peer_alive=node.peer_alive if config.mesh.move_kv else None,
            why_stalled=lambda plan: why_stalled(plan, self._stage_view),
        )  # fmt: skip
        # Runtimes of plans this peer no longer serves, kept a while with their requests'
        # KV caches for the new plan's stages to fetch: epoch -> (runtime, keep until).
        self._retired: dict[int, tuple[Any, float]] = {}
        # What this peer prefetched of an old plan's caches for its new stage, by old epoch.
        self._prefetch: dict[int, _Prefetch] = {}
        self._replaced: Plan | None = None  # the plan the current one replaced
        # The leader's last failure to replace a plan that lost a peer: {epoch, error}.
        self._replan_error: dict[str, Any] | None = None
        # Balancing (leader): measured slowdowns that later plans keep accounting for, and
        # what the balancer saw and decided last (for status).
        self.policies = BalancingPolicyRegistry(get_plugin_manager())
        self._speed_factors: dict[str, float] = {}
        self.balancer: dict[str, Any] = {}
        # Staging (see _rebalance): the plan the leader is preparing, and this peer's part.
        self._staged: Plan | None = None
        self._prepared: tuple[int, LayerRange, Any, Path] | None = None
        self._preparing = 0
        self._prepared_epoch = 0
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # for reader threads' callbacks
        self._realize_scope: trio.CancelScope | None = None
        self._stage_scope: trio.CancelScope | None = None
        self._plan_changed = trio.Event()
        self._news = trio.Event()
        self.profiler = Profiler(home, config, endpoint, node, self.store)
        self.desk = ServeDesk(node, self._plan_for, lambda: self.plan)
        node.extra_provider = self._extra
        node.decode_extra = PeerState.from_obj
        node.on_peer_extra = self._on_peer_extra
        node.on_app_message = self._on_app_message
        endpoint.set_stream_handler(ACT_PROTOCOL, self._on_act_stream)
        endpoint.set_stream_handler(kvmove.KV_PROTOCOL, self._on_kv_stream)
        endpoint.set_stream_handler(files.PROTOCOL, files.FileServer(self.store).handle)

    # -- state on heartbeats ------------------------------------------------------------------
    def _local_models(self) -> dict[str, dict[str, Any]]:
        return {
            m.name: {"sha": m.manifest.model_sha256, "layers": m.manifest.architecture.num_layers}
            for m in self.store.list()
        }

    def _extra(self) -> dict[str, Any]:
        x: dict[str, Any] = {"models": self._models, "serving": self.state}
        rss = _rss_mb()
        if rss is not None:
            x["rss_mb"] = rss
        x.update(self.profiler.extra())
        if self._replan_error:
            x["replan_error"] = self._replan_error
        if self.stage is not None:
            x["stage_stats"] = self.stage.stats()
        if self._staged is not None:
            x["staged"] = self._staged.to_obj()
        if self._prepared_epoch:
            x["prepared"] = self._prepared_epoch
        if self.plan is not None:
            x["plan"] = self.plan.to_obj()
        return x

    def _poke(self) -> None:
        """Wake whoever waits for the serving state to change (a plan, a peer's state)."""
        self._news.set()
        self._news = trio.Event()

    def _state_of(self, peer: str | None) -> PeerState:
        """What *peer* last published (empty if nothing yet)."""
        state = self.node.state_of(peer)
        return state if isinstance(state, PeerState) else _NO_STATE

    def _on_peer_extra(self, sender: str, state: PeerState) -> None:
        self._poke()
        # Plans (staged or live) are the leader's to make: one published by any other peer
        # (a stale one, a buggy one) is not adopted, except by a leader that finds most of
        # the mesh serving a newer plan than its own (it restarted, or led the smaller side
        # of a partition): one peer alone cannot impose a plan that way.
        if sender != self.node.current_leader():
            if self.node.role == LEADER:
                newer = self._majority_plan()
                if newer is not None:
                    log.info("plan_taken_from_mesh", epoch=newer.epoch)
                    self._adopt(newer)
            return
        staged = state.staged
        if staged is not None and self._nursery:
            current = self.plan.epoch if self.plan else 0
            if staged.epoch > current and staged.epoch != self._preparing:
                spawn(self._nursery, "prepare_plan", sender, self._prepare, staged)
        plan = state.plan
        if plan is not None and (self.plan is None or plan.epoch > self.plan.epoch):
            self._adopt(plan)

    def _set_state(self, state: str, **extra: Any) -> None:
        epoch = self.plan.epoch if self.plan else 0
        self.state = {"epoch": epoch, "state": state, **extra}
        self.node.announce()
        self._poke()

    # -- plans --------------------------------------------------------------------------------
    def _on_app_message(self, sender: str, body: dict[str, Any]) -> None:
        if self._nursery is None:
            return
        ask = appmsg.decode(body)  # a BadMessage is logged and dropped by the node
        if isinstance(ask, appmsg.ServeAsk):
            self.desk.on_ask(sender, ask)
        elif isinstance(ask, appmsg.ServeReply):
            self.desk.on_reply(sender, ask)
        else:
            spawn(self._nursery, "profile_request", sender, self._profile_quietly, ask.sha,
                  ask.source, ask.refresh)  # fmt: skip

    async def _profile_quietly(self, sha: str, source: str, refresh: bool) -> None:
        with contextlib.suppress(MeshError, OSError, ValueError):
            await self.profiler.profile(sha, source, refresh=refresh)

    async def _plan_for(self, ask: appmsg.ServeAsk) -> int:
        """Leader: make and publish the plan a serve request asks for; its epoch (raises
        MeshError with the reason when none can be made)."""
        # An explicit serve starts afresh: slowdowns measured under an earlier plan may
        # have passed (the phone cooled down, the other app closed).
        self._speed_factors = {}
        # A model imported a moment ago is advertised within a couple of heartbeats: retry
        # for a few seconds before giving up. A plan that cannot exist (the model does not
        # fit) is not retried.
        for attempt in range(12):
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
                if attempt == 11:
                    raise
            await trio.sleep(0.5)
        raise AssertionError("unreachable")

    def _find_model(self, model: str) -> tuple[dict[str, Any], str]:
        """(facts, source peer) of a model imported on some live peer."""
        self._models = self._local_models()
        found = self._imported().get(model)
        if found is None:
            raise MeshError(f"no live peer has imported a model named {model!r}")
        info, holders = found
        return info, holders[0]

    def _imported(self) -> dict[str, tuple[dict[str, Any], list[str]]]:
        """Models imported on live peers, as last advertised: name -> (facts, holders), this
        peer first among the holders."""
        found: dict[str, tuple[dict[str, Any], list[str]]] = {
            name: (info, [self.me]) for name, info in self._models.items()
        }
        for pid in self.node.alive_peers():
            for name, facts in self._state_of(pid).models.items():
                found.setdefault(name, (facts.to_obj(), []))[1].append(pid)
        return found

    def model_names(self) -> list[str]:
        """Every model imported on a live peer (served or not), by name."""
        return sorted(self._imported())

    def served_model(self) -> str | None:
        """The model of the current plan, ready or not."""
        return self.plan.model if self.plan is not None else None

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
                    await trio.sleep(0.1)
        missing = [p for p in peers if p not in found]
        if missing:
            log.warning("profiles_missing", peers=missing)
        return found

    async def make_plan(
        self,
        model: str,
        partitioner: str,
        objective: str | None = None,
        balance: str | None = None,
    ) -> Plan:
        """Leader only: assign the model's layers to the live peers and publish the plan."""
        plan, _ctx = await self._build_plan(model, partitioner, objective, balance)
        self._adopt(plan)
        return plan

    async def _build_plan(
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
        info, source = self._find_model(model)
        sha = str(info["sha"])
        workers = sorted([self.me, *self.node.alive_peers()])
        impl = self.partitioners.get(partitioner)
        manifest = Manifest.read(await self.profiler.meta_dir(sha, source))
        ends = await self.profiler.end_bytes(sha, source)
        # Profiles cost a few seconds once per model; they are skipped where nothing uses
        # them (a partitioner that ignores them, and no balancer that would re-plan).
        if getattr(impl, "uses_profiles", False) or balance != "none":
            profiles = await self.gather_profiles(sha, source, workers, refresh=False)
        else:  # what is known already still predicts the plan's speed
            known = {w: self.profiler.profile_of(w, sha) for w in workers}
            profiles = {w: p for w, p in known.items() if p is not None}
            if len(profiles) != len(workers):
                profiles = {}
        factors = self._speed_factors if factors is None else factors
        profiles = {w: slowed(p, factors.get(w, 1.0)) for w, p in profiles.items()}
        request = partition_request(workers, profiles, manifest, ends, config)
        from meshllm.plan import Infeasible

        try:
            assignment = await trio.to_thread.run_sync(
                self.partitioners.assign, partitioner, request
            )
        except Infeasible as exc:
            raise PlanError(f"cannot serve {model} on these {len(workers)} peers: {exc}") from None
        stages = tuple(Stage(w, r.start, r.stop) for w, r in zip(workers, assignment, strict=True)
                       if r is not None)  # fmt: skip
        ctx = (workers, profiles, manifest, ends, config)
        predicted = predict(*ctx, stages) if profiles else None
        epoch = max(self.plan.epoch if self.plan else 0, self._max_epoch_seen()) + 1
        plan = Plan(
            epoch=epoch, model=model, model_sha=sha, source=source,
            num_layers=int(info["layers"]), partitioner=partitioner, stages=stages,
            predicted=predicted, balance=balance,
        )  # fmt: skip
        log.info("plan_made", epoch=epoch, model=model, stages=[str(s.range) for s in plan.stages],
                 predicted_step_ms=None if predicted is None else
                 round(predicted["step_s"] * 1e3, 2))  # fmt: skip
        return plan, ctx

    def _majority_plan(self) -> Plan | None:
        """A plan newer than this peer's that most of the live peers publish, if any."""
        others = self.node.alive_peers()
        seen: list[tuple[Plan, int]] = []  # plans are not hashable (predicted is a dict)
        for pid in others:
            plan = self._state_of(pid).plan
            if plan is None or (self.plan is not None and plan.epoch <= self.plan.epoch):
                continue
            i = next((i for i, (p, _) in enumerate(seen) if p == plan), None)
            if i is None:
                seen.append((plan, 1))
            else:
                seen[i] = (plan, seen[i][1] + 1)
        best = max(seen, key=lambda pc: pc[1], default=None)
        return best[0] if best is not None and 2 * best[1] > len(others) else None

    def _max_epoch_seen(self) -> int:
        """The newest plan epoch any peer publishes, so a new plan's is higher still. One far
        ahead of this peer's own (a peer publishing epoch 2**62 - 1 would leave no epoch
        that decodes) is not credible and not counted."""
        mine = self.plan.epoch if self.plan else 0
        best = 0
        for pid in list(self.node.peers):  # dead ones too: a plan they made may come back
            plan = self._state_of(pid).plan
            if plan is not None and plan.epoch <= mine + EPOCH_LEAP:
                best = max(best, plan.epoch)
        return best

    def _adopt(self, plan: Plan) -> None:
        if self.plan is not None and self.plan.epoch < plan.epoch:
            self._replaced = self.plan
        self.plan = plan
        self._plan_changed.set()
        self._plan_changed = trio.Event()
        self._poke()
        log.info("plan_adopted", epoch=plan.epoch, stage=plan.stage_of(self.me))
        if self._realize_scope is not None:
            self._realize_scope.cancel()
        if self._nursery is not None:
            spawn(self._nursery, "realize_plan", plan.source, self._realize, plan)

    async def _realize(self, plan: Plan) -> None:
        """Get this peer's files for *plan*, load its segment, start its stage."""
        with trio.CancelScope() as scope:
            self._realize_scope = scope
            delay = 1.0
            while True:
                try:
                    await self._realize_inner(plan)
                    return
                except Exception as exc:
                    # Often transient (the source not connected yet): retry until a new plan.
                    # Files a source sent that do not load (a tokenizer ONNX Runtime or the
                    # tokenizers library refuses) fail the same way, never the daemon.
                    report(exc, "plan_load", plan.source)
                    self._set_state("error", detail=f"{type(exc).__name__}: {exc}"[:1000])
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _realize_inner(self, plan: Plan) -> None:
        if self.stage is not None and self.stage.epoch != plan.epoch:
            self.stage.keep_caches = True
            keep = trio.current_time() + kvmove.RETIRED_KEEP_S
            self._retired[self.stage.epoch] = (self.stage.runtime, keep)
        if self._stage_scope is not None:
            self._stage_scope.cancel()
            self._stage_scope = None
        self.stage = None
        self._set_state("fetching", progress=0.0)
        local = self.store.by_sha(plan.model_sha)
        manifest = self.manifest
        if manifest is None or manifest.model_sha256 != plan.model_sha or self._tokenizer is None:
            meta_dir = await files.meta_dir(
                self.endpoint, self.home, self.store, plan.model_sha, plan.source
            )
            manifest = Manifest.read(meta_dir)
            self._tokenizer = await trio.to_thread.run_sync(ChatTokenizer, meta_dir)
            self.meta_dir, self.manifest = meta_dir, manifest
        # else: a new plan for the same model (a rebalance); its files are here already.
        idx = plan.stage_of(self.me)
        if idx is None:
            self._set_state("ready", role="coordinator")
            return
        st = plan.stages[idx]
        r = LayerRange(st.start, st.stop)
        prepared = self._prepared
        if prepared is not None and prepared[0] == plan.epoch and prepared[1] == r:
            # Staged by the balancer while the previous plan was still serving.
            runtime, seg_path = prepared[2], prepared[3]
        else:
            seg_path = await self._segment_path(plan, r, local, report=True)
            self._set_state("loading")
            runtime = await self._load_runtime(seg_path, manifest)
        self._prepared = None
        nxt = plan.stages[idx + 1].peer if idx + 1 < len(plan.stages) else None
        stage = StageRunner(
            runtime, epoch=plan.epoch, index=idx, next_peer=nxt, first_peer=plan.stages[0].peer,
            context_length=manifest.architecture.context_length,
            eos_token_ids=manifest.architecture.eos_token_ids, send=self.send_frame,
            max_requests=self.config.limits.max_concurrent_requests, fetch_kv=self._fetch_kv,
            send_now=self._send_now, max_batch=self.config.limits.max_batch,
        )  # fmt: skip
        assert self._nursery is not None
        self._stage_scope = trio.CancelScope()
        spawn(self._nursery, "stage", None, self._run_stage, stage, self._stage_scope)
        self.stage = stage
        old = self._replaced
        if self.config.mesh.move_kv and old is not None and old.model_sha == plan.model_sha:
            spawn(self._nursery, "prefetch_kv", None, self._prefetch_kv, old, plan.epoch,
                  runtime.layers)  # fmt: skip
        seg_bytes = (seg_path.parent / "segment.onnx.data").stat().st_size
        self._set_state("ready", layers=str(r), segment_bytes=seg_bytes)

    async def _segment_path(self, plan: Plan, r: LayerRange, local: Any, *, report: bool) -> Path:
        """This peer's segment files for *r*: cut from the local model, or fetched."""
        if local is not None:
            ((seg_path, _),) = await trio.to_thread.run_sync(local.segment_files, [r])
            return seg_path
        seg_dir = files.cache_dir(self.home, plan.model_sha) / "segments" / str(r)
        total: dict[str, tuple[int, int]] = {}

        def progress(name: str):  # type: ignore[no-untyped-def]
            def on_bytes(done: int, size: int) -> None:
                if not report:
                    return
                total[name] = (done, size)
                d = sum(x[0] for x in total.values())
                t = sum(x[1] for x in total.values())
                self.state["progress"] = round(d / t, 3) if t else 0.0
                self.state["bytes"] = d

            return on_bytes

        for name in files.SEGMENT_FILES:
            req = files.FileRequest(plan.model_sha, "segment", name, r.start, r.stop)
            await files.fetch_file(self.endpoint, plan.source, req, seg_dir / name, progress(name))
        return seg_dir / "segment.onnx"

    async def _load_runtime(self, seg_path: Path, manifest: Manifest) -> Any:
        from meshllm.model.runtime import SegmentRuntime

        threads = self.config.peer.threads
        return await trio.to_thread.run_sync(
            lambda: SegmentRuntime(
                seg_path, manifest.architecture, manifest.kv_names, threads=threads
            )
        )

    async def _prepare(self, plan: Plan) -> None:
        """Fetch and load this peer's part of a staged plan, the current one still serving."""
        if self._preparing == plan.epoch:
            return
        self._preparing = plan.epoch
        try:
            idx = plan.stage_of(self.me)
            if idx is not None and self.manifest is not None:
                st = plan.stages[idx]
                r = LayerRange(st.start, st.stop)
                local = self.store.by_sha(plan.model_sha)
                seg_path = await self._segment_path(plan, r, local, report=False)
                runtime = await self._load_runtime(seg_path, self.manifest)
                self._prepared = (plan.epoch, r, runtime, seg_path)
            self._prepared_epoch = plan.epoch
            self.node.announce()
        except Exception as exc:  # as in _realize: whatever the files were, only this fails
            report(exc, "prepare_plan", plan.source)
            self._preparing = 0

    @staticmethod
    async def _run_stage(stage: StageRunner, scope: trio.CancelScope) -> None:
        with scope:
            await stage.run()

    def plan_ready(self) -> bool:
        plan = self.plan
        if plan is None or self.manifest is None:
            return False
        for s in plan.stages:
            state = self.state if s.peer == self.me else self._peer_state(s.peer)
            if state.get("epoch") != plan.epoch or state.get("state") != "ready":
                return False
        return True

    def _stage_view(self, pid: str) -> StageView:
        if pid == self.me:
            stats = self.stage.stats() if self.stage is not None else None
            return StageView(self.node.name or pid[-8:], True, self.state, stats)
        rec = self.node.peers.get(pid)
        name = rec.name if rec is not None and rec.name else pid[-8:]
        state = self._state_of(pid)
        return StageView(name, self.node.peer_alive(pid), state.serving, state.stage_stats,
                         rec.state_refused if rec is not None else None)  # fmt: skip

    def _peer_state(self, pid: str) -> dict[str, Any]:
        if not self.node.peer_alive(pid):
            return {}
        return self._state_of(pid).serving

    # -- data plane ---------------------------------------------------------------------------
    async def send_frame(self, peer: str, f: Frame) -> None:
        if peer == self.me:
            self._dispatch(f)
            return
        link = self._links.get(peer)
        if link is None:
            # Frames name their coordinator: only a known peer gets a link (and a place in
            # this map, which would otherwise grow with every id a frame made up).
            if not (self.endpoint.is_connected(peer) or self.node.peer_alive(peer)):
                raise PeerUnreachable(f"{peer} is not a connected member of the mesh")
            link = self._links[peer] = _Link()
        data = frame(encode_frame(f))
        # Uncontended (the usual case) the lock is taken without a trip through the scheduler.
        if link.lock.locked():
            await link.lock.acquire()
        else:
            link.lock.acquire_nowait()
        try:
            # An established stream that breaks while its peer is still heard from gets one
            # fresh stream: the receiver drops a half-read frame with the old one, so the
            # frame arrives once.
            for again in (True, False):
                fresh = link.stream is None
                try:
                    if link.stream is None:
                        link.stream = await self.endpoint.open_stream(peer, ACT_PROTOCOL)
                    with trio.fail_after(self.config.mesh.handshake_timeout_s * 5):
                        await link.stream.write(data)
                    return
                except (PeerUnreachable, trio.TooSlowError) as exc:
                    if link.stream is not None:
                        await link.stream.close()
                    link.stream = None
                    if again and not fresh and self.node.peer_alive(peer):
                        log.info("activation_link_reopened", other=peer, reason=str(exc))
                        continue
                    raise PeerUnreachable(f"activation link to {peer} failed: {exc}") from None
        finally:
            link.lock.release()

    def _send_now(self, peer: str, f: Frame) -> bool:
        """On a stage's compute thread: put *f* on the open fast link to *peer* at once.

        False (nothing sent) when there is no such link yet, the peer is this one, or the
        link is busy; the stage then sends through send_frame as usual.
        """
        if peer == self.me:
            return False
        link = self._links.get(peer)
        send_now = getattr(link.stream, "send_now", None) if link is not None else None
        if send_now is None:
            return False
        return bool(send_now(frame(encode_frame(f))))

    def _dispatch(self, f: Frame) -> None:
        if f.kind in (TOKEN, ERROR):
            self.coordinator.deliver(f)
            return
        stage = self.stage
        if stage is None or stage.epoch != f.epoch:
            if f.kind == FWD and self._nursery is not None:
                reason = "this peer serves no stage of that plan (plan changed?)"
                err = Frame(kind=ERROR, rid=f.rid, epoch=f.epoch, step=f.step, error=reason,
                            retry=True)  # fmt: skip
                self._nursery.start_soon(self._send_quietly, f.coord, err)
            return
        if not stage.submit(f) and f.kind == FWD and self._nursery is not None:
            err = Frame(kind=ERROR, rid=f.rid, epoch=f.epoch, step=f.step, error="stage overloaded")
            self._nursery.start_soon(self._send_quietly, f.coord, err)

    async def _send_quietly(self, peer: str, f: Frame) -> None:
        with contextlib.suppress(MeshError):
            await self.send_frame(peer, f)

    async def _on_act_stream(self, stream: Stream) -> None:
        if getattr(stream, "read_blocking", None) is not None:
            await self._read_on_thread(stream)
            return
        reader = FrameReader(stream.read, self.config.limits.max_frame_mb << 20)
        while True:
            try:
                data = await reader.read_frame()
            except (EOFError, PeerUnreachable, FrameError) as exc:
                self._link_ended(exc, stream.peer_id)
                return
            f = self._decode(data, stream.peer_id)
            if f is not None:
                self._dispatch(f)

    @staticmethod
    def _link_ended(exc: Exception, peer_id: str) -> None:
        if isinstance(exc, FrameError):  # the others are a link's normal ends
            log.warning("act_stream_dropped", other=peer_id, reason=str(exc))

    def _decode(self, data: bytes, peer_id: str) -> Frame | None:
        """The frame *data* holds; None when it does not decode (on the event loop or on a
        link's reader thread), its coordinator then told why when that can be read."""
        try:
            return decode_frame(data)
        except BadFrame as exc:
            log.warning("frame_dropped", other=peer_id, reason=str(exc))
            back = bounce(data, str(exc))
            if back is not None and self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(contain_sync, "bounce", peer_id, self._bounce, *back)
            return None

    def _bounce(self, coord: str, err: Frame) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, coord, err)

    async def _read_on_thread(self, stream: Any) -> None:
        """Read a fast link on a thread of its own (see StageRunner.run_here): a decode
        frame for an idle stage is run there and then, without the event loop."""
        token = trio.lowlevel.current_trio_token()
        stop = threading.Event()
        try:
            await trio.to_thread.run_sync(
                self._read_frames, stream, token, stop,
                abandon_on_cancel=True, limiter=self._link_readers,
            )  # fmt: skip
        finally:
            stop.set()

    def _read_frames(self, stream: Any, token: trio.lowlevel.TrioToken, stop: Any) -> None:
        reader = BlockingFrameReader(
            lambda n: stream.read_blocking(n, stop), self.config.limits.max_frame_mb << 20
        )
        try:
            while True:
                try:
                    data = reader.read_frame()
                except (EOFError, PeerUnreachable, FrameError) as exc:
                    self._link_ended(exc, stream.peer_id)
                    return
                f = self._decode(data, stream.peer_id)
                if f is None:
                    continue
                stage = self.stage
                if f.kind == FWD and stage is not None and stage.run_here(f, token):
                    continue
                try:
                    # Contained: raised in a callback, it would take the event loop down.
                    token.run_sync_soon(contain_sync, "act_frame", stream.peer_id,
                                        self._dispatch, f)  # fmt: skip
                except trio.RunFinishedError:
                    return
        finally:
            stream.close_reader()

    # -- moving KV caches to a new plan (see kvmove) -------------------------------------------
    def _kv_runtime(self, epoch: int) -> Any:
        stage = self.stage
        if stage is not None and stage.epoch == epoch:
            return stage.runtime
        kept = self._retired.get(epoch)
        return None if kept is None else kept[0]

    async def _on_kv_stream(self, stream: Stream) -> None:
        await kvmove.serve(stream, self._kv_runtime)

    def _kv_layout(self) -> kvmove.Layout:
        if self.manifest is None:
            raise kvmove.KVMoveFailed("no model loaded")
        arch = self.manifest.architecture
        return kvmove.Layout(arch.num_key_value_heads, arch.head_size, np.dtype(arch.kv_dtype),
                             arch.context_length)  # fmt: skip

    async def _fetch_kv(self, f: Frame, layers: list[int]) -> dict[int, Any]:
        src = f.kv_from
        assert src is not None
        t = time.perf_counter()
        how = "fetched"
        try:
            kv = await self._prefetched(src, f.rid, layers)
            if kv is not None:
                how = "prefetched"
            else:
                kv = await kvmove.fetch(self.endpoint, self.me, self._kv_runtime, src, f.rid,
                                        layers, self._kv_layout())  # fmt: skip
        except MeshError:
            raise
        except Exception as exc:  # a bug here must cost a replay, not the daemon
            log.exception("kv_move_bug", rid=f.rid[:8])
            raise kvmove.KVMoveFailed(f"moving the KV cache failed: {exc!r}") from None
        log.info("kv_moved", rid=f.rid[:8], layers=f"{layers[0]}-{layers[-1] + 1}", how=how,
                 positions=src.length, ms=round(1000 * (time.perf_counter() - t), 1))  # fmt: skip
        return kv

    async def _prefetched(self, src: KVSource, rid: str, layers: list[int]) -> Any:
        """The request's cache from this peer's prefetch of plan ``src.epoch``'s caches (waited
        for if still running), cut to ``src.length`` positions; None if it lacks them."""
        job = self._prefetch.get(src.epoch)
        if job is None:
            return None
        with trio.move_on_after(kvmove.FETCH_TIMEOUT_S):
            await job.done.wait()
        held = job.caches.get(rid)
        if held is None or held[0] < src.length or sorted(held[1]) != layers:
            return None
        n = src.length
        return {layer: (k[:, :, :n], v[:, :, :n]) for layer, (k, v) in held[1].items()}

    async def _prefetch_kv(self, old: Plan, epoch: int, layers: list[int]) -> None:
        """Right after taking a stage of plan *epoch*: pull every cache the old plan's stages
        hold for this stage's layers, while the coordinators notice the change."""
        job = _Prefetch(until=trio.current_time() + kvmove.RETIRED_KEEP_S)
        self._prefetch[old.epoch] = job
        t = time.perf_counter()
        try:
            job.caches = await kvmove.prefetch(
                self.endpoint, self.me, self._kv_runtime, old.epoch, old.stage_triples, layers,
                self._kv_layout(),
            )  # fmt: skip
            log.info("kv_prefetched", epoch=epoch, requests=len(job.caches),
                     ms=round(1000 * (time.perf_counter() - t), 1))  # fmt: skip
        except MeshError as exc:
            log.info("kv_prefetch_failed", epoch=epoch, reason=str(exc))
        except Exception:  # the requests then fetch their caches one by one
            log.exception("kv_prefetch_bug", epoch=epoch)
        finally:
            job.done.set()

    def _release_retired(self) -> None:
        now = trio.current_time()
        for epoch, (_, until) in list(self._retired.items()):
            if now >= until:
                del self._retired[epoch]
        for epoch, job in list(self._prefetch.items()):
            if now >= job.until:
                del self._prefetch[epoch]

    # -- surviving lost peers -----------------------------------------------------------------
    async def _watch_plan(self) -> None:
        """Leader: replace a plan one of whose stages' peers is gone, until that works."""
        last_try = -float("inf")
        while True:
            await trio.sleep(0.2)
            plan = self.plan
            if plan is None or self.node.role != LEADER:
                continue
            alive = {self.me, *self.node.alive_peers()}
            lost = [s.peer for s in plan.stages if s.peer not in alive]
            if not lost or trio.current_time() - last_try < 2.0:
                continue
            last_try = trio.current_time()
            log.warning("plan_lost_peers", epoch=plan.epoch, peers=lost)
            objective = (plan.predicted or {}).get("objective")
            try:
                await self.make_plan(plan.model, plan.partitioner, objective, plan.balance)
                self._replan_error = None
            except MeshError as exc:
                # Not enough peers (or the model's source is gone): say why on heartbeats,
                # so queries fail with the reason; retried while peers come and go.
                self._replan_error = {"epoch": plan.epoch, "error": str(exc)}
                log.warning("replan_failed", epoch=plan.epoch, reason=str(exc))
            self.node.announce()

    def _replan_failure(self, epoch: int) -> str | None:
        leader = self.node.current_leader()
        if leader == self.me:
            err = self._replan_error
            mine = (err["epoch"], str(err["error"])) if err else None
        else:
            mine = self._state_of(leader).replan_error
        return mine[1] if mine is not None and mine[0] == epoch else None

    async def _next_plan(self, after: int, reason: str) -> Plan:
        """For an interrupted query: the next plan once every stage of it is ready."""
        log.info("query_interrupted", epoch=after, reason=reason)
        timeout = self.config.mesh.recovery_timeout_s
        # A link can break with every peer alive (a stream reset under load). Once a dead
        # peer would have been noticed, a plan still current and ready is retried as is.
        mesh = self.config.mesh
        same_plan_after = trio.current_time() + mesh.dead_after_s + 2 * mesh.heartbeat_interval_s
        with trio.move_on_after(timeout):
            while True:
                plan = self.plan
                if plan is not None and self.plan_ready():
                    if plan.epoch > after:
                        return plan
                    if plan.epoch == after and trio.current_time() >= same_plan_after:
                        log.info("query_retry_same_plan", epoch=after)
                        return plan
                why = self._replan_failure(after)
                if why is not None:
                    raise QueryFailed(f"{reason}; the mesh cannot go on: {why}")
                # Woken by every heartbeat: a stage's "ready" counts as soon as it is heard.
                with trio.move_on_after(0.2):
                    await self._news.wait()
        raise QueryFailed(f"{reason}; no new plan was ready within {timeout:g} s")

    # -- runtime balancing ---------------------------------------------------------------------
    def _observe(self, plan: Plan, age_s: float) -> Observation | None:
        stages = []
        for st in plan.stages:
            if st.peer == self.me:
                raw: Any = self.stage.stats() if self.stage is not None else None
            else:
                raw = self._state_of(st.peer).stage_stats
            if not isinstance(raw, dict) or raw.get("epoch") != plan.epoch:
                return None
            try:
                stages.append(StageObservation(
                    peer=st.peer, start=st.start, stop=st.stop, steps=int(raw["steps"]),
                    baseline_s=float(raw["baseline_s"]), recent_s=float(raw["recent_s"]),
                ))  # fmt: skip
            except (KeyError, TypeError, ValueError):
                return None
        cfg = self.config.balance
        return Observation(epoch=plan.epoch, age_s=age_s, stages=tuple(stages),
                           slowdown_threshold=cfg.slowdown, min_steps=cfg.min_steps)  # fmt: skip

    async def _balance_loop(self) -> None:
        """Leader: ask the plan's balancing policy about the stages; re-plan when it says so."""
        cfg = self.config.balance
        epoch, live_since, last_change = 0, 0.0, -float("inf")
        # A policy's verdict must repeat over consecutive looks (0.75 s) before layers move:
        # one noisy stretch on a busy device is not a slowdown.
        streak: tuple[frozenset[str], int] = (frozenset(), 0)
        while True:
            await trio.sleep(0.25)
            plan = self.plan
            if plan is None or self.node.role != LEADER or plan.balance == "none":
                continue
            now = trio.current_time()
            if plan.epoch != epoch:
                epoch, live_since = plan.epoch, now
            obs = self._observe(plan, now - live_since) if self.plan_ready() else None
            if obs is None:
                continue
            self.balancer.update(policy=plan.balance, epoch=plan.epoch,
                                 slowdowns={p[-8:]: round(f, 3) for p, f in
                                            obs.relative_slowdowns().items()},
                                 speed_factors=dict(self._speed_factors))  # fmt: skip
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
            if streak[1] < 3:
                continue
            streak = (frozenset(), 0)
            if await self._rebalance(plan, decision):
                last_change = trio.current_time()

    async def _rebalance(self, plan: Plan, decision: Decision) -> bool:
        """Re-plan with *decision*'s slowdowns; adopt when the predicted gain is worth it."""
        factors = dict(self._speed_factors)
        for peer, f in decision.factors.items():
            factors[peer] = factors.get(peer, 1.0) * f
        objective = (plan.predicted or {}).get("objective") or self.config.plan.objective
        metric = "bottleneck_s" if objective == "throughput" else "step_s"
        try:
            # Moving layers is the optimiser's job whatever split the plan started from.
            candidate, ctx = await self._build_plan(
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
        self._staged = candidate
        self.node.announce()
        spawn(self._nursery, "prepare_plan", None, self._prepare, candidate)  # type: ignore[arg-type]
        peers = {st.peer for st in candidate.stages}
        with trio.move_on_after(120):
            while not all(self._peer_prepared(p) >= candidate.epoch for p in peers):
                await trio.sleep(0.1)
        self._staged = None
        if self.plan is not plan or candidate.epoch <= self._max_epoch_seen():
            self._decided(plan, decision, "dropped", reason="the plan changed while staging")
            return False
        self._speed_factors = factors
        self._decided(plan, decision, "replanned", gain=gain, epoch=candidate.epoch,
                      staged_s=trio.current_time() - t0,
                      stages=[str(st.range) for st in candidate.stages])  # fmt: skip
        self._adopt(candidate)
        return True

    def _peer_prepared(self, peer: str) -> int:
        if peer == self.me:
            return self._prepared_epoch
        return self._state_of(peer).prepared

    def _decided(self, plan: Plan, decision: Decision, outcome: str, **extra: Any) -> None:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()}
        record = {"at": time.time(), "epoch": plan.epoch, "outcome": outcome,
                  "reason": decision.reason,
                  "factors": {p[-8:]: f for p, f in decision.factors.items()},
                  **rounded}  # fmt: skip
        self.balancer["last_decision"] = record
        history = self.balancer.setdefault("history", [])
        history.append(record)
        del history[:-8]
        log.info("balancing_decision", **record)

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
        self._models = self._local_models()
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
            while self.plan is None or self.plan.epoch < epoch:
                await self._plan_changed.wait()
            return {"plan": self.plan.to_obj()}
        raise ControlError("timeout", f"plan {epoch} for {model!r} did not reach this peer")

    async def op_profile(self, args: dict[str, Any]) -> Any:
        """Profile every live peer for a model (the one served, by default); their figures."""
        model = args.get("model") or (self.plan.model if self.plan else None)
        if not isinstance(model, str) or not model:
            raise ControlError("bad_request", "profile needs args.model (nothing is served)")
        refresh = bool(args.get("refresh", False))
        try:
            info, source = self._find_model(model)
        except MeshError as exc:
            raise ControlError("unknown_model", str(exc)) from None
        sha = str(info["sha"])
        peers = sorted([self.me, *self.node.alive_peers()])
        found = await self.gather_profiles(sha, source, peers, refresh=refresh)
        return {
            "model": model, "sha": sha,
            "profiles": {p: (found[p].to_obj() if p in found else None) for p in peers},
        }  # fmt: skip

    def _runtime_of(self, pid: str) -> dict[str, Any]:
        """A peer's memory and recent stage figures, as it last published them."""
        if pid == self.me:
            extra = {"rss_mb": _rss_mb(),
                     "stage_stats": None if self.stage is None else self.stage.stats()}  # fmt: skip
        else:
            state = self._state_of(pid)
            extra = {"rss_mb": state.rss_mb, "stage_stats": state.stage_stats}
        return {k: v for k, v in extra.items() if v is not None}

    def serving_status(self) -> dict[str, Any]:
        peers = {self.me: self.state}
        if self.plan is not None:
            for s in self.plan.stages:
                if s.peer != self.me:
                    peers[s.peer] = self._peer_state(s.peer)
        runtime = {pid: self._runtime_of(pid) for pid in sorted({self.me, *peers})}
        return {
            "plan": self.plan.to_obj() if self.plan else None,
            "ready": self.plan_ready(),
            "states": peers,
            "runtime": runtime,
            "models": self._models,
            "stage": None if self.stage is None else {
                "index": self.stage.index, "steps": self.stage.steps,
                "compute_s": round(self.stage.compute_s, 3),
                "inner_s": round(self.stage.inner_s, 3),
                "open_requests": len(self.stage.runtime.open_requests),
                # Steps started as their frame arrived; of those, run on the link's reader.
                "early_starts": self.stage.early_starts,
                "on_reader": self.stage.steps_on_reader,
            },
            "coordinating": self.coordinator.in_flight,
            "profile": None if self.profiler.latest is None else self.profiler.latest.to_obj(),
            "profiles": self._plan_profiles(),
            "balancer": self.balancer or None,
            "profiling": sorted(self.profiler.busy),
        }  # fmt: skip

    def _plan_profiles(self) -> dict[str, Any]:
        """Every live peer's profile for the planned model, as heard on heartbeats."""
        if self.plan is None:
            return {}
        out = {}
        for pid in sorted([self.me, *self.node.alive_peers()]):
            prof = self.profiler.profile_of(pid, self.plan.model_sha)
            if prof is not None:
                out[pid] = prof.to_obj()
        return out

    async def op_query(self, args: dict[str, Any], emit) -> Any:  # type: ignore[no-untyped-def]
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ControlError("bad_request", "query needs args.prompt (a non-empty string)")
        max_tokens = args.get("max_tokens", 128)
        sampling = sampling_from(args)
        model, tok = await self.ready_model_soon()
        t0 = time.perf_counter()
        prompt_ids = tok.encode_prompt(prompt, raw=bool(args.get("raw", False)))
        tokenize_s = time.perf_counter() - t0
        stream = TextStream(tok)

        async def on_token(token: int) -> None:
            delta = stream.push(token)
            await emit({"token": token, "text": delta})

        result = await self.generate(
            prompt_ids, max_tokens=max_tokens, sampling=sampling, on_token=on_token
        )
        out = result.to_dict()
        out["text"] = tok.decode(result.token_ids)
        out["model"] = model
        out["ttft_s"] = result.ttft_s + tokenize_s
        return out

    def ready_model(self) -> ReadyModel:
        """The served model's name and tokenizer, once every stage of its plan is ready;
        else a ControlError (not_serving, not_ready) saying why not."""
        plan, _manifest, tok = self._ready_plan()
        return ReadyModel(plan.model, tok)

    # A query that comes while the plan loads (a stage still fetching its segment, or its
    # "ready" not yet heard here, right after `serve` returned elsewhere) waits this long
    # for it instead of failing at once.
    READY_WAIT_S = 30.0

    async def ready_model_soon(self) -> ReadyModel:
        """:meth:`ready_model`, waiting up to :attr:`READY_WAIT_S` while the plan loads."""
        with trio.move_on_after(self.READY_WAIT_S):
            while True:
                try:
                    return self.ready_model()
                except ControlError as exc:
                    if exc.code != "not_ready":
                        raise
                with trio.move_on_after(0.5):  # woken by every heartbeat
                    await self._news.wait()
        return self.ready_model()

    def _ready_plan(self) -> tuple[Plan, Manifest, ChatTokenizer]:
        plan, manifest, tok = self.plan, self.manifest, self._tokenizer
        if plan is None:
            raise ControlError("not_serving", "no model is served: run `meshllm serve MODEL`")
        if not self.plan_ready() or manifest is None or tok is None:
            why = self._replan_failure(plan.epoch)
            if why is not None:
                raise ControlError(
                    "not_serving",
                    f"the mesh cannot serve {plan.model} now: {why} (it resumes when peers return)",
                )
            why = first_unready(plan, self._stage_view) or "this peer is loading the tokenizer"
            raise ControlError(
                "not_ready", f"the mesh is still loading {plan.model} ({why}); try again"
            )
        return plan, manifest, tok

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: Any,
        sampling: SamplingParams,
        on_token: OnToken | None = None,
    ) -> QueryResult:
        """Run one tokenized query on the mesh, coordinated here: the one path behind the
        control socket's ``query`` and the HTTP API, so both get this peer's ``[limits]``
        and the same errors (ControlError: bad_request, too_large, busy, not_serving,
        not_ready, query_failed). *on_token* is as for :meth:`Coordinator.run_query`."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ControlError("bad_request", "args.max_tokens must be a positive integer")
        limits = self.config.limits
        if max_tokens > limits.max_new_tokens:
            raise ControlError(
                "too_large",
                f"max_tokens {max_tokens} is over this peer's limit of {limits.max_new_tokens} "
                "([limits] max_new_tokens)",
            )
        if self.coordinator.in_flight >= limits.max_concurrent_requests:
            raise ControlError(
                "busy",
                f"this peer is already coordinating {self.coordinator.in_flight} queries, its "
                "limit ([limits] max_concurrent_requests): try again, or ask another peer",
            )
        plan, manifest, _tok = self._ready_plan()
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise ControlError(
                "too_large",
                f"the prompt is {len(prompt_ids)} tokens; this peer accepts at most "
                f"{limits.max_prompt_tokens} ([limits] max_prompt_tokens)",
            )
        try:
            return await self.coordinator.run_query(
                plan, manifest.architecture, prompt_ids, max_tokens=max_tokens,
                sampling=sampling, on_token=on_token,
            )  # fmt: skip
        except PromptTooLong as exc:
            raise ControlError("too_large", str(exc)) from None
        except QueryFailed as exc:
            raise ControlError("query_failed", str(exc)) from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            await nursery.start(self.desk.run)
            nursery.start_soon(supervised, "plan_watch", self._watch_plan)
            nursery.start_soon(supervised, "balancer", self._balance_loop)
            task_status.started()
            while True:
                # Models imported while the daemon runs are advertised within seconds.
                await trio.sleep(2.0)
                self._release_retired()
                models = await trio.to_thread.run_sync(self._local_models)
                if models != self._models:
                    self._models = models
                    self.node.announce()
