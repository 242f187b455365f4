"""Stage runners chained in one process: the compute thread's direct sends keep greedy tokens.

A plain decode step's output leaves from the compute thread when the link allows it
(``send_now``), else through the event loop (``send``); a decode frame for an idle stage may
also run on the thread that read it (``run_here``). Every way, and mixed, the mesh must give
the monolithic tokens.
"""

from __future__ import annotations

import queue
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


@pytest.mark.parametrize("mode", ["thread", "loop", "mixed", "reader"])
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

    links: dict[str, queue.SimpleQueue[Frame | None]] = {p: queue.SimpleQueue() for p in peers}

    def read_link(peer: str) -> None:
        # A fast link's reader thread, as the service runs it: a frame runs right here when
        # the stage is free, else goes to the event loop.
        while (f := links[peer].get()) is not None:
            if not runners[peer].run_here(f, token):
                token.run_sync_soon(lambda f=f: runners[peer].submit(f))

    def deliver(peer: str, f: Frame) -> None:
        f = decode_frame(encode_frame(f))  # what the wire would carry
        if peer == "c":
            tokens_in.send_nowait(f)
        elif mode == "reader" and f.kind == FWD and runners[peer].runtime.cached_length(f.rid):
            links[peer].put(f)
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
        if mode == "reader" and peer != "c":
            deliver(peer, f)  # onto the next stage's link: no event loop in between
        else:
            trio.from_thread.run_sync(deliver, peer, f, trio_token=token)
        return True

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
            send_now=send_now,
        )
    readers = [threading.Thread(target=read_link, args=(p,), daemon=True) for p in peers]
    for t in readers:
        t.start()
    got: list[int] = []
    async with trio.open_nursery() as n:
        for r in runners.values():
            await n.start(r.run)
        cap = len(PROMPT) + STEPS
        first = Frame(
            kind=FWD,
            rid="r",
            epoch=1,
            step=0,
            pos=len(PROMPT),
            new=len(PROMPT),
            cap=cap,
            coord="c",
            tensors={"input_ids": np.asarray([PROMPT])},
        )
        deliver("p0", first)
        with trio.fail_after(30):
            async for f in tokens_out:
                assert f.kind == TOKEN, f.error
                got.append(f.token)
                if len(got) == STEPS:
                    break
        n.cancel_scope.cancel()
    for p in peers:
        links[p].put(None)
    for t in readers:
        t.join(timeout=10)
    assert got == mono.tokens
    assert calls[0] > 0
    # Decode frames reached idle stages: each started its step as the frame arrived.
    assert all(r.early_starts > 0 for r in runners.values())
    on_reader = [r.steps_on_reader for r in runners.values()]
    assert all(on_reader) if mode == "reader" else not any(on_reader)
    if mode == "loop":
        assert not direct
    else:
        assert direct and {p for p, _ in direct} == set(peers)
