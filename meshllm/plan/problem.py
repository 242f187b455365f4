"""The layer-assignment problem, its solution, and the one shared definition of its cost.

A model of ``L`` layers runs as a pipeline over peers taken in a fixed order. Each used peer
holds one contiguous range of layers, the ranges tile ``[0, L)``, and peers appear in pipeline
order. Peers may be left out: a slow peer only slows the pipeline down.

Both solvers (the MILP in :mod:`meshllm.plan.milp` and the exact DP oracle in
:mod:`meshllm.plan.dp`) only *choose* stages; they report what :func:`evaluate` says those stages
cost, so the two can never disagree about what a plan is worth.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np

from meshllm.config import OBJECTIVES
from meshllm.errors import MeshError

Objective = Literal["throughput", "latency"]
MIB = 2**20


class BadPlanProblem(MeshError):
    """A planning problem or a stage list that is malformed (shapes, negative costs, gaps)."""


class Infeasible(MeshError):
    """No assignment of layers to peers fits the peers' memory."""


@dataclass(frozen=True)
class Device:
    """One candidate peer, as measured: how long each layer takes on it and how much it holds.

    Times are per decode step (one token of one request), so stage times add up to the time of
    one step through the pipeline.
    """

    name: str
    layer_s: tuple[float, ...]
    """Seconds each layer takes on this peer (one entry per layer: peers need not be uniform)."""
    first_s: float
    """Extra seconds if this peer runs layer 0 (token embedding)."""
    last_s: float
    """Extra seconds if this peer runs the last layer (final norm and lm_head)."""
    memory_bytes: int
    """What this peer can devote to weights and KV cache."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_s", tuple(float(t) for t in self.layer_s))
        object.__setattr__(self, "first_s", float(self.first_s))
        object.__setattr__(self, "last_s", float(self.last_s))
        object.__setattr__(self, "memory_bytes", _as_int(self.memory_bytes))
        if not self.name:
            raise BadPlanProblem("a device needs a name")
        _check_times(f"device {self.name!r} layer_s", self.layer_s)
        _check_times(f"device {self.name!r} first_s/last_s", (self.first_s, self.last_s))
        _check_bytes(f"device {self.name!r} memory_bytes", (self.memory_bytes,))


@dataclass(frozen=True)
class PlanProblem:
    """Everything the planner needs: per-layer memory, the peers, and the links between them."""

    layer_bytes: tuple[int, ...]
    """Memory each layer needs on whichever peer runs it (weights plus its KV cache)."""
    first_bytes: int
    """Extra memory for whoever runs layer 0 (the embedding table)."""
    last_bytes: int
    """Extra memory for whoever runs the last layer (final norm, lm_head if untied)."""
    devices: tuple[Device, ...]
    """Candidate peers in pipeline order; a plan uses a subsequence of them."""
    link_s: tuple[tuple[float, ...], ...]
    """``link_s[i][j]``: seconds to send one step's activations from peer i to peer j."""
    return_s: tuple[tuple[float, ...], ...]
    """``return_s[i][j]``: seconds for the sampled token to go from the last stage's peer i back
    to the first stage's peer j (the next step cannot start before it arrives)."""
    objective: Objective = "throughput"
    """``throughput``: minimise the slowest stage (steady-state rate with many requests in
    flight). ``latency``: minimise one step end to end (all stages plus all hops)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_bytes", tuple(_as_int(b) for b in self.layer_bytes))
        object.__setattr__(self, "first_bytes", _as_int(self.first_bytes))
        object.__setattr__(self, "last_bytes", _as_int(self.last_bytes))
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "link_s", _matrix(self.link_s))
        object.__setattr__(self, "return_s", _matrix(self.return_s))
        if not self.layer_bytes:
            raise BadPlanProblem("a model needs at least one layer")
        if not self.devices:
            raise BadPlanProblem("there must be at least one candidate device")
        if self.objective not in OBJECTIVES:
            raise BadPlanProblem(
                f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}"
            )
        _check_bytes("layer_bytes", self.layer_bytes)
        _check_bytes("first_bytes/last_bytes", (self.first_bytes, self.last_bytes))
        layers = len(self.layer_bytes)
        for d in self.devices:
            if len(d.layer_s) != layers:
                raise BadPlanProblem(
                    f"device {d.name!r} has {len(d.layer_s)} layer times for {layers} layers"
                )
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise BadPlanProblem(f"device names must be unique: {names}")
        for label, m in (("link_s", self.link_s), ("return_s", self.return_s)):
            _check_square(label, m, len(self.devices))

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def stage_bytes(self, start: int, stop: int) -> int:
        """Memory a peer needs to run layers ``[start, stop)``."""
        return (
            sum(self.layer_bytes[start:stop])
            + (self.first_bytes if start == 0 else 0)
            + (self.last_bytes if stop == self.num_layers else 0)
        )

    def stage_compute_s(self, device: int, start: int, stop: int) -> float:
        """Seconds peer *device* spends computing layers ``[start, stop)`` in one step."""
        d = self.devices[device]
        return (
            math.fsum(d.layer_s[start:stop])
            + (d.first_s if start == 0 else 0.0)
            + (d.last_s if stop == self.num_layers else 0.0)
        )


@dataclass(frozen=True)
class PlanSolution:
    """A chosen plan and what it costs, as computed by :func:`evaluate`."""

    stages: tuple[tuple[int, int, int], ...]
    """``(device index, start, stop)`` per stage, in pipeline order."""
    objective_value: float
    """The problem's objective for these stages (max or sum of ``stage_s``)."""
    stage_s: tuple[float, ...]
    """Per stage: compute plus the outgoing hop (the return hop for the last stage)."""
    step_s: float
    """Sum of ``stage_s``: predicted time of one decode step of a single request."""
    solve_s: float
    """Wall-clock seconds the solver took."""


