"""Partitioner and segment runtime on the tiny generated Llama (int4 and fp32)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from meshllm.errors import BadRanges, PromptTooLong
from meshllm.model.chain import LocalChain
from meshllm.model.generate import generate
from meshllm.model.graph import load_graph
from meshllm.model.ranges import LayerRange, even_ranges, parse_ranges
from meshllm.model.tokenizer import ChatTokenizer
from tests.support import greedy_trace, max_logit_diff

SPLITS = ["0-1,1-2,2-3,3-4,4-5,5-6", "0-3,3-6", "0-1,1-5,5-6", "0-5,5-6", "0-2,2-3,3-6"]


@pytest.fixture(scope="module")
def prompt_ids():
    return [5, 17, 42, 99, 3, 250, 7, 64]


@pytest.fixture(scope="module")
def mono_trace(tiny_model, prompt_ids):
    return greedy_trace(LocalChain.load(tiny_model, None), prompt_ids, 24)


@pytest.mark.parametrize("split", SPLITS)
def test_split_equals_monolithic(tiny_model, prompt_ids, mono_trace, split):
    chain = LocalChain.load(tiny_model, parse_ranges(split))
    trace = greedy_trace(chain, prompt_ids, 24)
    assert trace.tokens == mono_trace.tokens
    # Same kernels on the same inputs: the split model is bitwise the whole model.
    assert max_logit_diff(trace, mono_trace) <= 1e-5


def test_generated_tokens_vary_with_input(tiny_model, mono_trace):
    other = greedy_trace(LocalChain.load(tiny_model, None), [9, 8, 7], 24)
    assert other.tokens != mono_trace.tokens
    assert len(set(mono_trace.tokens)) > 1


def test_segment_io_is_exactly_the_crossing_tensors(tiny_model):
    kv = tiny_model.manifest.kv_names
    files = tiny_model.segments(parse_ranges("0-2,2-4,4-6"))
    ios = []
    for path, info in files:
        m = onnx.load(str(path), load_external_data=False)
        ins = [i.name for i in m.graph.input]
        outs = [o.name for o in m.graph.output]
        assert ins == list(info.inputs) and outs == list(info.outputs)
        own = range(info.start, info.stop)
        assert {n for n in ins if n.startswith("past_")} == {n for i in own for n in kv.past(i)}
        assert {n for n in outs if n.startswith("present")} == {
            n for i in own for n in kv.present(i)
        }
        ios.append(
            (
                [n for n in ins if not n.startswith("past_")],
                [n for n in outs if not n.startswith("present")],
            )
        )
    (in0, out0), (in1, out1), (in2, out2) = ios
    assert in0 == ["input_ids", "attention_mask"]
    # Between two layers exactly two tensors cross: the residual sum and the MLP output.
    assert len(out0) == 2 and in1 == ["attention_mask", *out0]
    assert len(out1) == 2 and in2 == ["attention_mask", *out1]
    assert out2 == ["logits"]
    # The mask subgraph is replicated, not sent: every segment computes it from attention_mask.
    for path, _ in files:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert "ReduceSum" in ops


def test_weights_are_split_without_duplication(tiny_model):
    graph = load_graph(tiny_model.onnx_path, tiny_model.manifest.kv_names)
    total = graph.total_weight_bytes()
    for ranges in (even_ranges(6, 6), even_ranges(6, 2), parse_ranges("0-1,1-5,5-6")):
        files = tiny_model.segments(ranges)
        seg_sum = sum((p.parent / "segment.onnx.data").stat().st_size for p, _ in files)
        # Tensors used by more than one segment (rotary caches; the tied embedding/head).
        replicated = _replicated_bytes(graph, ranges)
        assert abs(seg_sum - (total + replicated)) <= 0.02 * (total + replicated)


def _replicated_bytes(graph, ranges):
    from meshllm.model.graph import tensor_nbytes

    count: dict[str, int] = {}
    for r in ranges:
        for name in graph.segment_initializers(graph.segment_nodes(r)):
            count[name] = count.get(name, 0) + 1
    return sum(tensor_nbytes(graph.initializers[n]) * (c - 1) for n, c in count.items())


def test_middle_segment_holds_only_its_layers(tiny_model):
    ((path, _info),) = [
        f for f in tiny_model.segments(parse_ranges("0-2,2-4,4-6")) if f[1].start == 2
    ]
    m = onnx.load(str(path), load_external_data=False)
    layer_ids = set()
    for t in m.graph.initializer:
        if "layers." in t.name:
            layer_ids.add(int(t.name.split("layers.")[1].split(".")[0]))
        else:  # only the shared rotary tables may be unlabeled
            assert "cache" in t.name, t.name
    assert layer_ids == {2, 3}
    assert not any("embed" in t.name or "lm_head" in t.name for t in m.graph.initializer)


def test_segments_are_cached_and_reused(tiny_model):
    ranges = parse_ranges("0-3,3-6")
    first = tiny_model.segments(ranges)
    mtimes = [p.stat().st_mtime_ns for p, _ in first]
    again = tiny_model.segments(ranges)
    assert [p.stat().st_mtime_ns for p, _ in again] == mtimes


def test_bad_ranges_are_rejected(tiny_model):
    for text in ("0-2,3-6", "0-4,3-6", "0-3,3-7"):
        with pytest.raises(BadRanges):
            LocalChain.load(tiny_model, parse_ranges(text))


def test_prompt_longer_than_context(tiny_model):
    arch = tiny_model.manifest.architecture
    chain = LocalChain.load(tiny_model, None)
    tok = ChatTokenizer(tiny_model.path)
    with pytest.raises(PromptTooLong, match=f"context is {arch.context_length}"):
        generate(chain, arch, tok, "hello " * (arch.context_length + 10), raw=True)


def test_kv_cache_is_per_request_and_freed(tiny_model, prompt_ids, mono_trace):
    chain = LocalChain.load(tiny_model, [LayerRange(0, 3), LayerRange(3, 6)])
    # Two interleaved requests on the same segments do not disturb each other.
    chain.open("a", 40)
    chain.open("b", 40)
    ids_a = np.asarray([prompt_ids], dtype=np.int64)
    ids_b = np.asarray([[9, 8, 7]], dtype=np.int64)
    tot_a, tot_b, out_a = len(prompt_ids), 3, []
    for _ in range(10):
        ta = int(np.argmax(chain.forward("a", ids_a, tot_a)))
        chain.forward("b", ids_b, tot_b)
        ids_b = np.asarray([[1]], dtype=np.int64)
        tot_b += 1
        out_a.append(ta)
        ids_a = np.asarray([[ta]], dtype=np.int64)
        tot_a += 1
    assert out_a == mono_trace.tokens[:10]
    assert all(set(s.open_requests) == {"a", "b"} for s in chain.segments)
    chain.close("a")
    chain.close("b")
    assert all(not s.open_requests for s in chain.segments)


def test_generate_reports_timings(tiny_model):
    arch = tiny_model.manifest.architecture
    chain = LocalChain.load(tiny_model, parse_ranges("0-3,3-6"))
    pieces: list[str] = []
    res = generate(
        chain,
        arch,
        ChatTokenizer(tiny_model.path),
        "hello world",
        max_tokens=12,
        on_text=pieces.append,
    )
    assert res.token_ids and res.prompt_tokens > 2
    assert res.ttft_s > 0 and len(res.segment_compute_s) == 2
    assert res.segments == ["0-3", "3-6"]
    # The stream holds back only an incomplete trailing character.
    assert res.text.startswith("".join(pieces)) and len(res.text) - len("".join(pieces)) <= 1
