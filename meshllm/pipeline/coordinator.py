"""The coordinator of a query: the peer that received it. Tokenizes, feeds stage 0, collects
tokens from the last stage, streams them to the client, and frees the pipeline at the end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field

import numpy as np
import structlog
import trio

from meshllm.errors import MeshError, QueryFailed
from meshllm.model.generate import check_context
from meshllm.model.manifest import Architecture
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.frames import END, ERROR, FWD, TOKEN, Frame, KVSource
from meshllm.pipeline.plan import Plan

Send = Callable[[str, Frame], Awaitable[None]]
log = structlog.get_logger("meshllm.coordinator")


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
    recoveries: list[dict] = field(default_factory=list)  # plan changes survived
    queued_s: float = 0.0  # time spent waiting for room in a full mesh

    def to_dict(self) -> dict:
        return asdict(self)


NextPlan = Callable[[int, str], Awaitable[Plan]]
# Sees each generated token; a true result ends the query there.
OnToken = Callable[[int], Awaitable[bool | None]]


class _Interrupted(Exception):
    """The current plan cannot finish this request (a peer left, the plan was replaced)."""


class _Busy(Exception):
    """A stage is full: the request was not started there and may be sent again."""


@dataclass
class _Run:
    """One request's progress across plans."""

    rid: str
    prompt_ids: list[int]
    capacity: int
    budget: int
    sampling: dict
    out: list[int] = field(default_factory=list)
    finish: str = "length"
    compute: list[float] = field(default_factory=list)
    step_wall: float = 0.0
    t0: float = 0.0
    first_at: float = 0.0
    last_at: float = 0.0
    recoveries: list[dict] = field(default_factory=list)
    waited_s: float = 0.0  # queued while the mesh was full


