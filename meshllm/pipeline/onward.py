"""What follows a stage's step: the frame for the next stage, or, at the last stage, the
sampled token and the request's next step, straight back to stage 0.

The last stage samples (one seeded sampler per request) and applies the stop rule the
coordinator also applies: end of sequence, or the request's KV capacity reached. A plain decode
step's output can leave from the compute thread itself (``send_now``) without waiting for the
event loop: see :meth:`Onward.pass_on`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.pipeline.frames import ERROR, FWD, TOKEN, Frame

# Called on the compute thread: put a frame on the wire now if that needs no event loop
# (True), else leave it to the event loop's send (False, nothing sent).
SendNow = Callable[[str, Frame], bool]
Outputs = dict[str, np.ndarray]


class Onward:
    def __init__(
        self,
        *,
        next_peer: str | None,
        first_peer: str,
        eos_token_ids: tuple[int, ...],
        data_inputs: Any,  # the inputs this stage's segment takes (the rest skip over it)
        send_now: SendNow | None,
    ):
        self.next_peer = next_peer
        self.first_peer = first_peer
        self.eos = set(eos_token_ids)
        self.data_inputs = data_inputs
        self.send_now = send_now
        self._samplers: dict[str, Sampler] = {}
        self._caps: dict[str, int] = {}

    @property
    def is_last(self) -> bool:
        return self.next_peer is None

    @property
    def peer(self) -> str:
        """Where this stage's output goes: the next stage, or from the last back to stage 0."""
        peer = self.first_peer if self.is_last else self.next_peer
        assert peer is not None
        return peer

    # -- requests at the last stage -------------------------------------------------------------
    def open(self, rid: str, sampling: SamplingParams, cap: int, drawn: int = 0) -> None:
        """A request starts here (last stage): its sampler, *drawn* draws already made."""
        self._samplers[rid] = Sampler(sampling)
        self._caps[rid] = cap
        if drawn:
            self._samplers[rid].skip(drawn)

    def drop(self, rid: str) -> None:
        self._samplers.pop(rid, None)
        self._caps.pop(rid, None)

    def sample(self, rid: str, outs: Outputs) -> int:
        return self._samplers[rid](outs["logits"][0, -1])

    # -- frames -----------------------------------------------------------------------------------
    def next_step(self, f: Frame, token: int, force: list[int]) -> Frame | None:
        """The last stage's next step for a request, or None when it stops.

        The token goes straight back to stage 0 as the next step (one hop fewer per token
        than a round trip through the coordinator), and to the coordinator, which streams
        it. Both apply the same stop rule: end of sequence or a full KV cache.
        """
        if token in self.eos or f.pos + 1 >= self._caps.get(f.rid, 0):
            return None
        return self.step_after(f, token, force)

    def frame_for_next(
        self, f: Frame, outs: Outputs, timings: list[float], force: list[int], fed: bool
    ) -> Frame:
        """The frame for the next stage: what this stage made plus anything it received but
        did not use (a tensor skipping over this stage to a later one)."""
        tensors = {k: v for k, v in f.tensors.items() if k not in self.data_inputs}
        tensors.update(outs)
        return Frame(
            kind=FWD,
            rid=f.rid,
            epoch=f.epoch,
            step=f.step,
            pos=f.pos,
            new=f.new,
            cap=f.cap,
            coord=f.coord,
            sampling=f.sampling,
            tensors=tensors,
            compute_s=timings,
            force=force,
            fed=fed,
            kv_from=f.kv_from,
        )

    def after_last(
        self, f: Frame, outs: Outputs, sampled: int | None, sent_on: bool, timings: list[float]
    ) -> tuple[Frame | None, Frame]:
        """At the last stage, once a step is done: the next step for stage 0 (None when the
        request ends or it went already) and the token's reply to the coordinator."""
        force, sent = f.force, sent_on
        # A quick step was sampled on the thread, which also sent the next step on unless
        # its link was busy.
        token = self.sample(f.rid, outs) if sampled is None else sampled
        if f.fed:
            # Stage 0 already fed this forced token onwards: only report it.
            token, sent = force[0], True
        elif force:
            # Replaying: the sample above is drawn anyway (a seeded sampler's state then
            # matches the original run's), and the token the request already had wins.
            token, force = force[0], force[1:]
        again = None if sent else self.next_step(f, token, force)
        reply = Frame(
            kind=TOKEN, rid=f.rid, epoch=f.epoch, step=f.step, token=token, compute_s=timings
        )
        return again, reply

    @staticmethod
    def error_frame(f: Frame, error: str, retry: bool, busy: bool) -> Frame:
        """The coordinator's news that *f*'s request failed here (*retry*: on another plan;
        *busy*: this stage is full)."""
        return Frame(
            kind=ERROR, rid=f.rid, epoch=f.epoch, step=f.step, error=error, retry=retry, busy=busy
        )

    @staticmethod
    def step_after(f: Frame, token: int, force: list[int]) -> Frame:
        """Stage 0's frame for the decode step after *f*'s, feeding *token*."""
        return Frame(
            kind=FWD,
            rid=f.rid,
            epoch=f.epoch,
            step=f.step + 1,
            pos=f.pos + 1,
            new=1,
            coord=f.coord,
            tensors={"input_ids": np.asarray([[token]], dtype=np.int64)},
            force=force,
        )

    def after_decode(self, f: Frame, res: Outputs, inner: float) -> tuple[int | None, Frame | None]:
        """After a plain decode step: the token it sampled (last stage) and the frame to send
        on (None: the request stops here)."""
        if not self.is_last:
            return None, self.frame_for_next(f, res, [*f.compute_s, inner], [], False)
        token = self.sample(f.rid, res)
        return token, self.next_step(f, token, [])

    # -- straight from the compute thread ---------------------------------------------------------
    def pass_on(self, f: Frame, res: Outputs, inner: float) -> tuple[Outputs, int | None, bool]:
        """On the compute thread, right after a plain decode step: put its output on the
        wire if that needs no event loop. (outputs, the token sampled or None, sent)."""
        assert self.send_now is not None
        token, nxt = self.after_decode(f, res, inner)
        return res, token, nxt is not None and self.send_now(self.peer, nxt)

    def pass_on_batch(
        self, frames: list[Frame], results: list[Outputs], inner: float
    ) -> list[tuple[Any, Exception | None]]:
        """:meth:`pass_on` for a batch's rows, each with its own failure if it failed. What
        goes on to the next peer goes as a group, for it to run as one batch again."""
        assert self.send_now is not None
        rows: list[tuple[int | None, Frame | None, Exception | None]] = []
        for f, res in zip(frames, results, strict=True):
            try:
                rows.append((*self.after_decode(f, res, inner), None))
            except Exception as exc:  # the row's own failure, as for a single step
                rows.append((None, None, exc))
        group = sum(nxt is not None for _, nxt, _ in rows)
        done: list[tuple[Any, Exception | None]] = []
        for res, (token, nxt, error) in zip(results, rows, strict=True):
            sent = False
            if error is None and nxt is not None:
                nxt.group = group
                try:
                    sent = self.send_now(self.peer, nxt)
                except Exception as exc:
                    error = exc
            done.append((None, error) if error is not None else ((res, token, sent), None))
        return done
