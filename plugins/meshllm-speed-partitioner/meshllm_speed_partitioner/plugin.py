"""The hook implementation: registers the ``speed`` partitioner with meshllm."""

from __future__ import annotations

from collections.abc import Callable

from meshllm import hookimpl
from meshllm.model.ranges import LayerRange
from meshllm.partitioners import Partitioner, PartitionRequest, build_problem
from meshllm_speed_partitioner.split import speed_split


class SpeedPartitioner:
    """Layers in proportion to measured speed, within each worker's memory.

    The request is read through meshllm's own :func:`meshllm.partitioners.build_problem`, so
    it means exactly what it means to ``lp``: workers without measurements count as equally
    fast, a memory figure of 0 as unlimited.
    """

    name = "speed"
    # The leader measures every peer (speed and memory) before it calls partition().
    uses_profiles = True

    def partition(self, request: PartitionRequest) -> list[LayerRange | None]:
        return speed_split(build_problem(request))


@hookimpl
def meshllm_register_partitioners(register: Callable[[Partitioner], None]) -> None:
    register(SpeedPartitioner())
