"""The segment loader: this peer's part of each plan it adopts, fetched, loaded and running.

For every plan adopted (see :meth:`ServingState.adopt`) it gets the model's files (the
manifest and tokenizer, then this peer's segment: cut from a local import or fetched from the
plan's source), loads the segment into ONNX Runtime and starts the stage. A plan adopted
while the previous one loads cancels that work. The balancer's staged plans are prepared the
same way while the current plan keeps serving (:meth:`SegmentLoader.prepare`), so the switch
itself only starts a stage already loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from meshllm.config import Config
from meshllm.mesh.contain import report, spawn
from meshllm.mesh.node import MeshNode
from meshllm.mesh.transport import Endpoint
from meshllm.model.manifest import Manifest
from meshllm.model.ranges import LayerRange
from meshllm.model.tokenizer import ChatTokenizer
from meshllm.pipeline import files
from meshllm.pipeline.kvcaches import KVCaches
from meshllm.pipeline.links import Links
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.serving_state import ServingState
from meshllm.pipeline.stage import StageRunner


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
        seg_bytes = (seg_path.parent / "segment.onnx.data").stat().st_size
        st.set_state("ready", layers=str(r), segment_bytes=seg_bytes)

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
                runtime = await self._load_runtime(seg_path, self.state.manifest)
                self._prepared = (plan.epoch, r, runtime, seg_path)
            self.prepared_epoch = plan.epoch
            self.node.announce()
        except Exception as exc:  # as in _realize: whatever the files were, only this fails
            report(exc, "prepare_plan", plan.source)
            self._preparing = 0


async def _run_stage(stage: StageRunner, scope: trio.CancelScope) -> None:
    with scope:
        await stage.run()
