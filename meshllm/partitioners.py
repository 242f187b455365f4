"""Partitioners: which contiguous layer range each worker runs. Built-ins: ``even``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meshllm import hookimpl
from meshllm.model.ranges import LayerRange, even_ranges


@dataclass(frozen=True)
class PartitionRequest:
    """What a partitioner decides from.

    :param num_layers: decoder layers of the model.
    :param num_workers: workers (peers, or local segments) available, in pipeline order.
    :param layer_weight_bytes: weight bytes of each layer (from the model manifest).
    """

    num_layers: int
    num_workers: int
    layer_weight_bytes: Sequence[int] = ()


@runtime_checkable
class Partitioner(Protocol):
    name: str

    def partition(self, request: PartitionRequest) -> list[LayerRange]: ...


class EvenPartitioner:
    """Equal numbers of layers per worker (sizes differ by at most one)."""

    name = "even"

    def partition(self, request: PartitionRequest) -> list[LayerRange]:
        return even_ranges(request.num_layers, request.num_workers)


@hookimpl(trylast=True)
def meshllm_register_partitioners(register):  # type: ignore[no-untyped-def]
    register(EvenPartitioner())
