"""Partitioners: which contiguous layer range each worker runs.

Built-ins, registered like any plugin:
  ``lp``      the default: an exact mixed-integer program (HiGHS) over measured profiles,
              minimising the slowest stage (``throughput``) or the total step time
              (``latency``), within each worker's memory; may leave slow workers out.
  ``even``    equal numbers of layers per worker, the split most systems use.
  ``memory``  layers in proportion to each worker's free memory, the way exo splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meshllm import hookimpl
from meshllm.errors import PartitionError
from meshllm.model.ranges import LayerRange, even_ranges

Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class WorkerProfile:
    """What the planner knows of one worker (a peer), as measured by that worker.

    :param name: the worker's id (peer id), for messages.
    :param memory_bytes: what a plan may put on it (weights + KV cache); 0 means unknown.
    :param layer_s: decode seconds of each layer on this worker; empty means not measured.
    :param first_s: extra decode seconds when it runs layer 0 (the embedding).
    :param last_s: extra decode seconds when it runs the last layer (norm, lm_head, sampling).
    """

    name: str
    memory_bytes: int = 0
    layer_s: tuple[float, ...] = ()
    first_s: float = 0.0
    last_s: float = 0.0


@dataclass(frozen=True)
class PartitionRequest:
    """What a partitioner decides from.

    :param num_layers: decoder layers of the model.
    :param num_workers: workers (peers, or local segments) available, in pipeline order.
    :param layer_weight_bytes: weight bytes of each layer (from the model manifest).
    :param layer_bytes: memory each layer needs where it runs: weights plus the KV cache
        reserved for it; empty means use *layer_weight_bytes*.
    :param first_bytes: extra memory for the worker running layer 0 (the embedding table).
    :param last_bytes: extra memory for the worker running the last layer (the lm_head).
    :param workers: one profile per worker, in the same order; empty when nothing is measured.
    :param link_s: seconds to move one decode step's activations from worker i to worker j.
    :param return_s: seconds for a sampled token to go from worker i (last stage) back to
        worker j (first stage).
    :param objective: ``throughput`` or ``latency`` (see :mod:`meshllm.config`).
    """

    num_layers: int
    num_workers: int
    layer_weight_bytes: Sequence[int] = ()
    layer_bytes: Sequence[int] = ()
    first_bytes: int = 0
    last_bytes: int = 0
    workers: Sequence[WorkerProfile] = ()
    link_s: Matrix = ()
    return_s: Matrix = ()
    objective: str = "throughput"

    def memory_of_layers(self) -> list[int]:
        if self.layer_bytes:
            return list(self.layer_bytes)
        if self.layer_weight_bytes:
            return list(self.layer_weight_bytes)
        return [1] * self.num_layers


Assignment = list[LayerRange | None]


@runtime_checkable
class Partitioner(Protocol):
    name: str

    def partition(self, request: PartitionRequest) -> Sequence[LayerRange | None]:
        """One entry per worker in order: its range, or None to leave it out."""
        ...


@runtime_checkable
class UsesProfiles(Protocol):
    """Optional for a partitioner: ``uses_profiles = True`` has the leader measure every peer
    (a profile) before it plans, as ``lp`` and ``memory`` need."""

    uses_profiles: bool


def uses_profiles(partitioner: object) -> bool:
    return isinstance(partitioner, UsesProfiles) and bool(partitioner.uses_profiles)


class EvenPartitioner:
    """Equal numbers of layers per worker (sizes differ by at most one)."""

    name = "even"

    def partition(self, request: PartitionRequest) -> Assignment:
        n = min(request.num_workers, request.num_layers)
        return [*even_ranges(request.num_layers, n), *([None] * (request.num_workers - n))]


class MemoryPartitioner:
    """Layers in proportion to each worker's memory (exo's split), every worker used.

    Without memory figures it falls back to an even split.
    """

    name = "memory"
    uses_profiles = True  # for the peers' memory

    def partition(self, request: PartitionRequest) -> Assignment:
        mem = [w.memory_bytes for w in request.workers]
        if len(mem) != request.num_workers or min(mem, default=0) <= 0:
            return EvenPartitioner().partition(request)
        return proportional_ranges(request.num_layers, mem)


def proportional_ranges(num_layers: int, weights: Sequence[float]) -> Assignment:
    """Contiguous ranges with sizes proportional to *weights* (largest remainder), >= 1 each."""
    n = len(weights)
    if n > num_layers:
        # Not every worker can get a layer: the smallest shares are left out.
        keep = set(sorted(range(n), key=lambda i: -weights[i])[:num_layers])
        sub = proportional_ranges(num_layers, [weights[i] for i in sorted(keep)])
        it = iter(sub)
        return [next(it) if i in keep else None for i in range(n)]
    total = float(sum(weights))
    raw = [w / total * num_layers for w in weights]
    sizes = [max(1, int(r)) for r in raw]
    # Largest remainders get the layers left over; if the minimum of one layer each took
    # too many, the largest shares give them back.
    by_remainder = sorted(range(n), key=lambda i: -(raw[i] - int(raw[i])))
    k = 0
    while sum(sizes) < num_layers:
        sizes[by_remainder[k % n]] += 1
        k += 1
    while sum(sizes) > num_layers:
        sizes[max(range(n), key=lambda i: sizes[i])] -= 1
    out: Assignment = []
    start = 0
    for s in sizes:
        out.append(LayerRange(start, start + s))
        start += s
    return out


class LPPartitioner:
    """The optimal contiguous assignment by mixed-integer programming (HiGHS).

    Uses the measured profiles when the request has them; otherwise every worker is taken to
    be equally fast, with a layer's cost in proportion to its weight bytes (so the embedding
    and lm_head ends are still accounted for) and no memory cap.
    """

    name = "lp"
    uses_profiles = True

    def partition(self, request: PartitionRequest) -> Assignment:
        from meshllm.plan import solve_milp

        problem = build_problem(request)
        solution = solve_milp(problem)
        out: Assignment = [None] * request.num_workers
        for device, start, stop in solution.stages:
            out[device] = LayerRange(start, stop)
        return out


def build_problem(request: PartitionRequest):  # type: ignore[no-untyped-def]
    """The planner's optimisation problem for *request* (see :mod:`meshllm.plan`)."""
    from meshllm.plan import Device, PlanProblem

    n, w = request.num_layers, request.num_workers
    workers = list(request.workers)
    if workers and len(workers) != w:
        raise PartitionError(f"{len(workers)} worker profiles for {w} workers")
    measured = bool(workers) and all(len(p.layer_s) == n for p in workers)
    layer_mem = request.memory_of_layers()
    if not measured:
        scale = max(layer_mem) or 1
        unit = tuple(b / scale for b in layer_mem)
        ends = (request.first_bytes / scale, request.last_bytes / scale)
        workers = [
            WorkerProfile(
                name=workers[i].name if workers else f"worker-{i}",
                memory_bytes=workers[i].memory_bytes if workers else 0,
                layer_s=unit,
                first_s=ends[0],
                last_s=ends[1],
            )
            for i in range(w)
        ]
    unlimited = sum(layer_mem) + request.first_bytes + request.last_bytes
    devices = tuple(
        Device(
            name=p.name,
            layer_s=tuple(p.layer_s),
            first_s=p.first_s,
            last_s=p.last_s,
            memory_bytes=p.memory_bytes if p.memory_bytes > 0 else unlimited,
        )
        for p in workers
    )
    zeros = tuple(tuple(0.0 for _ in range(w)) for _ in range(w))
    return PlanProblem(
        layer_bytes=tuple(layer_mem),
        first_bytes=request.first_bytes,
        last_bytes=request.last_bytes,
        devices=devices,
        link_s=request.link_s or zeros,
        return_s=request.return_s or zeros,
        objective=request.objective,
    )


@hookimpl(trylast=True)
def meshllm_register_partitioners(register):  # type: ignore[no-untyped-def]
    register(LPPartitioner())
    register(EvenPartitioner())
    register(MemoryPartitioner())
