"""The plan: which peer runs which layers of which model, in pipeline order, and its epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm import wire
from meshllm.errors import MeshError
from meshllm.model.ranges import LayerRange, validate_ranges

MAX_LAYERS = 4096
MAX_STAGES = 256  # as many as a mesh may have members


class PlanError(MeshError):
    """A plan that cannot be made or does not decode."""


class BadPlan(PlanError, wire.BadMessage):
    """A plan from another peer that does not decode."""


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
            "epoch": self.epoch,
            "model": self.model,
            "model_sha": self.model_sha,
            "source": self.source,
            "num_layers": self.num_layers,
            "partitioner": self.partitioner,
            "stages": [[s.peer, s.start, s.stop] for s in self.stages],
            "predicted": self.predicted,
            "balance": self.balance,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Plan:
        """The plan a peer published (raises :class:`BadPlan` with the reason)."""
        try:
            return cls._decode(obj)
        except wire.BadMessage as exc:
            raise BadPlan(f"malformed plan: {exc}") from None

    @classmethod
    def _decode(cls, obj: Any) -> Plan:
        obj = wire.mapping(obj, "plan")
        num_layers = wire.integer(obj.get("num_layers"), "num_layers", 1, MAX_LAYERS + 1)
        stages = []
        for i, raw in enumerate(wire.seq(obj.get("stages"), "stages", MAX_STAGES)):
            if not isinstance(raw, list) or len(raw) != 3:
                raise wire.BadMessage(f"stage {i} is not [peer, start, stop]")
            peer = wire.peer_id(raw[0], f"stage {i} peer")
            start = wire.integer(raw[1], f"stage {i} start", 0, num_layers)
            stop = wire.integer(raw[2], f"stage {i} stop", start + 1, num_layers + 1)
            stages.append(Stage(peer, start, stop))
        plan = cls(
            epoch=wire.integer(obj.get("epoch"), "epoch", 1),
            model=wire.name(obj.get("model"), "model"),
            model_sha=wire.sha256_hex(obj.get("model_sha"), "model_sha"),
            source=wire.peer_id(obj.get("source"), "source"),
            num_layers=num_layers,
            partitioner=wire.name(obj.get("partitioner"), "partitioner"),
            stages=tuple(stages),
            predicted=_predicted(obj.get("predicted")),
            balance=wire.name(obj.get("balance", "none"), "balance"),
        )
        try:
            validate_ranges([s.range for s in plan.stages], plan.num_layers)
        except MeshError as exc:
            raise wire.BadMessage(str(exc)) from None
        if len({s.peer for s in stages}) != len(stages):
            raise wire.BadMessage("a peer holds two stages")
        return plan


def _seconds(value: Any, what: str) -> float:
    return wire.number(value, what, 0.0)


def _predicted(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    raw = wire.mapping(raw, "predicted")
    return {
        "objective": wire.name(raw.get("objective"), "objective"),
        "step_s": wire.number(raw.get("step_s"), "step_s", 0.0),
        "stage_s": wire.seq_of(raw.get("stage_s"), "stage_s", MAX_STAGES, _seconds),
        "bottleneck_s": wire.number(raw.get("bottleneck_s", 0.0), "bottleneck_s", 0.0),
    }
