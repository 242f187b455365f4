"""Conversion of a model source to one monolithic ONNX model with the onnxruntime-genai builder.

Heavy imports (torch, transformers) happen inside functions: peers that only run segments never
need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from meshllm.errors import ConversionFailed, UnsupportedSource
from meshllm.model.source import ModelSource


def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a Hugging Face directory the builder can read."""
    try:
        import torch  # noqa: F401  (transformers needs it; fail with our message, not theirs)
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UnsupportedSource(
            f"converting a GGUF needs the converter extra ({exc.name} is missing): "
            "pip install 'meshllm[convert]' (tools/setup.sh does this)"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    # save_pretrained refuses while a GGUF quantizer is attached: write the pieces ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def builder_env() -> dict[str, str]:
    """The builder's environment. The builder stamps the graph with the git commit of the
    checkout its own files sit in, and a virtual environment inside a git checkout (this
    repository's own, say) made that the checkout's HEAD: the same source then converted to
    a different model.onnx, and a different model hash, after every commit. With git kept
    out it falls back to the installed package's own commit."""
    return dict(os.environ, PYTHONWARNINGS="ignore", GIT_DIR=os.devnull)


def run_builder(
    hf_dir: Path, out_dir: Path, precision: str, cache_dir: Path, log_path: Path
) -> None:
    """Run the onnxruntime-genai model builder in a child process, output logged to a file."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache_dir),
    ]
    with log_path.open("w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=builder_env(), check=False
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise ConversionFailed(
            f"the ONNX model builder failed (exit {proc.returncode}); last lines of "
            f"{log_path}:\n{tail}"
        )
    if not (out_dir / "model.onnx").is_file():
        raise ConversionFailed(f"the ONNX model builder wrote no model.onnx in {out_dir}")


def source_to_hf(src: ModelSource, work: Path) -> Path:
    return gguf_to_hf(src.path, work / "hf") if src.kind == "gguf" else src.path
