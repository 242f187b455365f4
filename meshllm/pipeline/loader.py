"""The segment loader: this peer's part of each plan it adopts, fetched, loaded and running.

For every plan adopted (see :meth:`ServingState.adopt`) it gets the model's files (the
manifest and tokenizer, then this peer's segment: cut from a local import or fetched from the
plan's source), loads the segment into ONNX Runtime and starts the stage. A plan adopted
while the previous one loads cancels that work. The balancer's staged plans are prepared the
same way while the current plan keeps serving (:meth:`SegmentLoader.prepare`), so the switch
itself only starts a stage already loaded.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import structlog
import trio

from meshllm.config import Config
from meshllm.device import memory_budget, release_free_memory, resident_bytes
from meshllm.mesh.contain import report, spawn
from meshllm.mesh.node import MeshNode
from meshllm.mesh.transport import Endpoint
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.model.tokenizer import ChatTokenizer
from meshllm.pipeline import files, memory_lesson
from meshllm.pipeline.kvcaches import KVCaches
from meshllm.pipeline.links import Links
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.serving_state import ServingState
from meshllm.pipeline.stage import StageRunner

log = structlog.get_logger()

# Resident bytes a segment takes per weight byte, with a margin: int4 segments were measured at
# about 1.26 (ONNX Runtime repacks their matmul weights), float32 at 1.0.
ROOM_FACTOR = 1.3
ROOM_WAIT_S = 10.0


class SegmentLoader:
    def __init__(
        self,
        home: Path,
        config: Config,
        endpoint: Endpoint,
        node: MeshNode,
        state: ServingState,
        links: Links,
        kv: KVCaches,
    ):
        self.home = home
        self.config = config
        self.endpoint = endpoint
        self.node = node
        self.state = state
        self.links = links
        self.kv = kv
        self.me = endpoint.peer_id
        # A staged plan's part, loaded while the current plan serves: (epoch, range, runtime,
        # segment path); the epoch being prepared; the newest epoch prepared (published).
        self._prepared: tuple[int, LayerRange, Any, Path] | None = None
        self._preparing = 0
        self.prepared_epoch = 0
        self._stage_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            loading: trio.CancelScope | None = None
            while True:
                changed = self.state.plan_changed()
                plan = self.state.plan
                if plan is not None:
                    if loading is not None:
                        loading.cancel()
                    loading = trio.CancelScope()
                    spawn(nursery, "realize_plan", plan.source, self._realize, plan, loading)
                await changed.wait()

    def prepare(self, plan: Plan) -> None:
        """Fetch and load this peer's part of a staged *plan* in the background."""
        current = self.state.epoch
        if self._nursery is not None and plan.epoch > current and plan.epoch != self._preparing:
            spawn(self._nursery, "prepare_plan", plan.source, self._prepare, plan)

    async def _realize(self, plan: Plan, scope: trio.CancelScope) -> None:
        """Get this peer's files for *plan*, load its segment, start its stage."""
        with scope:
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
                    self.state.set_state("error", detail=f"{type(exc).__name__}: {exc}"[:1000])
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _realize_inner(self, plan: Plan) -> None:
        st = self.state
        # Not a reference: whether the old stage's session is really gone is checked later.
        previous = None if st.stage is None else weakref.ref(st.stage.runtime)
        if st.stage is not None and st.stage.epoch != plan.epoch:
            self.kv.retire(st.stage)
        if self._stage_scope is not None:
            self._stage_scope.cancel()
            self._stage_scope = None
        st.stage = None
        st.set_state("fetching", progress=0.0)
        local = st.store.by_sha(plan.model_sha)
        manifest = st.manifest
        if manifest is None or manifest.model_sha256 != plan.model_sha or st.tokenizer is None:
            meta_dir = await files.meta_dir(
                self.endpoint, self.home, st.store, plan.model_sha, plan.source
            )
            manifest = Manifest.read(meta_dir)
            st.tokenizer = await trio.to_thread.run_sync(ChatTokenizer, meta_dir)
            st.manifest = manifest
        # else: a new plan for the same model (a rebalance); its files are here already.
        if self.state.plan is not plan:
            return  # replaced while the files loaded (a thread is not cancelled): it loads
        idx = plan.stage_of(self.me)
        if idx is None:
            memory_lesson.released(self.home)
            st.set_state("ready", role="coordinator")
            return
        r = plan.stages[idx].range
        prepared = self._prepared
        if prepared is not None and prepared[0] == plan.epoch and prepared[1] == r:
            # Staged by the balancer while the previous plan was still serving.
            runtime, seg_path = prepared[2], prepared[3]
        else:
            seg_path = await self._segment_path(plan, r, local, report=True)
            st.set_state("loading")
            await self._make_room(data_bytes(seg_path), previous)
            memory_lesson.holding(self.home, data_bytes(seg_path))
            runtime = await self._load_runtime(seg_path, manifest)
        if self.state.plan is not plan:
            return  # replaced while the segment loaded: the newer plan's load takes over
        self._prepared = None
        nxt = plan.stages[idx + 1].peer if idx + 1 < len(plan.stages) else None
        stage = StageRunner(
            runtime,
            epoch=plan.epoch,
            index=idx,
            next_peer=nxt,
            first_peer=plan.stages[0].peer,
            context_length=manifest.architecture.context_length,
            eos_token_ids=manifest.architecture.eos_token_ids,
            send=self.links.send_frame,
            max_requests=self.config.limits.max_concurrent_requests,
            fetch_kv=self.kv.fetch,
            send_now=self.links.send_now,
            max_batch=self.config.limits.max_batch,
        )
        assert self._nursery is not None
        self._stage_scope = trio.CancelScope()
        spawn(self._nursery, "stage", None, _run_stage, stage, self._stage_scope)
        st.stage = stage
        old = st.replaced
        if self.config.mesh.move_kv and old is not None and old.model_sha == plan.model_sha:
            spawn(
                self._nursery,
                "prefetch_kv",
                None,
                self.kv.prefetch,
                old,
                plan.epoch,
                runtime.layers,
            )
        seg_bytes = data_bytes(seg_path)
        st.set_state("ready", layers=str(r), segment_bytes=seg_bytes)

    async def _make_room(self, new_bytes: int, previous: weakref.ref[Any] | None) -> None:
        """Under a memory cap, let the old plan's stage go before loading a new one that would
        not fit beside it: its KV caches are then replayed instead of moved (measured: on a
        phone capped at 480 MiB, the old stage and the new one together had the kernel kill
        the daemon during a recovery)."""
        limit, exact = memory_budget(self.config.peer.memory_limit_mb)
        now = resident_bytes()
        if not exact or now is None or now + ROOM_FACTOR * new_bytes <= limit:
            return
        dropped = self.kv.drop_retired()
        # The old stage's last step may still be running on its thread: wait (a while) until
        # its session is really freed. A cancelled task's frames can also hold it in a cycle.
        with trio.move_on_after(ROOM_WAIT_S):
            while True:
                gc.collect()
                if previous is None or previous() is None:
                    break
                await trio.sleep(0.1)
        release_free_memory()
        log.info(
            "old_stage_dropped_for_room",
            new_mib=new_bytes >> 20,
            cap_mib=limit >> 20,
            kept=dropped,
            freed=previous is None or previous() is None,
        )

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
                self.state.state["progress"] = round(d / t, 3) if t else 0.0
                self.state.state["bytes"] = d

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
            if idx is not None and self.state.manifest is not None:
                r = plan.stages[idx].range
                local = self.state.store.by_sha(plan.model_sha)
                seg_path = await self._segment_path(plan, r, local, report=False)
                # Both stages are held until the switch.
                held = int(self.state.state.get("segment_bytes", 0))
                memory_lesson.holding(self.home, held + data_bytes(seg_path))
                runtime = await self._load_runtime(seg_path, self.state.manifest)
                self._prepared = (plan.epoch, r, runtime, seg_path)
            self.prepared_epoch = plan.epoch
            self.node.announce()
        except Exception as exc:  # as in _realize: whatever the files were, only this fails
            report(exc, "prepare_plan", plan.source)
            self._preparing = 0


def data_bytes(seg_path: Path) -> int:
    """Weight bytes of a segment on disk (0 if its data file is missing)."""
    try:
        return (seg_path.parent / "segment.onnx.data").stat().st_size
    except OSError:
        return 0


async def _run_stage(stage: StageRunner, scope: trio.CancelScope) -> None:
    with scope:
        await stage.run()
