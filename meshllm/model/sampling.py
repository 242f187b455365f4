"""Choosing the next token from logits: greedy by default, else temperature/top-k/top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshllm.errors import MeshError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MeshError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MeshError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MeshError(f"top-p must be in (0, 1], got {self.top_p}")
        # numpy's generators take no negative seed: refused here, not in a stage's loop.
        if self.seed is not None and self.seed < 0:
            raise MeshError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def skip(self, draws: int) -> None:
        """Advance as if *draws* tokens had been sampled here: a request moved to this peer
        mid-generation then continues with the random stream it would have had."""
        if not self.params.greedy and draws > 0:
            self._rng.random(draws)  # Generator.choice with p draws one uniform per call

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        order = np.argsort(-scaled, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
