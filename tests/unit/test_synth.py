"""Shape-true synthetic models: every listed shape's graph splits exactly, the same seed gives
the same bytes, and the tokenizer covers the whole vocabulary offline."""

from __future__ import annotations

import hashlib
import json

import pytest

from meshllm.model.chain import LocalChain
from meshllm.model.ranges import parse_ranges
from meshllm.model.synth import SHAPES, UnknownShape, byte_level_tokenizer, shape, write_checkpoint
from tests.conftest import SYNTH_TESTED
from tests.support import greedy_trace, max_logit_diff
from tests.unit.test_cli import run_cli

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 300, 11]


@pytest.mark.parametrize("split", ["0-1,1-3", "0-2,2-3", "0-1,1-2,2-3"])
def test_every_synth_family_splits_exactly(synth_small, split):
    arch = synth_small.manifest.architecture
    assert arch.num_layers == 3 and arch.hidden_size == 64 and arch.vocab_size == 512
    whole = greedy_trace(LocalChain.load(synth_small, None), PROMPT, 16)
    # Random weights still make input-dependent greedy tokens: a sharp oracle.
    assert len(set(whole.tokens)) > 1
    parts = greedy_trace(LocalChain.load(synth_small, parse_ranges(split)), PROMPT, 16)
    assert parts.tokens == whole.tokens
    assert max_logit_diff(parts, whole) <= 1e-5


def test_a_synth_model_says_it_is_synthetic(synth_small):
    m = synth_small.manifest
    assert m.synthetic is not None and m.synthetic["shape"] in SYNTH_TESTED
    assert m.synthetic["layers"] == 3 and m.source == f"synth:{m.synthetic['shape']}"


def _digests(path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_the_same_seed_gives_the_same_bytes(tmp_path):
    spec = shape("qwen3-0.6b")
    small = {"layers": 2, "hidden": 64, "vocab": 400}
    a = write_checkpoint(tmp_path / "a", spec, seed=7, **small)
    b = write_checkpoint(tmp_path / "b", spec, seed=7, **small)
    c = write_checkpoint(tmp_path / "c", spec, seed=8, **small)
    assert _digests(a) == _digests(b)
    assert _digests(a)["model.safetensors"] != _digests(c)["model.safetensors"]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_shape_has_its_published_configuration(name):
    spec = shape(name)
    cfg = spec.config(layers=None, hidden=None, vocab=None)
    assert cfg["hidden_size"] == spec.hidden and cfg["num_hidden_layers"] == spec.layers
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["vocab_size"] == spec.vocab
    # Shrunk: the same family, heads still grouped, the MLP scaled with the width.
    small = spec.config(layers=2, hidden=128, vocab=512)
    assert small["architectures"] == cfg["architectures"]
    assert small["hidden_size"] == small["num_attention_heads"] * small["head_dim"]
    assert small["num_attention_heads"] % small["num_key_value_heads"] == 0


def test_llama_3_2_1b_is_the_real_size():
    cfg = shape("llama-3.2-1b").config(layers=None, hidden=None, vocab=None)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    h, inter, n, v = (cfg[k] for k in keys)
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    params = v * h + n * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h
    assert 1.23e9 < params < 1.24e9  # 1,235,814,400 in the published checkpoint


def test_the_tokenizer_covers_the_vocabulary_and_round_trips_text():
    tok = byte_level_tokenizer(2000)
    assert tok.get_vocab_size() == 2000
    text = "Hello, phones! Ünïcode too."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges apply
    assert all(isinstance(tok.decode([i]), str) for i in range(2000))
    assert tok.token_to_id("<|im_end|>") == 2


def test_an_unknown_shape_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownShape, match=r"known shapes: .*llama-3\.2-1b.*qwen3-0\.6b"):
        shape("gpt-5")
    res = run_cli(tmp_path, "model", "synth", "gpt-5", check=False)
    assert res.returncode != 0 and "known shapes" in res.stderr and "Traceback" not in res.stderr


def test_model_synth_list_names_the_shapes(tmp_path):
    listed = {
        s["name"]: s
        for s in json.loads(run_cli(tmp_path, "model", "synth", "--list", "--json").stdout)
    }
    assert set(listed) == set(SHAPES)
    assert listed["qwen2.5-1.5b"]["checkpoint"] == "Qwen/Qwen2.5-1.5B-Instruct"
