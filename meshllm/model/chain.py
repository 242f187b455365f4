"""A pipeline of segments run in one process: the local reference for the distributed path."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshllm.errors import PartitionError
from meshllm.model.ortlib import ort as load_ort
from meshllm.model.ranges import LayerRange
from meshllm.model.runtime import SegmentRuntime, use_global_thread_pool
from meshllm.model.store import ImportedModel


@dataclass
class StepTimes:
    """Seconds spent in each segment, summed over steps (for --json and benchmarks)."""

    per_segment: list[float] = field(default_factory=list)

    def add(self, segment: int, seconds: float) -> None:
        if segment >= len(self.per_segment):
            self.per_segment.extend([0.0] * (segment + 1 - len(self.per_segment)))
        self.per_segment[segment] += seconds


class LocalChain:
    """Segments chained in order; feeds each one's outputs to the next."""

    def __init__(self, segments: Sequence[SegmentRuntime], ranges: Sequence[LayerRange]):
        if not segments:
            raise PartitionError("a chain needs at least one segment")
        self.segments = list(segments)
        self.ranges = list(ranges)
        if "logits" not in self.segments[-1].data_outputs:
            raise PartitionError("the last segment does not produce logits")
        self._ones = np.ones((1, 0), dtype=np.int64)

    @classmethod
    def load(
        cls,
        model: ImportedModel,
        ranges: Sequence[LayerRange] | None,
        *,
        threads: int = 1,
        report=lambda _m: None,
    ) -> LocalChain:
        """The whole model (*ranges* None) or its segments for *ranges*."""
        arch, kv = model.manifest.architecture, model.manifest.kv_names
        use_global_thread_pool(threads)
        if ranges is None:
            full = LayerRange(0, arch.num_layers)
            return cls([SegmentRuntime(model.onnx_path, arch, kv, threads=threads)], [full])
        files = model.segments(ranges, report)
        runtimes = [SegmentRuntime(p, arch, kv, threads=threads) for p, _ in files]
        return cls(runtimes, [info.range for _, info in files])

    def open(self, request_id: str, capacity: int) -> None:
        if self._ones.shape[1] < capacity:
            self._ones = np.ones((1, capacity), dtype=np.int64)
        for seg in self.segments:
            seg.open(request_id, capacity)

    def close(self, request_id: str) -> None:
        for seg in self.segments:
            seg.close(request_id)

    def forward(
        self, request_id: str, input_ids: np.ndarray, total_len: int, times: StepTimes | None = None
    ) -> np.ndarray:
        """Run new tokens *input_ids* ([1, n]) with *total_len* positions in all; last logits."""
        new = int(input_ids.shape[1])
        # A contiguous view: every segment's mask-derived subgraph reads the same tensor.
        mask = load_ort().OrtValue.ortvalue_from_numpy(self._ones[:, :total_len])
        feeds: dict[str, object] = {"input_ids": input_ids, "attention_mask": mask}
        for k, seg in enumerate(self.segments):
            t0 = time.perf_counter()
            feeds.update(seg.step(request_id, feeds, new))  # type: ignore[arg-type]
            if times is not None:
                times.add(k, time.perf_counter() - t0)
        logits = feeds["logits"]
        assert isinstance(logits, np.ndarray)
        return logits[0, -1]
