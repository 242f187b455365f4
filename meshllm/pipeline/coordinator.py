"""The coordinator of a query: the peer that received it. Tokenizes, feeds stage 0, collects
tokens from the last stage, streams them to the client, and frees the pipeline at the end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field

import numpy as np
import trio

from meshllm.errors import MeshError
from meshllm.model.generate import check_context
from meshllm.model.manifest import Architecture
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.frames import END, ERROR, FWD, TOKEN, Frame
from meshllm.pipeline.plan import Plan

Send = Callable[[str, Frame], Awaitable[None]]


class QueryFailed(MeshError):
    """A query could not be completed by the mesh."""


@dataclass
class QueryResult:
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    plan_epoch: int
    stages: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Coordinator:
    def __init__(self, self_id: str, send: Send, step_timeout_s: float = 30.0):
        self.self_id = self_id
        self.send = send
        self.step_timeout_s = step_timeout_s
        self._waiting: dict[str, trio.MemorySendChannel[Frame]] = {}

    def deliver(self, f: Frame) -> None:
        """A TOKEN or ERROR frame for a request coordinated here."""
        ch = self._waiting.get(f.rid)
        if ch is not None:
            # A confused stage flooding us is ignored; the request then fails on its own.
            with suppress(trio.WouldBlock):
                ch.send_nowait(f)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def run_query(
        self,
        plan: Plan,
        arch: Architecture,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        sampling: SamplingParams,
        on_token: Callable[[int], Awaitable[None]] | None = None,
    ) -> QueryResult:
        capacity = check_context(arch, len(prompt_ids), max_tokens)
        budget = capacity - len(prompt_ids)
        eos = set(arch.eos_token_ids)
        rid = uuid.uuid4().hex
        first_peer = plan.stages[0].peer
        send_ch, recv_ch = trio.open_memory_channel[Frame](8)
        self._waiting[rid] = send_ch
        out: list[int] = []
        compute = [0.0] * len(plan.stages)
        step_wall = 0.0
        finish = "length"
        t0 = time.perf_counter()
        first_at = last_at = t0
        try:
            ids = np.asarray([prompt_ids], dtype=np.int64)
            pos = len(prompt_ids)
            sm = {"temperature": sampling.temperature, "top_k": sampling.top_k,
                  "top_p": sampling.top_p, "seed": sampling.seed}  # fmt: skip
            # Only the first step is sent from here: the last stage feeds each sampled token
            # back to stage 0 itself and copies it to us.
            first = Frame(kind=FWD, rid=rid, epoch=plan.epoch, step=0, pos=pos, new=ids.shape[1],
                          cap=capacity, coord=self.self_id, sampling=sm,
                          tensors={"input_ids": ids})  # fmt: skip
            try:
                await self.send(first_peer, first)
            except MeshError as exc:
                raise QueryFailed(f"cannot reach the first stage: {exc}") from None
            sent = time.perf_counter()
            for step in range(budget):
                with trio.move_on_after(self.step_timeout_s) as scope:
                    reply = await recv_ch.receive()
                if scope.cancelled_caught:
                    raise QueryFailed(f"no token from the mesh within {self.step_timeout_s:g} s")
                if reply.kind == ERROR:
                    raise QueryFailed(reply.error)
                if reply.kind != TOKEN or reply.step != step:
                    raise QueryFailed(f"unexpected {reply.kind} frame for step {reply.step}")
                last_at = time.perf_counter()
                step_wall += last_at - sent
                sent = last_at
                for i, c in enumerate(reply.compute_s[: len(compute)]):
                    compute[i] += c
                if not out:
                    first_at = last_at
                out.append(reply.token)
                if on_token is not None:
                    await on_token(reply.token)
                if reply.token in eos:
                    finish = "stop"
                    break
        finally:
            del self._waiting[rid]
            with trio.CancelScope(shield=True), trio.move_on_after(2), suppress(MeshError):
                end = Frame(kind=END, rid=rid, epoch=plan.epoch, coord=self.self_id)
                await self.send(first_peer, end)
        steps = len(out)
        stages = [
            {"peer": s.peer, "layers": str(s.range), "compute_s": round(compute[i], 6)}
            for i, s in enumerate(plan.stages)
        ]
        transfer = max(0.0, step_wall - sum(compute))
        stages.append({"transfer_and_overhead_s": round(transfer, 6), "steps": steps})
        decode = steps - 1
        return QueryResult(
            token_ids=out,
            prompt_tokens=len(prompt_ids),
            finish_reason=finish,
            ttft_s=first_at - t0,
            decode_tokens_per_s=decode / (last_at - first_at) if decode > 0 else 0.0,
            total_s=time.perf_counter() - t0,
            plan_epoch=plan.epoch,
            stages=stages,
        )
