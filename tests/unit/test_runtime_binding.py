"""A request's binding is made once and one-token steps write into buffers of their own:
the outputs must not change by it, nor be overwritten by the next step."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


def _decode(seg, rid: str, first: dict, steps: int, *, allocate: bool) -> list[dict]:  # type: ignore[no-untyped-def]
    """Prefill with *first*, then *steps* one-token steps fed the same hidden input."""
    seg.open(rid, len(PROMPT) + steps)
    if allocate:  # ORT allocates every output, as before buffers were kept per request
        seg._caches[rid].decode_outputs = {}
    total = len(PROMPT)
    out = [seg.step(rid, first, total)]
    for _ in range(steps):
        total += 1
        feeds = {k: v[:, -1:] for k, v in first.items() if k != "attention_mask"}
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        out.append(seg.step(rid, feeds, 1))
    seg.close(rid)
    return out


def test_kept_buffers_give_what_ort_allocated_outputs_give(tiny_model) -> None:
    chain = LocalChain.load(tiny_model, parse_ranges("0-3,3-6"))
    first, last = chain.segments
    feeds0 = {"input_ids": np.asarray([PROMPT]), "attention_mask": np.ones((1, 8), np.int64)}
    first.open("p", 16)
    hidden = first.step("p", feeds0, 8)
    first.close("p")
    feeds = {**hidden, "attention_mask": np.ones((1, 8), np.int64)}
    kept = _decode(last, "a", feeds, 4, allocate=False)
    allocated = _decode(last, "b", feeds, 4, allocate=True)
    for a, b in zip(kept, allocated, strict=True):
        assert a.keys() == b.keys() == {"logits"}
        np.testing.assert_array_equal(a["logits"], b["logits"])
    # Each step's outputs are the caller's: the next step did not write over them.
    assert not any(np.shares_memory(kept[i]["logits"], kept[i + 1]["logits"]) for i in range(4))
    assert len({kept[i]["logits"].tobytes() for i in range(1, 5)}) > 1


def test_decode_outputs_are_kept_per_request(tiny_model) -> None:
    chain = LocalChain.load(tiny_model, parse_ranges("0-3,3-6"))
    first = chain.segments[0]
    ids = np.asarray([PROMPT])
    for rid in ("x", "y"):
        first.open(rid, 12)
        first.step(rid, {"input_ids": ids, "attention_mask": np.ones((1, 8), np.int64)}, 8)
        first.step(rid, {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 9), np.int64)}, 1)
    x, y = (first._caches[r].decode_outputs for r in ("x", "y"))
    assert x and y and x.keys() == y.keys() == set(first.data_outputs)
    assert all(not np.shares_memory(x[k][0], y[k][0]) for k in x)


def test_a_prompt_steps_tensors_are_not_kept_by_the_request(tiny_model) -> None:
    """A request's binding lives as long as the request; a prompt step's inputs and outputs
    (logits for every position) must not: a stage with many prompts waiting for their first
    decode step grew by hundreds of MB when the binding kept them."""
    chain = LocalChain.load(tiny_model, None)
    seg = chain.segments[0]
    feeds = {"input_ids": np.asarray([PROMPT]), "attention_mask": np.ones((1, 8), np.int64)}
    refs = []
    for rid in ("a", "b", "allocated"):
        seg.open(rid, 16)
        if rid == "allocated":  # ORT allocates the outputs (shapes the model leaves open)
            seg._caches[rid].decode_outputs = {}
        ids = np.asarray([PROMPT])
        feeds_ref = weakref.ref(ids)
        out = seg.step(rid, {**feeds, "input_ids": ids}, len(PROMPT))
        del ids
        assert out["logits"].shape[:2] == (1, len(PROMPT))
        refs.append(weakref.ref(out["logits"]))
        del out
        binding = seg._caches[rid].binding
        assert binding is not None
        # What the binding holds now: the KV buffers, and the one-token buffers if any; the
        # prompt's input ids went too (a middle stage's hidden states are MBs).
        kept = binding.get_outputs()[2 * len(seg.layers) :]
        assert all(v.shape()[1] == 1 for v in kept), [v.shape() for v in kept]
        assert feeds_ref() is None
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    # The requests decode on from there, the same on either path.
    step = {"input_ids": np.asarray([[7]]), "attention_mask": np.ones((1, 9), np.int64)}
    a, b, allocated = (seg.step(rid, step, 1)["logits"] for rid in ("a", "b", "allocated"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, allocated)
