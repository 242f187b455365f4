"""The correctness oracle on the real SmolLM2-135M-Instruct, int4 and fp32.

The model is converted once per run (cached by the GGUF's hash) by the `smollm` fixture.
"""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from meshllm.model.chain import LocalChain
from meshllm.model.graph import load_graph, tensor_nbytes
from meshllm.model.ranges import even_ranges, parse_ranges
from meshllm.model.tokenizer import ChatTokenizer
from tests.support import greedy_trace, max_logit_diff

pytestmark = pytest.mark.real_model

STEPS = 32
SPLITS = {
    "two": "0-15,15-30",
    "three-even": "0-10,10-20,20-30",
    "one-layer-ends": "0-1,1-29,29-30",
    "uneven": "0-7,7-8,8-25,25-30",
    "k30": ",".join(str(r) for r in even_ranges(30, 30)),
}


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    return ChatTokenizer(smollm.path).encode_prompt("Tell me a short story about a robot.")


@pytest.fixture(scope="module")
def mono(smollm, prompt_ids):
    return greedy_trace(LocalChain.load(smollm, None), prompt_ids, STEPS)


@pytest.mark.parametrize("split", list(SPLITS.values()), ids=list(SPLITS))
def test_split_generates_the_monolithic_tokens(smollm, prompt_ids, mono, split):
    trace = greedy_trace(LocalChain.load(smollm, parse_ranges(split)), prompt_ids, STEPS)
    assert trace.tokens == mono.tokens
    if smollm.manifest.precision == "fp32":
        assert max_logit_diff(trace, mono) <= 1e-4


def test_monolithic_answer_is_sensible(smollm):
    tok = ChatTokenizer(smollm.path)
    ids = tok.encode_prompt("What is the capital of France?")
    trace = greedy_trace(LocalChain.load(smollm, None), ids, 12)
    assert "Paris" in tok.decode(trace.tokens)


@pytest.mark.parametrize("split", ["0-10,10-20,20-30", "0-1,1-29,29-30"])
def test_segment_weights_add_up(smollm, split):
    ranges = parse_ranges(split)
    graph = load_graph(smollm.onnx_path, smollm.manifest.kv_names)
    mono_bytes = (smollm.path / "model.onnx.data").stat().st_size
    uses: dict[str, int] = {}
    for r in ranges:
        for name in graph.segment_initializers(graph.segment_nodes(r)):
            uses[name] = uses.get(name, 0) + 1
    replicated = sum(tensor_nbytes(graph.initializers[n]) * (c - 1) for n, c in uses.items())
    files = smollm.segments(ranges)
    seg_bytes = sum((p.parent / "segment.onnx.data").stat().st_size for p, _ in files)
    expected = mono_bytes + replicated
    assert abs(seg_bytes - expected) <= 0.02 * expected


def test_middle_segment_holds_no_other_layer(smollm):
    files = smollm.segments(parse_ranges("0-10,10-20,20-30"))
    path, info = files[1]
    model = onnx.load(str(path), load_external_data=False)
    layers = set()
    for t in model.graph.initializer:
        if ".layers." in t.name:
            layers.add(int(t.name.split(".layers.")[1].split(".")[0]))
        else:
            assert t.name in {"cos_cache", "sin_cache"}, t.name
    assert layers == set(range(10, 20))
    # Its data file is exactly its own tensors (plus alignment padding).
    own = sum(tensor_nbytes(t) for t in model.graph.initializer)
    size = (path.parent / "segment.onnx.data").stat().st_size
    assert own <= size <= own + 64 * len(model.graph.initializer)
    assert info.weight_bytes == size


def test_cli_generate_split_equals_monolithic(smollm):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MESHLLM_HOME=str(smollm.path.parent.parent))
    base = [
        sys.executable,
        "-m",
        "meshllm",
        "generate",
        "--model",
        smollm.name,
        "Name three colours.",
        "--max-tokens",
        "24",
        "--json",
    ]
    out = {}
    for mode in ("--monolithic", "--segments=3", "--segments=5"):
        proc = subprocess.run([*base, mode], capture_output=True, text=True, env=env, check=True)
        out[mode] = json.loads(proc.stdout)
    assert out["--monolithic"]["token_ids"] == out["--segments=3"]["token_ids"]
    assert out["--monolithic"]["token_ids"] == out["--segments=5"]["token_ids"]
    assert out["--segments=5"]["segments"] == ["0-6", "6-12", "12-18", "18-24", "24-30"]


def test_small_pages_give_the_same_tokens_and_default_loads_use_huge_ones(
    smollm, prompt_ids, mono, monkeypatch
):
    from tests.unit.test_hugepages import thp_collapse_expected

    if thp_collapse_expected():
        # A fresh process: in this one, earlier loads' freed memory (on huge pages already)
        # is reused, and is not collapsed again.
        code = (
            "import sys; from pathlib import Path; from meshllm.model.store import ModelStore; "
            "from meshllm.model.chain import LocalChain; "
            "m = ModelStore(Path(sys.argv[1])).get(sys.argv[2]); "
            "print(sum(s.huge_page_bytes for s in LocalChain.load(m, None).segments))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(smollm.path.parent), smollm.path.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        weights = (smollm.path / "model.onnx.data").stat().st_size
        assert int(out.stdout.split()[-1]) >= weights // 2
    monkeypatch.setenv("MESHLLM_HUGE_PAGES", "0")
    small = LocalChain.load(smollm, None)
    assert sum(s.huge_page_bytes for s in small.segments) == 0
    assert greedy_trace(small, prompt_ids, STEPS).tokens == mono.tokens
