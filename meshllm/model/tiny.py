"""A tiny random Llama (Hugging Face directory) generated offline, for fast tests and demos.

Same architecture family and builder path as the real models, a few hundred KB of weights.
Deterministic: the same arguments give the same bytes, so imports of it are cached by hash.
"""

from __future__ import annotations

import json
from pathlib import Path

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a mesh of small phones runs one language model together",
    "each device holds a slice of the layers and passes activations on",
    "hello world, how are you today? fine, thank you.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ! ? ; ' \"",
]
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_llama(out_dir: Path, *, num_layers: int = 6, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny Llama checkpoint with its own byte-level BPE tokenizer into *out_dir*."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Wider weights than the default init give peaked, input-dependent logits, so greedy
        # decoding is a sharp test of equality between split and whole models.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.pop("transformers_version", None)  # keep the bytes stable across versions
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir
