"""Stage runners chained in one process: the compute thread's direct sends keep greedy tokens.

A plain decode step's output leaves from the compute thread when the link allows it
(``send_now``), else through the event loop (``send``); either way, and mixed, the mesh must
give the monolithic tokens.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import trio

from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.pipeline.frames import FWD, TOKEN, Frame, decode_frame, encode_frame
from meshllm.pipeline.stage import StageRunner
from tests.support import greedy_trace

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]
STEPS = 16


@pytest.fixture(scope="module")
def mono(tiny_model):
    return greedy_trace(LocalChain.load(tiny_model, None), PROMPT, STEPS)


@pytest.mark.parametrize("mode", ["thread", "loop", "mixed"])
async def test_direct_sends_from_the_compute_thread_keep_greedy_tokens(tiny_model, mono, mode):
    chain = LocalChain.load(tiny_model, parse_ranges("0-2,2-4,4-6"))
    arch = tiny_model.manifest.architecture
    peers = ["p0", "p1", "p2"]
    loop_thread = threading.get_ident()
    token = trio.lowlevel.current_trio_token()
    tokens_in, tokens_out = trio.open_memory_channel[Frame](64)
    runners: dict[str, StageRunner] = {}
    direct: list[tuple[str, int]] = []  # (peer, step) of frames the compute thread sent
    calls = [0]

    def deliver(peer: str, f: Frame) -> None:
        f = decode_frame(encode_frame(f))  # what the wire would carry
        if peer == "c":
            tokens_in.send_nowait(f)
        else:
            assert runners[peer].submit(f)

    async def send(peer: str, f: Frame) -> None:
        deliver(peer, f)

    def send_now(peer: str, f: Frame) -> bool:
        assert threading.get_ident() != loop_thread
        calls[0] += 1
        if mode == "loop" or (mode == "mixed" and calls[0] % 2):
            return False
        direct.append((peer, f.step))
        trio.from_thread.run_sync(deliver, peer, f, trio_token=token)
        return True

    for i, (peer, runtime) in enumerate(zip(peers, chain.segments, strict=True)):
        runners[peer] = StageRunner(
            runtime, epoch=1, index=i, next_peer=peers[i + 1] if i + 1 < len(peers) else None,
            first_peer="p0", context_length=arch.context_length,
            eos_token_ids=(), send=send, send_now=send_now,
        )  # fmt: skip
    got: list[int] = []
    async with trio.open_nursery() as n:
        for r in runners.values():
            await n.start(r.run)
        cap = len(PROMPT) + STEPS
        first = Frame(kind=FWD, rid="r", epoch=1, step=0, pos=len(PROMPT), new=len(PROMPT),
                      cap=cap, coord="c", tensors={"input_ids": np.asarray([PROMPT])})  # fmt: skip
        deliver("p0", first)
        with trio.fail_after(30):
            async for f in tokens_out:
                assert f.kind == TOKEN, f.error
                got.append(f.token)
                if len(got) == STEPS:
                    break
        n.cancel_scope.cancel()
    assert got == mono.tokens
    assert calls[0] > 0
    # Decode frames reached idle stages: each started its step as the frame arrived.
    assert all(r.early_starts > 0 for r in runners.values())
    if mode == "loop":
        assert not direct
    else:
        assert direct and {p for p, _ in direct} == set(peers)
