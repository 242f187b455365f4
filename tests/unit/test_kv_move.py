"""Moving a request's KV cache between segments of different splits, mid-generation."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest
import trio

from meshllm.mesh.framing import frame
from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.model.runtime import BadInput, UnknownRequest
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.pipeline import kvmove
from meshllm.pipeline.frames import KVSource
from meshllm.pipeline.stage_requests import KVMoveFailed
from tests.support import greedy_trace, memory_pair

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]
STEPS = 20


@pytest.fixture(scope="module")
def mono(tiny_model):
    return greedy_trace(LocalChain.load(tiny_model, None), PROMPT, STEPS)


@pytest.mark.parametrize(("old", "new"), [("0-2,2-4,4-6", "0-1,1-5,5-6"), ("0-3,3-6", "0-6")])
def test_a_request_continues_exactly_on_a_new_split_from_moved_kv(tiny_model, mono, old, new):
    before, after = (
        LocalChain.load(tiny_model, parse_ranges(old)),
        LocalChain.load(tiny_model, parse_ranges(new)),
    )
    cap = len(PROMPT) + STEPS
    before.open("r", cap)
    ids, total, tokens = np.asarray([PROMPT], dtype=np.int64), len(PROMPT), []
    for _ in range(7):  # prefill and six decode steps on the old split
        tokens.append(int(np.argmax(before.forward("r", ids, total))))
        ids, total = np.asarray([[tokens[-1]]], dtype=np.int64), total + 1
    # Stage 0 may already have run the next step when the plan changes: only the positions
    # every stage has are moved (its extra position is recomputed on the new split).
    before.segments[0].step(
        "r", {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}, 1
    )
    length = total - 1
    for seg, rng in zip(after.segments, after.ranges, strict=True):
        kv = {}
        for old_seg, old_rng in zip(before.segments, before.ranges, strict=True):
            mine = [x for x in range(old_rng.start, old_rng.stop) if rng.start <= x < rng.stop]
            if mine:
                kv.update(old_seg.export_kv("r", mine, length))
        seg.open("r", cap, kv)
    after._ones = np.ones((1, cap), dtype=np.int64)
    for _ in range(STEPS - 7):
        tokens.append(int(np.argmax(after.forward("r", ids, total))))
        ids, total = np.asarray([[tokens[-1]]], dtype=np.int64), total + 1
    assert tokens == mono.tokens


def test_moving_kv_checks_what_it_is_given(tiny_model):
    chain = LocalChain.load(tiny_model, parse_ranges("0-3,3-6"))
    seg = chain.segments[0]
    with pytest.raises(UnknownRequest):
        seg.export_kv("nope", [0], 1)
    chain.open("r", 16)
    chain.forward("r", np.asarray([PROMPT], dtype=np.int64), len(PROMPT))
    with pytest.raises(BadInput, match="holds 8 positions"):
        seg.export_kv("r", [0], 9)
    with pytest.raises(BadInput, match="layer 4"):
        seg.export_kv("r", [4], 8)
    kv = seg.export_kv("r", [0, 1, 2], 8)
    with pytest.raises(BadInput, match="layers"):
        seg.open("s", 16, {0: kv[0]})
    bad = {x: (k[:, :1], v) for x, (k, v) in kv.items()}
    with pytest.raises(BadInput, match="does not fit"):
        seg.open("s", 16, bad)


def test_a_sampler_can_skip_the_draws_of_tokens_made_elsewhere():
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=50).astype(np.float32) for _ in range(12)]
    whole = Sampler(params)
    expected = [whole(x) for x in logits]
    moved = Sampler(params)
    moved.skip(5)
    assert [moved(x) for x in logits[5:]] == expected[5:]


# -- the KV protocol between peers (in-memory transport) --------------------------------------
async def _pair(nursery, lookup):
    return await memory_pair(nursery, kvmove.KV_PROTOCOL, lambda s: kvmove.serve(s, lookup))


def _served(tiny_model):
    """Segment 0-3 of a split holding a request of 8 positions, and that request's cache."""
    chain = LocalChain.load(tiny_model, parse_ranges("0-3,3-6"))
    chain.open("r", 16)
    chain.forward("r", np.asarray([PROMPT], dtype=np.int64), len(PROMPT))
    seg = chain.segments[0]
    arch = tiny_model.manifest.architecture
    layout = kvmove.Layout(
        arch.num_key_value_heads, arch.head_size, np.dtype(arch.kv_dtype), arch.context_length
    )
    return seg, layout


