"""Shared helpers for tests: the correctness oracle (greedy traces with their logits)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from meshllm.model.chain import LocalChain


@dataclass
class Trace:
    tokens: list[int]
    logits: list[np.ndarray]  # last-position logits before each generated token


def greedy_trace(chain: LocalChain, prompt_ids: list[int], steps: int) -> Trace:
    """Greedy-decode *steps* tokens (no early stop), keeping every step's logits."""
    rid = uuid.uuid4().hex
    chain.open(rid, len(prompt_ids) + steps)
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    try:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        total = len(prompt_ids)
        for _ in range(steps):
            row = chain.forward(rid, ids, total).copy()
            logits.append(row)
            tokens.append(int(np.argmax(row)))
            ids = np.asarray([[tokens[-1]]], dtype=np.int64)
            total += 1
    finally:
        chain.close(rid)
    return Trace(tokens, logits)


def max_logit_diff(a: Trace, b: Trace) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits, strict=True))
