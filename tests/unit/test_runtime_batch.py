"""Several requests' one-token steps run as one batch must give exactly what separate steps
give (the mesh's greedy answers rest on it), leave each request's cache as separate steps
would, and refuse what cannot be batched."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.errors import PromptTooLong
from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.model.runtime import BadInput, UnknownRequest

PROMPTS = {"a": [5, 17, 42, 99, 3, 250, 7, 64], "b": [9, 8, 7], "c": list(range(1, 12))}
STEPS = 6


def _run(chain: LocalChain, batches: list[list[str]]) -> dict[str, list[dict]]:
    """Greedy decoding of every prompt, each decode round split into *batches* (a batch
    of one runs through ``step``); the outputs of every segment at every step."""
    segs = chain.segments
    outs: dict[str, list[dict]] = {rid: [] for rid in PROMPTS}
    nxt: dict[str, int] = {}
    for rid, prompt in PROMPTS.items():
        feeds: dict = {
            "input_ids": np.asarray([prompt]),
            "attention_mask": np.ones((1, len(prompt)), np.int64),
        }
        for seg in segs:
            seg.open(rid, len(prompt) + STEPS + 1)
            feeds.update(seg.step(rid, feeds, len(prompt)))
        nxt[rid] = int(feeds["logits"][0, -1].argmax())
    for _ in range(STEPS):
        for batch in batches:
            feeds_of = {rid: {"input_ids": np.asarray([[nxt[rid]]])} for rid in batch}
            for seg in segs:
                if len(batch) == 1:
                    rid = batch[0]
                    total = seg.cached_length(rid) + 1
                    feeds_of[rid]["attention_mask"] = np.ones((1, total), np.int64)
                    results = [seg.step(rid, feeds_of[rid], 1)]
                else:
                    results = seg.step_batch(batch, [feeds_of[r] for r in batch])
                for rid, res in zip(batch, results, strict=True):
                    outs[rid].append({k: v.copy() for k, v in res.items()})
                    feeds_of[rid].update(res)
            for rid in batch:
                nxt[rid] = int(feeds_of[rid]["logits"][0, -1].argmax())
    return outs


def _kv(chain: LocalChain) -> dict[str, list[np.ndarray]]:
    return {
        rid: [
            seg.export_kv(rid, seg.layers, seg.cached_length(rid))[layer][i]
            for seg in chain.segments
            for layer in seg.layers
            for i in (0, 1)
        ]
        for rid in PROMPTS
    }


def test_a_batched_step_equals_separate_steps_bit_for_bit(tiny_model) -> None:
    chain = LocalChain.load(tiny_model, parse_ranges("0-2,2-6"))
    alone = _run(chain, [["a"], ["b"], ["c"]])
    kv_alone = _kv(chain)
    for rid in PROMPTS:
        chain.close(rid)
    together = _run(chain, [["c", "a", "b"]])
    kv_together = _kv(chain)
    for rid in PROMPTS:
        chain.close(rid)
    mixed = _run(chain, [["b", "c"], ["a"]])
    kv_mixed = _kv(chain)
    for other, kv_other in ((together, kv_together), (mixed, kv_mixed)):
        for rid in PROMPTS:
            assert len(other[rid]) == len(alone[rid]) == 2 * STEPS
            for x, y in zip(alone[rid], other[rid], strict=True):
                assert x.keys() == y.keys()
                for name in x:
                    np.testing.assert_array_equal(x[name], y[name])
            for x, y in zip(kv_alone[rid], kv_other[rid], strict=True):
                np.testing.assert_array_equal(x, y)
    # Greedy answers differ per prompt: the rows were not mixed up.
    answers = {tuple(int(o["logits"][0, -1].argmax()) for o in alone[r][1::2]) for r in PROMPTS}
    assert len(answers) > 1


def test_a_batch_refuses_what_it_cannot_run(tiny_fp32) -> None:
    seg = LocalChain.load(tiny_fp32, parse_ranges("0-6")).segments[0]
    ids = {"input_ids": np.asarray([[3]])}
    with pytest.raises(UnknownRequest):
        seg.step_batch(["nobody"], [ids])
    seg.open("x", 2)
    prompt = {"input_ids": np.asarray([[1, 2]]), "attention_mask": np.ones((1, 2), np.int64)}
    seg.step("x", prompt, 2)
    seg.open("y", 4)
    with pytest.raises(PromptTooLong):
        seg.step_batch(["y", "x"], [ids, ids])
    with pytest.raises(BadInput):
        seg.step_batch(["y", "y"], [ids, ids])
    assert seg.cached_length("y") == 0 and seg.cached_length("x") == 2
