"""Choosing the next token from logits: greedy by default, else temperature/top-k/top-p."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm import wire
from meshllm.errors import MeshError

# A temperature past this makes every token equally likely already; larger ones only overflow.
MAX_TEMP = 1e6


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # The bounds frames are checked against on arrival (from_wire), so what is accepted
        # here is never refused by the next stage.
        if not 0 <= self.temperature <= MAX_TEMP:
            raise MeshError(f"temperature must be in [0, {MAX_TEMP:g}], got {self.temperature}")
        if not 0 <= self.top_k < 2**31:
            raise MeshError(f"top-k must be in [0, 2**31), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MeshError(f"top-p must be in (0, 1], got {self.top_p}")
        # numpy's generators take no negative seed: refused here, not in a stage's loop.
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise MeshError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_wire(self) -> dict[str, Any]:
        """The parameters as frames and control requests carry them."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    @classmethod
    def from_wire(cls, obj: Any) -> SamplingParams:
        """Parameters from another process (a frame, a control request); absent ones take
        their defaults. Raises :class:`~meshllm.wire.BadMessage` with the reason."""
        obj = wire.mapping(obj, "sampling parameters")
        seed = obj.get("seed")
        return cls(
            temperature=wire.number(obj.get("temperature", 0.0), "temperature", 0.0, MAX_TEMP),
            top_k=wire.integer(obj.get("top_k", 0), "top_k", 0, 2**31),
            top_p=_top_p(obj.get("top_p", 1.0)),
            seed=None if seed is None else wire.integer(seed, "seed", 0, 2**63),
        )


def _top_p(value: Any) -> float:
    p = wire.number(value, "top_p", 0.0, 1.0)
    if p <= 0:
        raise wire.BadMessage("top_p must be in (0, 1]")
    return p


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
