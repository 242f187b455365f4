"""KV caches moving to a new plan (see :mod:`meshllm.pipeline.kvmove` for the wire side).

When a plan replaces another, this peer keeps the old stage's runtime a while (its requests'
caches are what the new plan's stages fetch), prefetches every cache the old plan's stages
hold for the layers of its new stage, and answers other peers' fetches on protocol ``kv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import trio

from meshllm.errors import MeshError
from meshllm.mesh.transport import Endpoint, Stream
from meshllm.pipeline import kvmove
from meshllm.pipeline.frames import Frame, KVSource
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.serving_state import ServingState
from meshllm.pipeline.stage import StageRunner

log = structlog.get_logger("meshllm.serve")
RELEASE_EVERY_S = 2.0


@dataclass
class _Prefetch:
    until: float  # released then
    done: trio.Event = field(default_factory=trio.Event)
    caches: kvmove.Caches = field(default_factory=dict)


class KVCaches:
    def __init__(self, endpoint: Endpoint, state: ServingState):
        self.endpoint = endpoint
        self.state = state
        self.me = endpoint.peer_id
        # Runtimes of plans this peer no longer serves, kept a while with their requests'
        # KV caches for the new plan's stages to fetch: epoch -> (runtime, keep until).
        self._retired: dict[int, tuple[Any, float]] = {}
        # What this peer prefetched of an old plan's caches for its new stage, by old epoch.
        self._prefetch: dict[int, _Prefetch] = {}
        endpoint.set_stream_handler(kvmove.KV_PROTOCOL, self._on_kv_stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(RELEASE_EVERY_S)
            self._release_retired()

    def retire(self, stage: StageRunner) -> None:
        """Keep a stage that no longer serves the plan, with its caches, for a while."""
        stage.keep_caches = True
        self._retired[stage.epoch] = (stage.runtime, trio.current_time() + kvmove.RETIRED_KEEP_S)

    def drop_retired(self) -> int:
        """Let the kept stages go now (their KV caches with them); returns how many."""
        n = len(self._retired)
        self._retired.clear()
        return n

    def runtime_of(self, epoch: int) -> Any:
        stage = self.state.stage
        if stage is not None and stage.epoch == epoch:
            return stage.runtime
        kept = self._retired.get(epoch)
        return None if kept is None else kept[0]

    async def _on_kv_stream(self, stream: Stream) -> None:
        await kvmove.serve(stream, self.runtime_of)

    def _layout(self) -> kvmove.Layout:
        if self.state.manifest is None:
            raise kvmove.KVMoveFailed("no model loaded")
        arch = self.state.manifest.architecture
        return kvmove.Layout(
            arch.num_key_value_heads, arch.head_size, np.dtype(arch.kv_dtype), arch.context_length
        )

    async def fetch(self, f: Frame, layers: list[int]) -> dict[int, Any]:
        """The caches of *f*'s request for *layers*, from this peer's prefetch or from the
        old plan's stage that holds them (a stage's ``fetch_kv``)."""
        src = f.kv_from
        assert src is not None
        t = time.perf_counter()
        how = "fetched"
        try:
            kv = await self._prefetched(src, f.rid, layers)
            if kv is not None:
                how = "prefetched"
            else:
                kv = await kvmove.fetch(
                    self.endpoint, self.me, self.runtime_of, src, f.rid, layers, self._layout()
                )
        except MeshError:
            raise
        except Exception as exc:  # a bug here must cost a replay, not the daemon
            log.exception("kv_move_bug", rid=f.rid[:8])
            raise kvmove.KVMoveFailed(f"moving the KV cache failed: {exc!r}") from None
        log.info(
            "kv_moved",
            rid=f.rid[:8],
            layers=f"{layers[0]}-{layers[-1] + 1}",
            how=how,
            positions=src.length,
            ms=round(1000 * (time.perf_counter() - t), 1),
        )
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

    async def prefetch(self, old: Plan, epoch: int, layers: list[int]) -> None:
        """Right after taking a stage of plan *epoch*: pull every cache the old plan's stages
        hold for this stage's layers, while the coordinators notice the change."""
        job = _Prefetch(until=trio.current_time() + kvmove.RETIRED_KEEP_S)
        self._prefetch[old.epoch] = job
        t = time.perf_counter()
        try:
            job.caches = await kvmove.prefetch(
                self.endpoint,
                self.me,
                self.runtime_of,
                old.epoch,
                old.stage_triples,
                layers,
                self._layout(),
            )
            log.info(
                "kv_prefetched",
                epoch=epoch,
                requests=len(job.caches),
                ms=round(1000 * (time.perf_counter() - t), 1),
            )
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
