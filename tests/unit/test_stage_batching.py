"""A stage runs the queued decode steps of different requests as one batch: every request
still gets its monolithic greedy tokens, frames that cannot join a batch keep their order,
and ``max_batch=1`` turns batching off."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.pipeline.frames import FWD, TOKEN, Frame, decode_frame, encode_frame
from meshllm.pipeline.stage import StageRunner
from meshllm.pipeline.stage_queue import Batcher
from meshllm.pipeline.stage_steps import StepStarter
from tests.support import greedy_trace

PROMPTS = {
    "a": [5, 17, 42, 99, 3, 250, 7, 64],
    "b": [9, 8, 7],
    "c": list(range(1, 12)),
    "d": [300, 301, 302, 303, 304],
}
STEPS = 12


@pytest.fixture(scope="module")
def monos(tiny_model):
    chain = LocalChain.load(tiny_model, None)
    return {rid: greedy_trace(chain, p, STEPS).tokens for rid, p in PROMPTS.items()}


def _first(rid: str) -> Frame:
    p = PROMPTS[rid]
    return Frame(
        kind=FWD,
        rid=rid,
        epoch=1,
        pos=len(p),
        new=len(p),
        cap=len(p) + STEPS,
        coord="c",
        tensors={"input_ids": np.asarray([p])},
    )


async def _serve(
    tiny_model, ranges: str, max_batch: int, *, late: str | None = None, direct: bool = True
):  # type: ignore[no-untyped-def]
    """Stages chained in one process. With *direct*, a decode step's output leaves from the
    compute thread as the service sends it (a batch's rows then go on as a group); else
    through the event loop. All requests but *late* start at once; *late* starts once the
    others are decoding. Tokens per request, and the runners."""
    chain = LocalChain.load(tiny_model, parse_ranges(ranges))
    arch = tiny_model.manifest.architecture
    peers = [f"p{i}" for i in range(len(chain.segments))]
    runners: dict[str, StageRunner] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    done = trio.Event()
    started: list[str] = []

    token = trio.lowlevel.current_trio_token()

    def send_now(peer: str, f: Frame) -> bool:
        trio.from_thread.run_sync(deliver, peer, decode_frame(encode_frame(f)), trio_token=token)
        return True

    async def send(peer: str, f: Frame) -> None:
        deliver(peer, decode_frame(encode_frame(f)))

    def deliver(peer: str, f: Frame) -> None:
        if peer != "c":
            assert runners[peer].submit(f)
            return
        assert f.kind == TOKEN, f.error
        tokens[f.rid].append(f.token)
        if late and not started and len(tokens[f.rid]) == 3:
            started.append(late)
            runners["p0"].submit(_first(late))
        if all(len(t) == STEPS for t in tokens.values()):
            done.set()

    for i, (peer, runtime) in enumerate(zip(peers, chain.segments, strict=True)):
        runners[peer] = StageRunner(
            runtime,
            epoch=1,
            index=i,
            next_peer=peers[i + 1] if i + 1 < len(peers) else None,
            first_peer="p0",
            context_length=arch.context_length,
            eos_token_ids=(),
            send=send,
            max_batch=max_batch,
            send_now=send_now if direct else None,
        )
    async with trio.open_nursery() as n:
        for r in runners.values():
            await n.start(r.run)
        for rid in PROMPTS:
            if rid != late:
                runners["p0"].submit(_first(rid))
        with trio.fail_after(60):
            await done.wait()
        n.cancel_scope.cancel()
    return tokens, list(runners.values())


def _record_steps(monkeypatch) -> dict[int, list[tuple[str, ...]]]:
    """Each stage's steps in the order they start: the requests each one ran."""
    steps: dict[int, list[tuple[str, ...]]] = {}
    start, run_batch = StepStarter.start, StepStarter.run_batch

    def start_one(self, f, **kw):  # type: ignore[no-untyped-def]
        steps.setdefault(id(self), []).append((f.rid,))
        return start(self, f, **kw)

    async def start_batch(self, frames, **kw):  # type: ignore[no-untyped-def]
        steps.setdefault(id(self), []).append(tuple(f.rid for f in frames))
        return await run_batch(self, frames, **kw)

    monkeypatch.setattr(StepStarter, "start", start_one)
    monkeypatch.setattr(StepStarter, "run_batch", start_batch)
    return steps


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "loop"])
@pytest.mark.parametrize("ranges", ["0-6", "0-2,2-6"])
async def test_batched_stages_give_every_request_its_monolithic_tokens(
    tiny_model, monos, ranges, direct, monkeypatch
):
    # A group's rows leave the previous stage microseconds apart; on a busy machine the
    # thread that hands them over can be descheduled for longer than a stage waits for them.
    # Waiting long here makes what is checked the grouping, not the machine's scheduling
    # (every row of a group does arrive, so the wait never runs out in a correct stage).
    monkeypatch.setattr(Batcher, "GROUP_WAIT_S", 5.0)
    steps = _record_steps(monkeypatch)
    tokens, runners = await _serve(tiny_model, ranges, max_batch=8, direct=direct)
    assert tokens == monos
    # Every request's steps after the first came in while the stage was busy: batches.
    assert all(r.batches > 0 for r in runners)
    assert all(r.batched_steps >= 2 * r.batches for r in runners)
    if direct:
        # A batch's rows go on as a group and run as one batch at the next stage too: once
        # a request has run in a batch at a stage, it runs alone there again only when every
        # other request has ended. (When the requests first meet depends on the machine's
        # scheduling; that they then stay together does not.)
        assert len(steps) == len(runners)
        for order in steps.values():
            ran = dict.fromkeys(PROMPTS, 0)
            batched: set[str] = set()
            for rids in order:
                for rid in rids:
                    ran[rid] += 1
                if len(rids) > 1:
                    batched.update(rids)
                elif rids[0] in batched:
                    others = [n for rid, n in ran.items() if rid != rids[0]]
                    assert all(n == STEPS for n in others), str(order)
            assert all(n == STEPS for n in ran.values()), str(order)


async def test_a_request_starting_among_batches_keeps_order_and_tokens(tiny_model, monos):
    # Its prompt frame cannot join a batch: it waits its turn, then joins the others.
    tokens, runners = await _serve(tiny_model, "0-3,3-6", max_batch=8, late="d")
    assert tokens == monos
    assert all(r.batches > 0 for r in runners)


async def test_max_batch_one_turns_batching_off(tiny_model, monos):
    tokens, runners = await _serve(tiny_model, "0-6", max_batch=1)
    assert tokens == monos
    assert all(r.batches == 0 for r in runners)
