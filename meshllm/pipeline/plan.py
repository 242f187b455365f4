"""The plan: which peer runs which layers of which model, in pipeline order, and its epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.errors import MeshError
from meshllm.model.ranges import LayerRange, validate_ranges


class PlanError(MeshError):
    """A plan that cannot be made or does not decode."""


@dataclass(frozen=True)
class Stage:
    peer: str
    start: int
    stop: int

    @property
    def range(self) -> LayerRange:
        return LayerRange(self.start, self.stop)


@dataclass(frozen=True)
class Plan:
    epoch: int
    model: str  # model name at the source
    model_sha: str  # sha256 of the source's model.onnx: identifies the exact weights
    source: str  # peer that holds the whole model and serves segment files
    num_layers: int
    partitioner: str
    stages: tuple[Stage, ...]
    # The planner's prediction from the peers' profiles, for status and benchmarks:
    # {"objective", "step_s" (one decode step of one request), "stage_s" (per stage, under
    # sustained load), "bottleneck_s" (the slowest of those: 1 / the best aggregate rate)}.
    predicted: dict[str, Any] | None = None
    balance: str = "none"  # the balancing policy watching this plan (see meshllm.balance)

    def stage_of(self, peer: str) -> int | None:
        for i, s in enumerate(self.stages):
            if s.peer == peer:
                return i
        return None

    @property
    def stage_triples(self) -> tuple[tuple[str, int, int], ...]:
        """The stages as (peer, start, stop), as frames carry them."""
        return tuple((s.peer, s.start, s.stop) for s in self.stages)

    def to_obj(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "model": self.model, "model_sha": self.model_sha,
            "source": self.source, "num_layers": self.num_layers,
            "partitioner": self.partitioner,
            "stages": [[s.peer, s.start, s.stop] for s in self.stages],
            "predicted": self.predicted,
            "balance": self.balance,
        }  # fmt: skip

    @classmethod
    def from_obj(cls, obj: Any) -> Plan:
        try:
            stages = tuple(Stage(str(p), int(a), int(b)) for p, a, b in obj["stages"])
            plan = cls(
                epoch=int(obj["epoch"]), model=str(obj["model"]), model_sha=str(obj["model_sha"]),
                source=str(obj["source"]), num_layers=int(obj["num_layers"]),
                partitioner=str(obj["partitioner"]), stages=stages,
                predicted=_predicted(obj.get("predicted")),
                balance=str(obj.get("balance", "none"))[:32],
            )  # fmt: skip
            validate_ranges([s.range for s in stages], plan.num_layers)
        # OverflowError: int() of an infinite float, float() of an int over ~1e308.
        except (KeyError, TypeError, ValueError, OverflowError, MeshError) as exc:
            raise PlanError(f"malformed plan: {exc}") from None
        if len({s.peer for s in stages}) != len(stages):
            raise PlanError("malformed plan: a peer holds two stages")
        return plan


def _predicted(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError("predicted must be a map")
    return {
        "objective": str(raw["objective"]),
        "step_s": float(raw["step_s"]),
        "stage_s": [float(x) for x in raw["stage_s"]],
        "bottleneck_s": float(raw.get("bottleneck_s", 0.0)),
    }
