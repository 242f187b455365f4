"""Autoregressive generation over a :class:`LocalChain` (one segment = the monolithic model)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from meshllm.errors import PromptTooLong
from meshllm.model.chain import LocalChain, StepTimes
from meshllm.model.manifest import Architecture
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.tokenizer import ChatTokenizer, TextStream


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    segments: list[str] = field(default_factory=list)
    segment_compute_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_context(arch: Architecture, prompt_tokens: int, max_tokens: int) -> int:
    """Positions a request needs; raises when the prompt leaves no room in the context."""
    if prompt_tokens == 0:
        raise PromptTooLong("the prompt is empty")
    if prompt_tokens + 1 > arch.context_length:
        raise PromptTooLong(
            f"prompt is {prompt_tokens} tokens; the model's context is {arch.context_length} "
            "tokens and at least one must be left to generate"
        )
    return min(prompt_tokens + max_tokens, arch.context_length)


def generate_ids(
    chain: LocalChain,
    arch: Architecture,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    sampling: SamplingParams,
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[int], str, float, float, StepTimes]:
    """Generate token ids; returns (ids, finish_reason, ttft_s, decode_tok_per_s, times)."""
    capacity = check_context(arch, len(prompt_ids), max_tokens)
    budget = capacity - len(prompt_ids)
    sampler = Sampler(sampling)
    eos = set(arch.eos_token_ids)
    request_id = uuid.uuid4().hex
    times = StepTimes()
    out: list[int] = []
    finish = "length"
    t0 = time.perf_counter()
    first_at = last_at = t0
    chain.open(request_id, capacity)
    try:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        total = len(prompt_ids)
        while len(out) < budget:
            token = sampler(chain.forward(request_id, ids, total, times))
            last_at = time.perf_counter()
            if not out:
                first_at = last_at
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos:
                finish = "stop"
                break
            ids = np.asarray([[token]], dtype=np.int64)
            total += 1
    finally:
        chain.close(request_id)
    decode_steps = len(out) - 1
    decode_rate = decode_steps / (last_at - first_at) if decode_steps > 0 else 0.0
    return out, finish, first_at - t0, decode_rate, times


def generate(
    chain: LocalChain,
    arch: Architecture,
    tokenizer: ChatTokenizer,
    prompt: str,
    *,
    raw: bool = False,
    max_tokens: int = 128,
    sampling: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    t0 = time.perf_counter()
    prompt_ids = tokenizer.encode_prompt(prompt, raw=raw)
    tokenize_s = time.perf_counter() - t0
    stream = TextStream(tokenizer)

    def emit(token: int) -> None:
        delta = stream.push(token)
        if delta and on_text is not None:
            on_text(delta)

    ids, finish, ttft, rate, times = generate_ids(
        chain,
        arch,
        prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling or SamplingParams(),
        on_token=emit,
    )
    return GenerationResult(
        text=tokenizer.decode(ids),
        token_ids=ids,
        prompt_tokens=len(prompt_ids),
        finish_reason=finish,
        ttft_s=tokenize_s + ttft,
        decode_tokens_per_s=rate,
        total_s=time.perf_counter() - t0,
        segments=[str(r) for r in chain.ranges],
        segment_compute_s=times.per_segment,
    )