def evaluate(
    problem: PlanProblem, stages: tuple[tuple[int, int, int], ...], *, solve_s: float = 0.0
) -> PlanSolution:
    """Check *stages* against *problem* and price them; raises :class:`BadPlanProblem` if invalid.

    This is the single definition of the cost: solvers pick stages, this says what they cost.
    """
    stages = tuple((int(p), int(a), int(b)) for p, a, b in stages)
    _check_stages(problem, stages)
    first = stages[0][0]
    stage_s = []
    for k, (p, a, b) in enumerate(stages):
        last = k + 1 == len(stages)
        hop = problem.return_s[p][first] if last else problem.link_s[p][stages[k + 1][0]]
        stage_s.append(problem.stage_compute_s(p, a, b) + hop)
    value = max(stage_s) if problem.objective == "throughput" else math.fsum(stage_s)
    return PlanSolution(
        stages=stages,
        objective_value=value,
        stage_s=tuple(stage_s),
        step_s=math.fsum(stage_s),
        solve_s=solve_s,
    )


def _check_stages(problem: PlanProblem, stages: tuple[tuple[int, int, int], ...]) -> None:
    if not stages:
        raise BadPlanProblem("a plan needs at least one stage")
    layers, prev_device, expect = problem.num_layers, -1, 0
    for p, a, b in stages:
        if not prev_device < p < problem.num_devices:
            raise BadPlanProblem(f"stage devices must be strictly increasing indices: {stages}")
        if a != expect or not a < b <= layers:
            raise BadPlanProblem(f"stages must tile layers 0-{layers} contiguously: {stages}")
        need, cap = problem.stage_bytes(a, b), problem.devices[p].memory_bytes
        if need > cap:
            raise BadPlanProblem(
                f"{_layer_span(a, b)} need {_mib(need)} but {problem.devices[p].name!r} "
                f"offers {_mib(cap)}"
            )
        prev_device, expect = p, b
    if expect != layers:
        raise BadPlanProblem(f"stages must tile layers 0-{layers} contiguously: {stages}")


def max_stop(problem: PlanProblem, device: int, start: int) -> int:
    """The furthest ``stop`` such that *device* can hold ``[start, stop)``; *start* if none.

    Memory only grows with ``stop`` (bytes are non-negative), so the feasible stops from a given
    start are exactly ``start+1 .. max_stop``.
    """
    cap, layers = problem.devices[device].memory_bytes, problem.num_layers
    used = problem.first_bytes if start == 0 else 0
    stop = start
    while stop < layers:
        extra = problem.layer_bytes[stop] + (problem.last_bytes if stop + 1 == layers else 0)
        if used + extra > cap:
            break
        used += problem.layer_bytes[stop]
        stop += 1
    return stop


def stop_table(problem: PlanProblem) -> np.ndarray:
    """``stops[p, a]`` = :func:`max_stop` ``(problem, p, a)`` for every peer and start, at once."""
    layers = problem.num_layers
    a = np.arange(layers)[:, None]
    b = np.arange(layers + 1)[None, :]
    sums = np.concatenate([[0], np.cumsum(np.asarray(problem.layer_bytes, dtype=np.int64))])
    need = sums[b] - sums[a] + problem.first_bytes * (a == 0) + problem.last_bytes * (b == layers)
    caps = np.array([d.memory_bytes for d in problem.devices], dtype=np.int64)
    # feasible stops from a start are a run a+1..max_stop, so counting them finds the end
    fits = (b > a)[None] & (need[None] <= caps[:, None, None])
    return a[:, 0][None, :] + fits.sum(axis=2)


def greedy_fill(problem: PlanProblem) -> tuple[tuple[int, int, int], ...]:
    """Stages from each peer in turn taking as many layers as its memory holds.

    Taking more layers never hurts later peers (they are left fewer), so this reaches the last
    layer iff *any* assignment fits: it is an exact, cheap memory-feasibility test. If it falls
    short, the stages it returns cover only a prefix.
    """
    stages, start = [], 0
    for p in range(problem.num_devices):
        if start == problem.num_layers:
            break
        stop = max_stop(problem, p, start)
        if stop > start:
            stages.append((p, start, stop))
            start = stop
    return tuple(stages)


def infeasible_reason(problem: PlanProblem) -> str:
    """Why no assignment fits, as precisely as cheap arithmetic can say.

    In order: not enough memory in all; one layer bigger than every peer; otherwise how far
    along the pipeline the peers get (greedy filling is exact for that) and what is left over.
    """
    layers = problem.num_layers
    need = problem.stage_bytes(0, layers)
    offered = sum(d.memory_bytes for d in problem.devices)
    if need > offered:
        need_s, offered_s = _mib_pair(need, offered)
        shown = sorted(problem.devices, key=lambda d: d.memory_bytes)[:8]
        each = ", ".join(f"{d.name} {_mib(d.memory_bytes)}" for d in shown)
        more = ", ..." if len(problem.devices) > len(shown) else ""
        return (
            f"the model needs {need_s} but the peers offer {offered_s} in all: "
            f"{_mib(need - offered)} short (each offers: {each}{more})"
        )
    biggest = max(problem.devices, key=lambda d: d.memory_bytes)
    for i in range(layers):
        alone = problem.stage_bytes(i, i + 1)
        if alone > biggest.memory_bytes:
            alone_s, cap_s = _mib_pair(alone, biggest.memory_bytes)
            return (
                f"no contiguous assignment fits: layer {i} alone needs {alone_s}, "
                f"the largest peer ({biggest.name}) offers {cap_s}"
            )
    stages = greedy_fill(problem)
    reach = stages[-1][2] if stages else 0
    if reach == layers:
        return "no assignment fits (yet greedy filling finds one: this is a bug)"
    return (
        f"no contiguous assignment fits: in pipeline order the peers hold at most "
        f"{_layer_span(0, reach)} of {layers}, leaving {_layer_span(reach, layers)} "
        f"({_mib(problem.stage_bytes(reach, layers))}) over, although they offer "
        f"{_mib(offered)} in all for the model's {_mib(need)}"
    )


def _layer_span(start: int, stop: int) -> str:
    if stop <= start:
        return "no layers"
    return f"layer {start}" if stop == start + 1 else f"layers {start}-{stop - 1}"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _mib_pair(a: int, b: int) -> tuple[str, str]:
    """Both in MiB, with exact bytes when rounding would make them look equal."""
    if _mib(a) != _mib(b):
        return _mib(a), _mib(b)
    return f"{_mib(a)} ({a} bytes)", f"{_mib(b)} ({b} bytes)"


def _matrix(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in rows)


def _check_times(label: str, values: tuple[float, ...]) -> None:
    for v in values:
        if not (math.isfinite(v) and v >= 0.0):
            raise BadPlanProblem(f"{label} must be finite and non-negative, got {v}")


def _as_int(v: object) -> object:
    # numpy integers are fine; floats and bools are mistakes that _check_bytes reports
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def _check_bytes(label: str, values: tuple[int, ...]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BadPlanProblem(f"{label} must be non-negative integers, got {v!r}")


def _check_square(label: str, m: tuple[tuple[float, ...], ...], n: int) -> None:
    if len(m) != n or any(len(row) != n for row in m):
        raise BadPlanProblem(f"{label} must be {n}x{n} (one row and column per device)")
    for i, row in enumerate(m):
        _check_times(label, row)
        if row[i] != 0.0:
            raise BadPlanProblem(f"{label}[{i}][{i}] must be 0 (a device talking to itself)")
