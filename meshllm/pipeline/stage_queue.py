"""A stage's frames in arrival order, and the decode steps gathered from them as batches.

:class:`StageQueue` is a bounded channel plus the frames held back while a batch was
gathered (taken again before anything newer), and the count of frames accepted and not yet
taken: with its ``gate`` that count decides whether a step may start as its frame arrives
(see :class:`~meshllm.pipeline.stage.StageRunner`).

:class:`Batcher` decides which queued decode steps of different requests run together as one
ONNX Runtime call: a step streams the stage's weights once for all its rows.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import suppress

import trio

from meshllm.errors import MeshError
from meshllm.model.runtime import SegmentRuntime
from meshllm.pipeline.frames import FWD, Frame


class StageQueue:
    def __init__(self, size: int):
        self._in, self._out = trio.open_memory_channel[Frame](size)
        # Frames taken off the queue while gathering a batch that could not join it: taken
        # again before the queue (they still count in `queued`, so that no frame starts
        # early ahead of them).
        self.held: deque[Frame] = deque()
        # Shared by the event loop and the threads that read links.
        self.gate = threading.Lock()
        self.queued = 0  # frames accepted and not yet taken by the run loop

    def offer(self, f: Frame) -> bool:
        """Queue *f* now; False when the queue is full."""
        try:
            self._in.send_nowait(f)
        except trio.WouldBlock:
            return False
        return True

    def post(self, f: Frame) -> None:
        """On the event loop: queue a frame already counted (its step started on a reader
        thread), waiting for room if the queue is full."""
        try:
            self._in.send_nowait(f)
        except trio.WouldBlock:
            trio.lowlevel.spawn_system_task(self._post_later, f)
        except trio.ClosedResourceError:
            pass

    async def _post_later(self, f: Frame) -> None:
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._in.send(f)

    async def take(self) -> Frame | None:
        """The next frame, held ones first; None once the queue is closed."""
        if self.held:
            return self.held.popleft()
        try:
            return await self._out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def backlog(self) -> bool:
        """Whether frames wait in the channel."""
        return bool(self._out.statistics().current_buffer_used)

    async def next_queued(self, wait_until: float | None) -> Frame | None:
        """The next queued frame; if none, None, or with *wait_until* the next to arrive
        before then."""
        try:
            try:
                return self._out.receive_nowait()
            except trio.WouldBlock:
                if wait_until is None:
                    return None
            with trio.move_on_at(wait_until):
                return await self._out.receive()
            return None
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None


class Batcher:
    # Most a batch's buffer may hold of KV cache (a copy of its rows' caches): long requests
    # then run one at a time, where attention rather than the weights dominates anyway.
    BATCH_BUDGET_BYTES = 64 << 20
    # How long a frame sent on from a batch waits for the rest of its group (they left the
    # previous stage together, microseconds apart).
    GROUP_WAIT_S = 0.003

    def __init__(self, runtime: SegmentRuntime, epoch: int, max_batch: int):
        self.runtime = runtime
        self.epoch = epoch
        self.max_batch = max(1, max_batch)

    def batchable(self, f: Frame) -> bool:
        """Whether *f* is a plain decode step that may run in a batch with others."""
        if not (
            f.kind == FWD
            and f.new == 1
            and not f.force
            and not f.fed
            and f.kv_from is None
            and f.epoch == self.epoch
        ):
            return False
        length = self.runtime.cached_length(f.rid)
        if length == 0 or f.pos != length + 1:
            return False
        try:
            self.runtime.check_feeds(f.tensors, 1)
        except MeshError:  # run alone, it fails on its own
            return False
        return True

    async def gather(self, f: Frame, queue: StageQueue) -> list[Frame]:
        """*f*, and the decode steps of other requests queued behind it (or, for a frame of
        a group, about to arrive) that can run with it as one batch."""
        alone = f.group < 2 and not queue.backlog()
        if self.max_batch < 2 or alone or not self.batchable(f):
            return [f]
        batch, rids = [f], {f.rid}
        width = self.runtime.cached_length(f.rid) + 1
        want = min(self.max_batch, f.group)
        deadline = trio.current_time() + self.GROUP_WAIT_S
        while len(batch) < self.max_batch and not queue.held:
            g = await queue.next_queued(deadline if len(batch) < want else None)
            if g is None:
                break
            wider = max(width, self.runtime.cached_length(g.rid) + 1)
            fits = self.runtime.batch_bytes(len(batch) + 1, wider) <= self.BATCH_BUDGET_BYTES
            if g.rid in rids or not fits or not self.batchable(g):
                queue.held.append(g)  # in order, before anything else queued
                break
            with queue.gate:
                queue.queued -= 1
            batch.append(g)
            rids.add(g.rid)
            width = wider
        return batch
