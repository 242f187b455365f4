"""A stage's steps on its compute thread: feeds built from a frame, run off the event loop.

A plain decode step's output can leave from the compute thread itself, without waiting for
the event loop to wake up and send it (see ``SendNow``): a few hundred µs per stage, so per
generated token several times over. Replays, moved caches and plugin transports take the
event loop's path (the stage's ``_finish``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from meshllm.errors import MeshError
from meshllm.model.runtime import SegmentRuntime
from meshllm.pipeline.compute import ComputeThread
from meshllm.pipeline.frames import Frame
from meshllm.pipeline.onward import Onward

# What a step made: its outputs, the token sampled on the compute thread (or None), and
# whether the compute thread already sent the next frame on.
StepResult = tuple[dict[str, np.ndarray], int | None, bool]


class Step:
    """One frame's step, started on the compute thread (or on the thread that read it)."""

    __slots__ = ("error", "frame", "job", "result", "t0")

    def __init__(self, frame: Frame):
        self.frame = frame
        self.job: Any = None
        self.t0 = time.perf_counter()
        self.result: Any = None
        self.error: Exception | None = None

    async def outcome(self, compute: ComputeThread) -> Any:
        """What the step made, once it has run (raises what it raised)."""
        if self.job is not None:
            job, self.job = self.job, None
            try:
                self.result = await compute.wait(job)
            except Exception as exc:  # kept for the step's own frame
                self.error = exc
        if self.error is not None:
            raise self.error
        return self.result


class StepStarter:
    """Builds each step's feeds and runs it on the stage's one compute thread."""

    def __init__(self, runtime: SegmentRuntime, onward: Onward, *, index: int, context_length: int):
        self.runtime = runtime
        self.onward = onward
        self.context_length = context_length
        self.compute = ComputeThread(f"meshllm-stage{index}")
        self.inner_s = 0.0  # inside ONNX Runtime, of all steps
        self._mask = np.ones((1, 0), dtype=np.int64)

    @property
    def mask_width(self) -> int:
        return int(self._mask.shape[1])

    def start(self, f: Frame, *, quick: bool, here: bool = False) -> Step:
        """Start the step of a frame for an open request (raises MeshError on bad input).

        *quick*: the compute thread samples or sends the output on itself; *here*: the
        caller runs the step on its own thread (see ``StageRunner.run_here``).
        """
        if f.pos > self.context_length:  # before the mask grows to a size a frame names
            raise MeshError(f"position {f.pos} is past the context of {self.context_length}")
        if self._mask.shape[1] < f.pos:
            self._mask = np.ones((1, max(f.pos, 2 * self._mask.shape[1])), dtype=np.int64)
        feeds = dict(f.tensors)
        feeds["attention_mask"] = self._mask[:, : f.pos]
        self.runtime.check_feeds(feeds, f.new)
        step = Step(f)

        def run() -> StepResult:
            t = time.perf_counter()
            res = self.runtime.step(f.rid, feeds, f.new)
            inner = time.perf_counter() - t
            self.inner_s += inner
            return self.onward.pass_on(f, res, inner) if quick else (res, None, False)

        step.job = self.compute.claim(run) if here else self.compute.start(run)
        return step

    async def run_batch(
        self, frames: list[Frame], *, quick: bool
    ) -> list[tuple[Any, Exception | None]] | Exception:
        """Decode steps of several requests as one ONNX Runtime call: each frame's result
        (or error), or the exception that stopped the batch before it changed any cache."""
        rids = [f.rid for f in frames]
        feeds = [f.tensors for f in frames]

        def run() -> list[tuple[Any, Exception | None]] | Exception:
            t = time.perf_counter()
            try:
                results = self.runtime.step_batch(rids, feeds)
            except Exception as exc:  # it changed no request's cache: each can run alone
                return exc
            inner = time.perf_counter() - t
            self.inner_s += inner
            if quick:
                return self.onward.pass_on_batch(frames, results, inner)
            return [((res, None, False), None) for res in results]

        return await self.compute.run(run)
