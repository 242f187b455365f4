"""A meshllm partitioner plugin: layers in proportion to each worker's measured speed.

``speed`` is a deliberately simple heuristic, no solver: every worker that can hold a layer gets
a share of the layers proportional to its measured decode speed, shares are capped by what its
memory holds (the excess goes to the others, again by speed), and one sweep in pipeline order
turns the shares into contiguous ranges that are guaranteed to fit. See the README for how it
compares with the built-in ``lp``.
"""

from __future__ import annotations

from meshllm_speed_partitioner.plugin import SpeedPartitioner, meshllm_register_partitioners
from meshllm_speed_partitioner.split import speed_split

__all__ = ["SpeedPartitioner", "meshllm_register_partitioners", "speed_split"]