class Coordinator:
    """Runs queries through the pipeline and carries them across plan changes.

    When a plan cannot finish a request (a stage's peer died or became unreachable, or the
    leader replaced the plan), the coordinator waits for the next plan and replays the
    request on it: the prompt as one prefill, then every token generated so far fed back as
    a forced decode step. The new stages thus rebuild exactly the KV caches the old ones had
    (same computations in the same order), and generation continues where it stopped: the
    client sees one uninterrupted answer.
    """

    def __init__(
        self,
        self_id: str,
        send: Send,
        step_timeout_s: float = 30.0,
        *,
        current_epoch: Callable[[], int] | None = None,
        next_plan: NextPlan | None = None,
        max_replays: int = 4,
        peer_alive: Callable[[str], bool] | None = None,
        why_stalled: Callable[[Plan], str] | None = None,
    ):
        self.self_id = self_id
        self.send = send
        self.step_timeout_s = step_timeout_s
        self.current_epoch = current_epoch
        self.next_plan = next_plan
        self.max_replays = max_replays
        # With it, a request carried to a new plan has its KV cache moved from the old plan's
        # peers (when all of them are alive) instead of being replayed; see kvmove.
        self.peer_alive = peer_alive
        # Says which stage holds a query up, from what the stages publish (pipeline.stall).
        self.why_stalled = why_stalled
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
        on_token: OnToken | None = None,
    ) -> QueryResult:
        """Generate up to *max_tokens* after *prompt_ids*. *on_token* sees each new token as it
        comes; when it returns True the query ends there, finished as "stop" (a stop sequence
        the caller found in the text)."""
        capacity = check_context(arch, len(prompt_ids), max_tokens)
        run = _Run(
            rid=uuid.uuid4().hex,
            prompt_ids=list(prompt_ids),
            capacity=capacity,
            budget=capacity - len(prompt_ids),
            sampling=sampling.to_wire(),
        )
        eos = set(arch.eos_token_ids)
        send_ch, recv_ch = trio.open_memory_channel[Frame](64)
        self._waiting[run.rid] = send_ch
        run.t0 = run.first_at = run.last_at = time.perf_counter()
        backoff, waited = 0.05, 0.0
        moved: KVSource | None = None

        async def fresh_id() -> None:
            # Retried on the same stages: free what they hold, and go on under a fresh id
            # so that late frames of the broken attempt are ignored.
            await self._end(plan, run.rid)
            del self._waiting[run.rid]
            run.rid = uuid.uuid4().hex
            self._waiting[run.rid] = send_ch
            while True:
                try:
                    recv_ch.receive_nowait()
                except trio.WouldBlock:
                    break

        try:
            while True:
                had = len(run.out)
                try:
                    await self._attempt(plan, run, recv_ch, eos, on_token, moved)
                    break
                except _Busy as exc:
                    # Queue rather than fail: the mesh holds as many requests as its limits
                    # allow; one finishes soon. What was started is freed first.
                    if waited >= self.step_timeout_s:
                        raise QueryFailed(
                            f"the mesh stayed busy for {waited:.0f} s: {exc}"
                        ) from None
                    await self._end(plan, run.rid)
                    await trio.sleep(backoff)
                    waited += backoff
                    backoff = min(backoff * 2, 1.0)
                    run.waited_s = waited
                except _Interrupted as exc:
                    if moved is not None and len(run.out) == had:
                        # The move itself failed (an old peer gone, its caches released):
                        # replay on the same plan instead.
                        run.recoveries[-1]["moved_kv"] = f"failed: {exc}"
                        moved = None
                        await fresh_id()
                        continue
                    if self.next_plan is None or len(run.recoveries) >= self.max_replays:
                        raise QueryFailed(str(exc)) from None
                    t = time.perf_counter()
                    # No END to the old plan: its stages are dropped when the new one is
                    # adopted, and its first peer may be the one that is gone.
                    old = plan
                    plan = await self.next_plan(plan.epoch, str(exc))
                    moved = None
                    if plan.epoch == old.epoch:
                        await fresh_id()
                    else:
                        moved = self._kv_source(old, run)
                    run.recoveries.append(
                        {
                            "reason": str(exc),
                            "tokens_done": len(run.out),
                            "wait_s": round(time.perf_counter() - t, 3),
                            "epoch": plan.epoch,
                            "moved_kv": moved is not None,
                        }
                    )
        finally:
            del self._waiting[run.rid]
            await self._end(plan, run.rid)
        return self._result(plan, run)

    def _kv_source(self, old: Plan, run: _Run) -> KVSource | None:
        """Where the request's KV cache can be fetched from, or None to replay it."""
        if self.peer_alive is None or not run.out:
            return None
        if not all(self.peer_alive(s.peer) for s in old.stages):
            return None
        # Every old stage has run each position up to the one that produced the last
        # token; the stages may be a step further, which the new plan recomputes.
        length = len(run.prompt_ids) + len(run.out) - 1
        return KVSource(old.epoch, old.stage_triples, length, drawn=len(run.out))

    async def _end(self, plan: Plan, rid: str) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2), suppress(MeshError):
            end = Frame(kind=END, rid=rid, epoch=plan.epoch, coord=self.self_id)
            await self.send(plan.stages[0].peer, end)

    async def _attempt(
        self,
        plan: Plan,
        run: _Run,
        recv_ch: trio.MemoryReceiveChannel[Frame],
        eos: set[int],
        on_token: OnToken | None,
        moved: KVSource | None = None,
    ) -> None:
        """Run (or replay, or resume from moved KV caches, and continue) the request on
        *plan* until it is done."""
        run.compute = [0.0] * len(plan.stages)
        if moved is not None:
            # The stages fetch the cache up to the last token's position: that token is
            # the next step's input.
            ids = np.asarray([[run.out[-1]]], dtype=np.int64)
            pos, new, force, replayed = moved.length + 1, 1, [], 0
        else:
            ids = np.asarray([run.prompt_ids], dtype=np.int64)
            pos = new = len(run.prompt_ids)
            force, replayed = list(run.out), len(run.out)
        # Only the first step is sent from here: the last stage feeds each token back to
        # stage 0 itself (the forced ones first) and copies it to us.
        first = Frame(
            kind=FWD,
            rid=run.rid,
            epoch=plan.epoch,
            step=0,
            pos=pos,
            new=new,
            cap=run.capacity,
            coord=self.self_id,
            sampling=run.sampling,
            tensors={"input_ids": ids},
            force=force,
            kv_from=moved,
        )
        try:
            await self.send(plan.stages[0].peer, first)
        except MeshError as exc:
            raise _Interrupted(f"cannot reach the first stage: {exc}") from None
        sent = time.perf_counter()
        step = 0
        while len(run.out) < run.budget:
            reply = await self._next_reply(plan, recv_ch)
            if reply.kind == ERROR:
                if reply.busy:
                    raise _Busy(reply.error)
                if reply.retry:
                    raise _Interrupted(reply.error)
                raise QueryFailed(reply.error)
            if reply.kind != TOKEN or reply.step != step:
                raise QueryFailed(f"unexpected {reply.kind} frame for step {reply.step}")
            step += 1
            if step <= replayed:
                if reply.token != run.out[step - 1]:
                    raise QueryFailed(f"replay diverged at token {step}")
                sent = time.perf_counter()
                continue
            now = time.perf_counter()
            run.step_wall += now - sent
            sent = run.last_at = now
            for i, c in enumerate(reply.compute_s[: len(run.compute)]):
                run.compute[i] += c
            if not run.out:
                run.first_at = now
            run.out.append(reply.token)
            if on_token is not None and await on_token(reply.token):
                run.finish = "stop"
                return
            if reply.token in eos:
                run.finish = "stop"
                return

    async def _next_reply(self, plan: Plan, recv_ch: trio.MemoryReceiveChannel[Frame]) -> Frame:
        """The next frame of this request on *plan*; interrupted if the plan is replaced
        or nothing comes within the step timeout."""
        deadline = trio.current_time() + self.step_timeout_s
        while True:
            if self.current_epoch is not None and self.current_epoch() > plan.epoch:
                raise _Interrupted(f"plan {plan.epoch} was replaced")
            # Short waits: a replaced plan is noticed within 0.1 s even with no frame.
            with trio.move_on_after(min(0.1, max(0.0, deadline - trio.current_time()))):
                reply = await recv_ch.receive()
                if reply.epoch == plan.epoch:
                    return reply
                continue  # a late frame of an earlier plan
            if trio.current_time() >= deadline:
                why = f"no token from the mesh within {self.step_timeout_s:g} s"
                if self.why_stalled is not None:
                    why += f": {self.why_stalled(plan)}"
                log.warning("query_stalled", epoch=plan.epoch, reason=why)
                raise _Interrupted(why)

    @staticmethod
    def _result(plan: Plan, run: _Run) -> QueryResult:
        stages = [
            {"peer": s.peer, "layers": str(s.range), "compute_s": round(run.compute[i], 6)}
            for i, s in enumerate(plan.stages)
            if i < len(run.compute)
        ]
        transfer = max(0.0, run.step_wall - sum(run.compute))
        stages.append({"transfer_and_overhead_s": round(transfer, 6), "steps": len(run.out)})
        decode = len(run.out) - 1
        span = run.last_at - run.first_at
        return QueryResult(
            token_ids=run.out,
            prompt_tokens=len(run.prompt_ids),
            finish_reason=run.finish,
            ttft_s=run.first_at - run.t0,
            decode_tokens_per_s=decode / span if decode > 0 and span > 0 else 0.0,
            total_s=time.perf_counter() - run.t0,
            plan_epoch=plan.epoch,
            stages=stages,
            recoveries=run.recoveries,
            queued_s=round(run.waited_s, 3),
        )
