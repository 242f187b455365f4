"""A pipeline stage: this peer's segment, run for every request that passes through it.

Frames arrive in one bounded queue (from the network or from this peer itself) and are run one
at a time, ONNX Runtime off the event loop; different requests are in different stages at the
same time, which is what pipelines several requests across the mesh.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
import trio

from meshllm.errors import MeshError
from meshllm.mesh.transport import PeerUnreachable
from meshllm.model.runtime import SegmentRuntime
from meshllm.pipeline.frames import END, FWD, Frame
from meshllm.pipeline.onward import Onward, SendNow
from meshllm.pipeline.stage_queue import Batcher, StageQueue
from meshllm.pipeline.stage_requests import (
    FetchKV,
    KVMoveFailed,
    RequestOpener,
    StageBusy,
    StaleEpoch,
)
from meshllm.pipeline.stage_steps import Step, StepStarter
from meshllm.pipeline.step_times import StepTimes

Send = Callable[[str, Frame], Awaitable[None]]
REPLAY_WINDOW = 8


log = structlog.get_logger("meshllm.stage")


class StageRunner:
    def __init__(
        self,
        runtime: SegmentRuntime,
        *,
        epoch: int,
        index: int,
        next_peer: str | None,
        first_peer: str,
        context_length: int,
        eos_token_ids: tuple[int, ...],
        send: Send,
        queue_size: int = 256,
        max_requests: int = 16,
        fetch_kv: FetchKV | None = None,
        send_now: SendNow | None = None,
        max_batch: int = 8,
    ):
        self.runtime = runtime
        self.epoch = epoch
        self.index = index
        self.next_peer = next_peer
        self.first_peer = first_peer
        self.context_length = context_length
        self.send = send
        self.send_now = send_now
        self.queue = StageQueue(queue_size)
        self.batcher = Batcher(runtime, epoch, max_batch)
        self.batches = 0  # batched steps run, and the decode steps they held
        self.batched_steps = 0
        # With the queue's count, under its gate: whether a step may start as its frame
        # arrives (see submit and run_here).
        self._busy = False  # the run loop is processing a frame
        self._early: Step | None = None  # a step started as its frame arrived
        self.early_starts = 0
        self.steps_on_reader = 0  # of those, run on the thread that read the frame
        # Set when the plan is replaced: the KV caches outlive this runner, for the new
        # plan's stages to fetch (see kvmove).
        self.keep_caches = False
        self.onward = Onward(
            next_peer=next_peer,
            first_peer=first_peer,
            eos_token_ids=eos_token_ids,
            data_inputs=runtime.data_inputs,
            send_now=send_now,
        )
        self.opener = RequestOpener(
            runtime,
            self.onward,
            max_requests=max_requests,
            context_length=context_length,
            fetch_kv=fetch_kv,
        )
        self.steps_on = StepStarter(
            runtime, self.onward, index=index, context_length=context_length
        )
        self._compute = self.steps_on.compute
        self.times = StepTimes()  # step compute, for the balancer and status

    def stats(self) -> dict[str, float | int]:
        """What the leader's balancer (and `meshllm status`) sees of this stage."""
        t = self.times
        return {
            "epoch": self.epoch,
            "steps": t.measured,
            "baseline_s": t.baseline_s,
            "recent_s": t.recent_s,
            "steps_per_s": round(t.recent_rate(), 2),
            "open_requests": len(self.runtime.open_requests),
            "batches": self.batches,
            "batched_steps": self.batched_steps,
            # What a coordinator that got no token reads (see pipeline.stall).
            "queued": self.queue.queued,
            "busy": int(self._busy),
            "idle_s": round(time.monotonic() - t.last_step_at, 3),
        }

    @property
    def inner_s(self) -> float:
        """Seconds inside ONNX Runtime, of all steps."""
        return self.steps_on.inner_s

    @property
    def is_last(self) -> bool:
        return self.next_peer is None

    def submit(self, f: Frame) -> bool:
        """Queue a frame; False when the queue is full (the sender then fails the request)."""
        if not self.queue.offer(f):
            return False
        with self.queue.gate:
            self.queue.queued += 1
            # An idle stage starts a frame for an open request at once, from the task that
            # read it: the run loop's turn to wake up then overlaps the step instead of
            # preceding it. The loop still takes the frame in order and finishes it.
            if self.queue.queued == 1 and self._may_start(f):
                with contextlib.suppress(Exception):  # the loop meets the error, reports it
                    self._early = self._start(f)
                    self.early_starts += 1
        return True

    def _may_start(self, f: Frame) -> bool:
        """Whether *f*'s step may start before the run loop takes it (gate held): the stage
        is idle and *f* continues an open request of this plan."""
        return (
            not self._busy
            and self._early is None
            and not self._compute.closed
            and f.kind == FWD
            and f.epoch == self.epoch
            and f.kv_from is None
            and f.group < 2  # waits for its group, to run with it
            and self.runtime.cached_length(f.rid) > 0
        )

    def run_here(self, f: Frame, token: trio.lowlevel.TrioToken) -> bool:
        """From the thread that read *f* off a link: run its step right here if the stage
        is idle with nothing queued, instead of waking the event loop and then the compute
        thread (each wake-up costs a few hundred µs on a small machine, and a token pays
        them at every stage). The frame then goes to the run loop, which finishes it in
        order as for any early start. False, having done nothing, when the stage is not
        free: the caller hands *f* to the event loop as usual.
        """
        with self.queue.gate:
            if self.queue.queued or not self._may_start(f):
                return False
            try:
                step = self._start(f, here=True)
            except Exception:  # the run loop meets the error again and reports it
                return False
            self._early = step
            self.queue.queued += 1
            self.early_starts += 1
            self.steps_on_reader += 1
            job = step.job  # a wait in the run loop may take it off the step meanwhile
        # Only once the step is done (its output already on the next link) is the event
        # loop woken to finish the frame: woken earlier, its Python would hold the GIL
        # against the step's own.
        self._compute.run_here(job)
        with contextlib.suppress(trio.RunFinishedError):  # shutting down: nobody will take it
            token.run_sync_soon(self.queue.post, f)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while (f := await self.queue.take()) is not None:
                with self.queue.gate:
                    self.queue.queued -= 1
                    self._busy = True
                try:
                    # The run loop is busy meanwhile, so nothing starts early.
                    early = self._early is not None
                    batch = [f] if early else await self.batcher.gather(f, self.queue)
                    if len(batch) > 1:
                        await self._process_batch(batch)
                    else:
                        await self._process_one(f)
                finally:
                    with self.queue.gate:
                        self._busy = False
        finally:
            with self.queue.gate:
                self._compute.close()
            if not self.keep_caches:
                for rid in list(self.runtime.open_requests):
                    self._drop(rid)

    async def _process_one(self, f: Frame) -> None:
        try:
            await self._process(f)
        except Exception as exc:
            await self._failed_any(f, exc)

    async def _failed_any(self, f: Frame, exc: Exception) -> None:
        if not isinstance(exc, MeshError):
            # A frame that passed every check and still broke its step (ONNX Runtime refusing
            # an input, say) fails its own request; the stage goes on.
            log.error("step_failed", rid=f.rid, stage=self.index, exc_info=exc)
            exc = MeshError(f"step failed: {type(exc).__name__}: {exc}"[:300])
        await self._failed(f, exc)

    async def _failed(self, f: Frame, exc: MeshError) -> None:
        self._drop(f.rid)
        log.warning("request_failed", rid=f.rid, stage=self.index, reason=str(exc))
        # A lost peer or a replaced plan: the coordinator may replay the request on the next
        # plan. Anything else is the request's own fault.
        await self._fail(
            f,
            str(exc),
            retry=isinstance(exc, PeerUnreachable | StaleEpoch | KVMoveFailed),
            busy=isinstance(exc, StageBusy),
        )

    # -- batches --------------------------------------------------------------------------
    async def _process_batch(self, frames: list[Frame]) -> None:
        """Decode steps of several requests as one ONNX Runtime call; then each frame goes
        on as its own step would have."""
        t0 = time.perf_counter()
        done = await self.steps_on.run_batch(frames, quick=self.send_now is not None)
        if isinstance(done, Exception):
            log.warning("batch_failed", stage=self.index, rows=len(frames), reason=str(done))
            for f in frames:
                await self._process_one(f)
            return
        self.batches += 1
        self.batched_steps += len(frames)
        for f, (result, error) in zip(frames, done, strict=True):
            step = Step(f)
            step.t0, step.result, step.error = t0, result, error
            try:
                await self._finish(f, step, share=len(frames))
            except Exception as exc:
                await self._failed_any(f, exc)

    def _drop(self, rid: str) -> None:
        self.runtime.close(rid)
        self.onward.drop(rid)

    async def _fail(
        self, f: Frame, reason: str, *, retry: bool = False, busy: bool = False
    ) -> None:
        if f.coord:
            err = Onward.error_frame(f, f"stage {self.index}: {reason}", retry, busy)
            with contextlib.suppress(MeshError):
                await self.send(f.coord, err)

    async def _process(self, f: Frame) -> None:
        early = self._early
        if early is not None and early.frame is f:
            with self.queue.gate:
                self._early = None
            step = early
        else:
            if early is not None:
                # Started on a reader thread just before this frame came in through the
                # event loop: it must end before another step starts. Its frame is next.
                with contextlib.suppress(Exception):
                    await early.outcome(self._compute)
            step = await self._prepare(f)
            if step is None:
                return
        await self._finish(f, step)

    async def _prepare(self, f: Frame) -> Step | None:
        """Check and open what a frame needs, and start its step on the compute thread."""
        if f.kind == END:
            self._drop(f.rid)
            if self.next_peer is not None:
                await self.send(self.next_peer, f)
            return None
        if f.kind != FWD:
            return None
        if f.epoch != self.epoch:
            raise StaleEpoch(f"frame for plan epoch {f.epoch}, this stage serves {self.epoch}")
        if f.rid not in self.runtime.open_requests:
            await self.opener.open(f)
        return self._start(f)

    def _start(self, f: Frame, *, here: bool = False) -> Step:
        """Start the step of a frame for an open request (raises MeshError on bad input);
        *here*: the caller runs it on its own thread (see run_here). Only a plain decode
        step may leave from the compute thread (see stage_steps)."""
        quick = (
            self.send_now is not None
            and f.new == 1
            and not f.force
            and not f.fed
            and f.kv_from is None
        )
        return self.steps_on.start(f, quick=quick, here=here)

    async def _finish(self, f: Frame, step: Step, share: int = 1) -> None:
        """Wait for a frame's step and pass on what it made."""
        outs, sampled, sent_on = await step.outcome(self._compute)
        spent = time.perf_counter() - step.t0
        self.times.finished(spent, typical=f.new == 1 and not f.force, share=share)
        timings = [*f.compute_s, spent]
        if self.is_last:
            again, reply = self.onward.after_last(f, outs, sampled, sent_on, timings)
            if again is not None:
                await self.send(self.first_peer, again)
            await self.send(f.coord, reply)
            return
        if sent_on:  # the compute thread already sent it on
            return
        force, fed = f.force, f.fed
        if self.index == 0 and force and not fed and (f.step + 1) % REPLAY_WINDOW:
            # Replaying: the next inputs are known, so stage 0 feeds them itself and the
            # forced steps flow through the stages back to back (a pipeline), instead of
            # each waiting for the previous one to come round from the last stage. Every
            # REPLAY_WINDOW-th step does go round, so stage 0 never runs further ahead of
            # the slowest stage than that (their queues stay short).
            follow = self.onward.step_after(f, force[0], force[1:])
            if not self.submit(follow):
                raise MeshError("stage queue full while replaying")
            fed = True
        nxt = self.onward.frame_for_next(f, outs, timings, force[:1] if fed else force, fed)
        assert self.next_peer is not None
        await self.send(self.next_peer, nxt)