async def test_kv_fetch_over_the_mesh_gives_the_old_stage_cache(tiny_model):
    seg, layout = _served(tiny_model)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = await _pair(nursery, lambda epoch: seg if epoch == 5 else None)
            src = KVSource(5, ((a.peer_id, 0, 3), ("someone-else", 3, 6)), 8, 8)
            got = await kvmove.fetch(b, b.peer_id, lambda e: None, src, "r", [1, 2], layout)
            expected = seg.export_kv("r", [1, 2], 8)
            assert sorted(got) == [1, 2]
            for layer in (1, 2):
                for x, y in zip(got[layer], expected[layer], strict=True):
                    assert x.tobytes() == y.tobytes() and x.shape == y.shape

            # What the old peer cannot give is a KVMoveFailed with its reason, never a crash.
            for bad, reason in (
                (KVSource(6, src.stages, 8, 8), "no longer holds plan 6"),
                (KVSource(5, src.stages, 9, 8), "holds 8 positions"),
                (KVSource(5, ((a.peer_id, 0, 2),), 8, 8), r"no old stage ran layers \[2\]"),
                (KVSource(5, (("nobody", 0, 3),), 8, 8), "cannot move"),
            ):
                with pytest.raises(KVMoveFailed, match=reason):
                    await kvmove.fetch(b, b.peer_id, lambda e: None, bad, "r", [1, 2], layout)
            nursery.cancel_scope.cancel()


async def test_kv_server_ignores_garbage_and_a_lying_server_is_refused(tiny_model):
    seg, layout = _served(tiny_model)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = await _pair(nursery, lambda epoch: seg)
            for junk in (
                b"\xff" * 40,
                cbor2.dumps([1, 2]),
                cbor2.dumps({"e": "x"}),
                cbor2.dumps({"e": 5, "r": "r", "l": [10**30], "n": 8}),
            ):
                stream = await b.open_stream(a.peer_id, kvmove.KV_PROTOCOL)
                await stream.write(frame(junk))
                reply = await stream.read(1 << 16)
                assert reply == b"" or b"err" in reply  # nothing, or a reason
                await stream.close()
            # The server still works after all that.
            src = KVSource(5, ((a.peer_id, 0, 3),), 8, 8)
            assert sorted(
                await kvmove.fetch(b, b.peer_id, lambda e: None, src, "r", [1, 2], layout)
            ) == [1, 2]

            # A server sending the wrong size is refused.
            async def liar(stream):
                await stream.read(4096)
                msg = {"r": "r", "n": 8, "l": 1, "k": b"\0" * 8, "v": b"\0" * 8}
                await stream.write(frame(cbor2.dumps(msg)))

            b.set_stream_handler(kvmove.KV_PROTOCOL, liar)
            with pytest.raises(KVMoveFailed, match="does not fit"):
                await kvmove.fetch(
                    a,
                    a.peer_id,
                    lambda e: None,
                    KVSource(5, ((b.peer_id, 0, 3),), 8, 8),
                    "r",
                    [1, 2],
                    layout,
                )
            nursery.cancel_scope.cancel()


async def test_prefetch_pulls_every_request_each_at_its_length(tiny_model):
    seg, layout = _served(tiny_model)  # request "r" at 8 positions
    seg.open("s", 16)
    ids = np.asarray([PROMPT[:5]], dtype=np.int64)
    seg.step("s", {"input_ids": ids, "attention_mask": np.ones((1, 5), dtype=np.int64)}, 5)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = await _pair(nursery, lambda epoch: seg if epoch == 5 else None)
            # Layer 0 is this peer's own (old stage here), layers 1-2 come from peer a.
            mine = LocalChain.load(tiny_model, parse_ranges("0-1,1-6")).segments[0]
            for rid, n in (("r", 8), ("s", 5)):
                mine.open(rid, 16, {0: seg.export_kv(rid, [0], n)[0]})
            stages = ((b.peer_id, 0, 1), (a.peer_id, 1, 3))
            got = await kvmove.prefetch(
                b, b.peer_id, lambda e: mine if e == 5 else None, 5, stages, [0, 1, 2], layout
            )
            assert {r: n for r, (n, _) in got.items()} == {"r": 8, "s": 5}
            for rid, (n, kv) in got.items():
                expected = seg.export_kv(rid, [0, 1, 2], n)
                assert sorted(kv) == [0, 1, 2]
                for layer in kv:
                    assert kv[layer][0].tobytes() == expected[layer][0].tobytes()
            nursery.cancel_scope.cancel()
