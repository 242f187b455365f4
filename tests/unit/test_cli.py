"""The CLI as a user runs it: a real process, real files, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(home, *args, check=True):
    env = dict(os.environ, MESHLLM_HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"meshllm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def home(model_store, tiny_fp32):
    return model_store.dir.parent


def test_generate_json_same_tokens_for_split_and_whole(home):
    base = ["generate", "--model", "tiny-fp32", "hello world", "--max-tokens", "16", "--json"]
    mono = json.loads(run_cli(home, *base, "--monolithic").stdout)
    split = json.loads(run_cli(home, *base, "--segments", "3").stdout)
    ranged = json.loads(run_cli(home, *base, "--ranges", "0-1,1-5,5-6").stdout)
    for key in ("text", "token_ids", "prompt_tokens", "ttft_s", "decode_tokens_per_s"):
        assert key in mono
    assert mono["token_ids"] == split["token_ids"] == ranged["token_ids"]
    assert split["segments"] == ["0-2", "2-4", "4-6"]
    assert mono["prompt_tokens"] > 3


def test_generate_streams_text(home):
    proc = run_cli(home, "generate", "--model", "tiny-fp32", "hi", "--max-tokens", "8")
    assert proc.stdout.strip() and "tok/s" in proc.stderr


def test_sampling_is_reproducible_with_a_seed(home):
    args = [
        "generate",
        "--model",
        "tiny-fp32",
        "hi",
        "--max-tokens",
        "12",
        "--json",
        "--temperature",
        "1.5",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ]
    a = json.loads(run_cli(home, *args).stdout)["token_ids"]
    b = json.loads(run_cli(home, *args).stdout)["token_ids"]
    assert a == b


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "nope", "hi"], "no imported model named 'nope'"),
        (["generate", "--model", "tiny-fp32", "--ranges", "0-2,3-6", "hi"], "gap in layer"),
        (["generate", "--model", "tiny-fp32", "--ranges", "0-4,3-6", "hi"], "overlap"),
        (["generate", "--model", "tiny-fp32", "--ranges", "0-3,3-9", "hi"], "out of bounds"),
        (["generate", "--model", "tiny-fp32", "--segments", "9", "hi"], "cannot cut 6 layers"),
        (
            ["generate", "--model", "tiny-fp32", "--segments", "2", "--monolithic", "hi"],
            "only one of",
        ),
        (["generate", "--model", "tiny-fp32", "--raw", "word " * 600], "context is 512"),
        (["model", "import", "/nonexistent/model.gguf"], "model source not found"),
    ],
)
def test_bad_input_gets_a_clear_error(home, args, message):
    proc = run_cli(home, *args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_rejects_unsupported_sources(home, tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    proc = run_cli(home, "model", "import", str(not_gguf), check=False)
    assert proc.returncode == 1 and "not a GGUF file" in proc.stderr
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF garbage")
    proc = run_cli(home, "model", "import", str(fake), check=False)
    assert proc.returncode == 1 and "not a readable GGUF" in proc.stderr
    hf = tmp_path / "bert"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_cli(home, "model", "import", str(hf), check=False)
    assert proc.returncode == 1 and "unsupported architecture 'bert'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_is_idempotent_and_listed(home, tiny_source):
    proc = run_cli(
        home, "model", "import", str(tiny_source), "--precision", "fp32", "--name", "tiny-fp32"
    )
    assert "already imported" in proc.stderr
    listed = json.loads(run_cli(home, "model", "list", "--json").stdout)
    tiny = next(m for m in listed if m["name"] == "tiny-fp32")
    assert tiny["architecture"]["num_layers"] == 6
    assert len(tiny["per_layer_weight_bytes"]) == 6
    assert all(b > 0 for b in tiny["per_layer_weight_bytes"])
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(tiny["files"])
    table = run_cli(home, "model", "list").stdout
    assert "tiny-fp32" in table


def test_help_explains_commands(home):
    out = run_cli(home, "--help").stdout
    assert "generate" in out and "model" in out
    out = run_cli(home, "generate", "--help").stdout
    assert "--ranges" in out and "--monolithic" in out
