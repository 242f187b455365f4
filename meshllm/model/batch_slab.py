"""The batch buffer of a segment: the KV caches of requests run as one batch, side by side.

Each request keeps its own cache (see ``SegmentRuntime``); a batched step needs the rows'
caches in one tensor (padded on the right to the longest; the attention mask tells
GroupQueryAttention each row's length). The buffer is kept while the same requests keep
coming as a batch: only what a row lacks is copied in, and the position a step appends is
copied back to the request's own cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshllm.model.manifest import Architecture
from meshllm.model.ortlib import ort as load_ort

if TYPE_CHECKING:
    import onnxruntime as ort

Arrays = dict[str, np.ndarray]  # past name -> (1 or rows, kv_heads, positions, head_size)


@dataclass
class BatchSlab:
    """The KV caches of the requests last run as a batch, side by side."""

    rids: tuple[str, ...]
    width: int  # positions per row
    arrays: Arrays  # past name -> (rows, kv_heads, width, head_size)
    binding: ort.IOBinding  # its buffers bound as past and present
    synced: list[int]  # per row: positions that match the request's own cache

    def copy_in(self, caches: list[Arrays], lengths: list[int]) -> None:
        """Bring each row up to its request's *length* positions."""
        for row, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
            have = self.synced[row]
            if have < length:
                for past, array in self.arrays.items():
                    array[row, :, have:length] = cache[past][0, :, have:length]

    def copy_out(self, caches: list[Arrays], lengths: list[int]) -> None:
        """After a step: the position each row appended (at its old *length*), back into
        its request's own cache."""
        for past, array in self.arrays.items():
            for row, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
                cache[past][0, :, length] = array[row, :, length]
        self.synced = [length + 1 for length in lengths]


class BatchSlabs:
    """One segment's batch buffer, made for a mix of requests and kept while it recurs."""

    # Room a new batch buffer leaves for the positions its requests will add: at least this,
    # or half its width, so that a growing batch needs a bigger buffer only now and then.
    HEADROOM = 64

    def __init__(
        self,
        session: ort.InferenceSession,
        kv_pairs: list[tuple[str, str]],
        arch: Architecture,
        kv_dtype: np.dtype,
    ):
        self.session = session
        self.kv_pairs = kv_pairs
        self.arch = arch
        self.kv_dtype = kv_dtype
        self._slab: BatchSlab | None = None
        self._memory: Arrays = {}  # past name -> the batch buffer's memory

    def width_for(self, width: int) -> int:
        return width + max(self.HEADROOM, width // 2)

    def bytes_for(self, rows: int, width: int) -> int:
        """Bytes of a batch buffer for *rows* requests of up to *width* positions."""
        per = rows * self.width_for(width) * self.arch.num_key_value_heads * self.arch.head_size
        return len(self.kv_pairs) * per * self.kv_dtype.itemsize

    def forget(self, request_id: str) -> None:
        # A request opened again under the same id would find its old positions there.
        if self._slab is not None and request_id in self._slab.rids:
            self._slab = None

    def slab(self, rids: tuple[str, ...], width: int) -> BatchSlab:
        """The buffer for a batch of *rids* reaching *width* positions: the last one when
        it fits, else a new one (its rows not yet synced)."""
        slab = self._slab
        if slab is not None and slab.rids == rids and slab.width >= width:
            return slab
        self._slab = None
        shape = (
            len(rids),
            self.arch.num_key_value_heads,
            self.width_for(width),
            self.arch.head_size,
        )
        size = int(np.prod(shape))
        if self._memory and next(iter(self._memory.values())).size < size:
            self._memory = {}  # let the old memory go before allocating more
        if not self._memory:
            # Kept across batches and grown only when too small: a fresh buffer for every new
            # mix of requests left the allocator holding on to freed ones.
            self._memory = {past: np.empty(size, self.kv_dtype) for past, _ in self.kv_pairs}
        binding = self.session.io_binding()
        arrays = {}
        for past, present in self.kv_pairs:
            # Past a row's length the buffer holds what it held: GroupQueryAttention reads
            # only each row's own positions.
            array = self._memory[past][:size].reshape(shape)
            value = load_ort().OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
            arrays[past] = array
        slab = self._slab = BatchSlab(rids, shape[2], arrays, binding, [0] * len(rids))
        return slab
