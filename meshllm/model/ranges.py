"""Contiguous layer ranges and their validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshllm.errors import BadRanges


@dataclass(frozen=True, order=True)
class LayerRange:
    """Layers ``start`` (inclusive) to ``stop`` (exclusive), in pipeline order."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.stop <= self.start:
            raise BadRanges(f"empty or negative layer range {self.start}-{self.stop}")

    def __str__(self) -> str:
        return f"{self.start}-{self.stop}"

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.stop

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        parts = text.strip().split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise BadRanges(f"bad layer range {text!r}: expected START-STOP, e.g. 0-10")
        return cls(int(parts[0]), int(parts[1]))


def parse_ranges(text: str) -> list[LayerRange]:
    """Parse ``"0-10,10-20,20-30"``."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise BadRanges("no layer ranges given")
    return [LayerRange.parse(t) for t in items]


def validate_ranges(ranges: Sequence[LayerRange], num_layers: int) -> list[LayerRange]:
    """Check that *ranges* tile ``[0, num_layers)`` in order, naming the first problem."""
    if not ranges:
        raise BadRanges("no layer ranges given")
    expected = 0
    for r in ranges:
        if r.stop > num_layers:
            raise BadRanges(f"layer range {r} is out of bounds: the model has {num_layers} layers")
        if r.start > expected:
            raise BadRanges(f"gap in layer ranges: layers {expected}-{r.start} are not assigned")
        if r.start < expected:
            raise BadRanges(f"layer ranges overlap (or are out of order) at {r}")
        expected = r.stop
    if expected != num_layers:
        raise BadRanges(f"gap in layer ranges: layers {expected}-{num_layers} are not assigned")
    return list(ranges)


def even_ranges(num_layers: int, parts: int) -> list[LayerRange]:
    """Split into *parts* contiguous ranges whose sizes differ by at most one layer."""
    if parts < 1:
        raise BadRanges(f"need at least one segment, got {parts}")
    if parts > num_layers:
        raise BadRanges(f"cannot cut {num_layers} layers into {parts} segments")
    base, extra = divmod(num_layers, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(LayerRange(start, stop))
        start = stop
    return out
