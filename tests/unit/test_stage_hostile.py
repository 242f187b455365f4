"""A frame that passes every check and still breaks its step fails its own request only."""

from __future__ import annotations

from typing import Any

import numpy as np
import trio

from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.pipeline.frames import ERROR, FWD, TOKEN, Frame, decode_frame, encode_frame
from meshllm.pipeline.stage import StageRunner
from tests.support import greedy_trace

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]
STEPS = 6


async def run_two(runtime: Any, arch: Any, bad: list[int]) -> tuple[list[int], list[str]]:
    """Request "bad" with prompt *bad*, then "good" with PROMPT, through one stage holding
    every layer: the good request's tokens, and the errors the bad one got."""
    out_send, out_recv = trio.open_memory_channel[Frame](64)
    stage: StageRunner

    async def send(peer: str, f: Frame) -> None:
        f = decode_frame(encode_frame(f))  # what the wire would carry
        if peer == "c":
            out_send.send_nowait(f)
        else:
            assert stage.submit(f)

    stage = StageRunner(
        runtime,
        epoch=1,
        index=0,
        next_peer=None,
        first_peer="p0",
        context_length=arch.context_length,
        eos_token_ids=(),
        send=send,
    )
    cap = len(PROMPT) + STEPS
    async with trio.open_nursery() as nursery:
        await nursery.start(stage.run)
        for rid, ids in (("bad", bad), ("good", PROMPT)):
            assert stage.submit(
                Frame(
                    kind=FWD,
                    rid=rid,
                    epoch=1,
                    pos=len(ids),
                    new=len(ids),
                    cap=cap,
                    coord="c",
                    tensors={"input_ids": np.asarray([ids])},
                )
            )
        got: list[int] = []
        errors: list[str] = []
        with trio.fail_after(60):
            async for f in out_recv:
                if f.rid == "bad":
                    assert f.kind == ERROR
                    errors.append(f.error)
                    continue
                assert f.kind == TOKEN, f.error
                got.append(f.token)
                if len(got) == STEPS:
                    break
        nursery.cancel_scope.cancel()
    return got, errors


async def test_a_token_id_past_the_vocabulary_fails_its_request_only(tiny_model) -> None:
    mono = greedy_trace(LocalChain.load(tiny_model, None), PROMPT, STEPS)
    (runtime,) = LocalChain.load(tiny_model, parse_ranges("0-6")).segments
    arch = tiny_model.manifest.architecture
    # Well-formed (int64, one row, eight positions), but no embedding row has this id: the
    # int4 embedding kernel would read past its table rather than fail.
    got, errors = await run_two(runtime, arch, [*PROMPT[:-1], arch.vocab_size + 10**9])
    assert errors and "outside the vocabulary" in errors[0]
    assert got == mono.tokens


async def test_a_step_that_breaks_unexpectedly_fails_its_request_only(tiny_model) -> None:
    mono = greedy_trace(LocalChain.load(tiny_model, None), PROMPT, STEPS)
    (runtime,) = LocalChain.load(tiny_model, parse_ranges("0-6")).segments
    real_step = runtime.step

    def step(rid: str, *args: Any, **kwargs: Any) -> Any:
        if rid == "bad":
            raise ValueError("an error no check foresaw")
        return real_step(rid, *args, **kwargs)

    runtime.step = step
    got, errors = await run_two(runtime, tiny_model.manifest.architecture, PROMPT)
    assert errors and "step failed: ValueError" in errors[0]
    assert got == mono.tokens


async def test_a_position_past_the_context_allocates_nothing(tiny_model) -> None:
    """A frame for an open request names its position: one far past the context must fail
    that step, not size the stage's attention mask (2**31 positions would be 16 GiB)."""
    (runtime,) = LocalChain.load(tiny_model, parse_ranges("0-6")).segments
    arch = tiny_model.manifest.architecture
    errors: list[str] = []

    async def send(peer: str, f: Frame) -> None:
        if f.kind == ERROR:
            errors.append(f.error)

    stage = StageRunner(
        runtime,
        epoch=1,
        index=0,
        next_peer=None,
        first_peer="p0",
        context_length=arch.context_length,
        eos_token_ids=(),
        send=send,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(stage.run)
        ids = np.asarray([PROMPT])
        stage.submit(
            Frame(
                kind=FWD,
                rid="r",
                epoch=1,
                pos=len(PROMPT),
                new=len(PROMPT),
                cap=len(PROMPT) + 4,
                coord="c",
                tensors={"input_ids": ids},
            )
        )
        stage.submit(
            Frame(
                kind=FWD,
                rid="r",
                epoch=1,
                step=1,
                pos=2**31,
                new=1,
                coord="c",
                tensors={"input_ids": ids[:, :1]},
            )
        )
        with trio.fail_after(60):
            while not errors:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert "past the context" in errors[0]
    assert stage.steps_on.mask_width <= arch.context_length
