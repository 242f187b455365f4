"""Shape-true models without downloads: a published checkpoint's configuration, seeded weights.

The model hubs may be out of reach (and a phone mesh's owner may want to try a 1B model before
fetching one), but memory, speed and the partitioner only care about shapes, and the
greedy-exactness oracle holds for any weights. So ``meshllm model synth SHAPE`` writes a
Hugging Face directory with the exact configuration of a published model and random weights
drawn from a seed, with a byte-level tokenizer of the model's vocabulary size that works
offline, and imports it through the same builder and partitioner as ``model import``.
``layers``/``hidden``/``vocab`` shrink a shape for fast tests (same family, same graph).

The same arguments give the same bytes, so a synthetic model is cached like an imported one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError
from meshllm.model.manifest import Manifest

Reporter = Callable[[str], None]

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONTEXT = 4096  # max_position_embeddings of every synth model: what a phone can hold anyway


class UnknownShape(MeshError):
    """A synth shape meshllm does not know."""


@dataclass(frozen=True)
class Shape:
    """A published checkpoint's configuration (what its config.json says that matters)."""

    name: str
    checkpoint: str  # where the figures come from
    architecture: str  # the transformers class the builder dispatches on
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def config(
        self, *, layers: int | None, hidden: int | None, vocab: int | None
    ) -> dict[str, Any]:
        """config.json for this shape, shrunk where asked (heads and the MLP scale with
        *hidden*, keeping the attention's grouping)."""
        h, heads, kv, head_dim, inter = (
            self.hidden,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.intermediate,
        )
        if hidden is not None and hidden != self.hidden:
            head_dim = 16 if hidden <= 256 else 64
            if hidden % head_dim or hidden < 2 * head_dim:
                raise MeshError(
                    f"--hidden must be a multiple of {head_dim}, at least {2 * head_dim}"
                )
            heads = hidden // head_dim
            group = self.heads // self.kv_heads
            kv = max(1, heads // group)
            while heads % kv:
                kv -= 1
            inter = max(8, round(hidden * self.intermediate / self.hidden / 8) * 8)
            h = hidden
        n = self.layers if layers is None else layers
        v = self.vocab if vocab is None else vocab
        if not 1 <= n <= 256:
            raise MeshError(f"--layers must be 1-256, not {n}")
        if not len(SPECIALS) + 256 <= v <= 1 << 20:
            raise MeshError(f"--vocab must be {len(SPECIALS) + 256}-{1 << 20}, not {v}")
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_size": h,
            "intermediate_size": inter,
            "num_hidden_layers": n,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "vocab_size": v,
            "max_position_embeddings": CONTEXT,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float32",
            **self.extra,
        }


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B-Instruct",
            "LlamaForCausalLM",
            "llama",
            hidden=2048,
            intermediate=8192,
            layers=16,
            heads=32,
            kv_heads=8,
            head_dim=64,
            vocab=128256,
            rope_theta=500000.0,
            rms_eps=1e-5,
            tie_embeddings=True,
            extra={"attention_bias": False, "mlp_bias": False},
        ),
        Shape(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen2ForCausalLM",
            "qwen2",
            hidden=896,
            intermediate=4864,
            layers=24,
            heads=14,
            kv_heads=2,
            head_dim=64,
            vocab=151936,
            rope_theta=1000000.0,
            rms_eps=1e-6,
            tie_embeddings=True,
        ),
        Shape(
            "qwen2.5-1.5b",
            "Qwen/Qwen2.5-1.5B-Instruct",
            "Qwen2ForCausalLM",
            "qwen2",
            hidden=1536,
            intermediate=8960,
            layers=28,
            heads=12,
            kv_heads=2,
            head_dim=128,
            vocab=151936,
            rope_theta=1000000.0,
            rms_eps=1e-6,
            tie_embeddings=True,
        ),
        Shape(
            "qwen3-0.6b",
            "Qwen/Qwen3-0.6B",
            "Qwen3ForCausalLM",
            "qwen3",
            hidden=1024,
            intermediate=3072,
            layers=28,
            heads=16,
            kv_heads=8,
            head_dim=128,
            vocab=151936,
            rope_theta=1000000.0,
            rms_eps=1e-6,
            tie_embeddings=True,
            extra={"attention_bias": False},
        ),
        Shape(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "LlamaForCausalLM",
            "llama",
            hidden=576,
            intermediate=1536,
            layers=30,
            heads=9,
            kv_heads=3,
            head_dim=64,
            vocab=49152,
            rope_theta=100000.0,
            rms_eps=1e-5,
            tie_embeddings=True,
            extra={"attention_bias": False, "mlp_bias": False},
        ),
    )
}


def shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise UnknownShape(
            f"unknown synth shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}"
        ) from None


def byte_level_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of exactly *vocab_size* tokens, built without a corpus:
    the special tokens, the 256 bytes, then merges of ever longer byte strings in a fixed
    order (printable ASCII first). Every id decodes, so any token a random model picks does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    # Letters, the space (Ġ in the byte-level alphabet), digits and punctuation map to
    # themselves and come first, so the first merges are pairs of them and text tokenizes
    # into something other than single bytes.
    first = [*"abcdefghijklmnopqrstuvwxyz", "Ġ", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    first += sorted(c for c in alphabet if " " < c <= "~" and c not in first)
    letters = first + sorted(alphabet - set(first))
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for c in letters:
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    level = letters  # the tokens of the last length made, in order
    while len(vocab) < vocab_size:
        # Each longer token is one of the last length plus a letter, the pairs of earlier
        # (commoner) ones first: ordered by the sum of their positions.
        made = []
        for diagonal in range(len(level) + len(letters) - 1):
            if len(vocab) >= vocab_size:
                break
            for i in range(max(0, diagonal - len(letters) + 1), min(diagonal, len(level) - 1) + 1):
                if len(vocab) >= vocab_size:
                    break
                left, right = level[i], letters[diagonal - i]
                if (new := left + right) not in vocab:
                    vocab[new] = len(vocab)
                    merges.append((left, right))
                    made.append(new)
        level = made
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def write_checkpoint(
    out_dir: Path,
    spec: Shape,
    *,
    seed: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    vocab: int | None = None,
) -> Path:
    """Write the Hugging Face directory of a synthetic *spec* model into *out_dir*."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = spec.config(layers=layers, hidden=hidden, vocab=vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(cfg["vocab_size"]),
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[0],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))

    config = AutoConfig.for_model(**cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model = model.to_empty(device="cpu")
    # Weights wider than the usual 0.02 give peaked, input-dependent logits (a sharp test of
    # split against whole), scaled by the width so that activations stay in range.
    std = 1.6 / math.sqrt(cfg["hidden_size"])
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            else:  # norms' weights (and biases)
                p.fill_(1.0) if _name.endswith("norm.weight") else p.zero_()
        model.tie_weights()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    saved = json.loads((out_dir / "config.json").read_text())
    saved.pop("transformers_version", None)  # keep the bytes stable across versions
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out_dir


def synth_model(
    models_dir: Path,
    shape_name: str,
    *,
    precision: str = "int4",
    name: str | None = None,
    seed: int = 0,
    layers: int | None = None,
    hidden: int | None = None,
    vocab: int | None = None,
    report: Reporter = lambda _msg: None,
) -> tuple[Manifest, bool]:
    """Build and import a synthetic *shape_name* model; (manifest, True if built now)."""
    from meshllm.model.importer import check_name, files_intact, import_model

    spec = shape(shape_name)
    params = {"shape": spec.name, "checkpoint": spec.checkpoint, "seed": seed}
    params |= {k: v for k, v in (("layers", layers), ("hidden", hidden), ("vocab", vocab)) if v}
    spec.config(layers=layers, hidden=hidden, vocab=vocab)  # bad sizes fail before any work
    name = check_name(name or f"{spec.name}-synth-{precision}")
    with contextlib.suppress(MeshError, OSError):
        existing = Manifest.read(models_dir / name)
        if (
            existing.synthetic == params
            and existing.precision == precision
            and files_intact(models_dir / name, existing)
        ):
            return existing, False
    with tempfile.TemporaryDirectory(prefix=f".synth-{name}-", dir=_mkdir(models_dir)) as tmp:
        src = Path(tmp) / spec.name
        report(f"writing a {spec.name} checkpoint with seed {seed} (random weights)")
        write_checkpoint(src, spec, seed=seed, layers=layers, hidden=hidden, vocab=vocab)
        manifest, built = import_model(
            models_dir, src, precision=precision, name=name, report=report
        )
        shutil.rmtree(src, ignore_errors=True)
    if manifest.synthetic != params or manifest.source != f"synth:{spec.name}":
        manifest = dataclasses.replace(manifest, synthetic=params, source=f"synth:{spec.name}")
        manifest.write(models_dir / name)
    return manifest, built


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
