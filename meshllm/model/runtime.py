"""One ONNX Runtime session per segment, with the KV cache of its layers held per request.

The KV cache of a request is allocated once at the length the request can reach (prompt plus
tokens to generate) and bound as both the ``past`` input and the ``present`` output of the
GroupQueryAttention nodes, which then append in place: no per-token copy of the cache, and no
growth in per-token cost with the sequence length beyond attention itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from meshllm.errors import MeshError, PromptTooLong
from meshllm.model import hugepages
from meshllm.model.batch_slab import BatchSlabs
from meshllm.model.graph import KVNames
from meshllm.model.manifest import Architecture
from meshllm.model.ortlib import ort as load_ort

if TYPE_CHECKING:
    import onnxruntime as ort

    Tensor = np.ndarray | ort.OrtValue


KVLayer = tuple[np.ndarray, np.ndarray]  # one layer's (key, value) cache


class UnknownRequest(MeshError):
    """A step for a request this segment holds no KV cache for."""


class BadInput(MeshError):
    """Tensors from the network that do not fit the segment's inputs."""


ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass
class _KVCache:
    buffers: dict[str, ort.OrtValue]  # past/present name -> shared buffer
    capacity: int
    length: int = 0
    # The numpy arrays behind the buffers (ORT reads and writes their memory in place), by
    # past name: a move copies just the positions it needs from them.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # The request's binding, its KV buffers bound once; and, for one-token steps, the
    # buffers its data outputs are written into (see SegmentRuntime.step).
    binding: ort.IOBinding | None = None
    decode_outputs: dict[str, tuple[np.ndarray, ort.OrtValue]] | None = None


_global_pool_threads: int | None = None


def use_global_thread_pool(threads: int) -> bool:
    """Make every later session in this process share one pool of *threads* workers.

    Several segments in one process each with its own pool leave idle pools spinning against
    the busy one (measured: a 3-segment chain at 2 threads ran at 0.42x the whole model); one
    shared pool removes that. It can only be set before the first session is created, so the
    first call wins. Returns whether the shared pool is in use.
    """
    global _global_pool_threads
    if _global_pool_threads is not None:
        return True
    try:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(max(1, threads), 1)
    except (ImportError, AttributeError, RuntimeError):
        return False
    _global_pool_threads = max(1, threads)
    return True


def session_options(threads: int) -> ort.SessionOptions:
    ort = load_ort()
    so = ort.SessionOptions()
    if _global_pool_threads is not None:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


class SegmentRuntime:
    """Runs one segment (or the whole model) for any number of concurrent requests."""

    def __init__(self, path: Path, arch: Architecture, kv: KVNames, *, threads: int = 1):
        self.path = path
        self.arch = arch
        self.session = load_ort().InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.huge_page_bytes = hugepages.after_load()
        self._input_meta = self.session.get_inputs()
        self.input_names = [i.name for i in self._input_meta]
        self.output_names = [o.name for o in self.session.get_outputs()]
        pattern = re.compile("^" + re.escape(kv.past_key).replace("%d", r"(\d+)") + "$")
        self.layers = sorted(int(m.group(1)) for n in self.input_names if (m := pattern.match(n)))
        self._kv_pairs = [
            (past, present)
            for i in self.layers
            for past, present in zip(kv.past(i), kv.present(i), strict=True)
        ]
        kv_names = {n for pair in self._kv_pairs for n in pair}
        self.data_inputs = [n for n in self.input_names if n not in kv_names]
        self.data_outputs = [n for n in self.output_names if n not in kv_names]
        self._kv_dtype = np.dtype(arch.kv_dtype)
        self._kv = kv
        self._caches: dict[str, _KVCache] = {}
        self._batches = BatchSlabs(self.session, self._kv_pairs, arch, self._kv_dtype)

    def check_feeds(self, feeds: Mapping[str, Tensor], new_tokens: int) -> None:
        """Validate names, dtypes and shapes of data inputs from the network (raises BadInput)."""
        for meta in self._input_meta:
            if meta.name not in self.data_inputs or meta.name == "attention_mask":
                continue
            value = feeds.get(meta.name)
            if value is None:
                raise BadInput(f"missing input {meta.name}")
            if not isinstance(value, np.ndarray):
                continue
            want = ORT_TYPES.get(meta.type)
            if want is not None and value.dtype != want:
                raise BadInput(f"{meta.name}: dtype {value.dtype}, expected {np.dtype(want)}")
            if value.ndim != len(meta.shape) or value.shape[0] != 1:
                raise BadInput(f"{meta.name}: shape {value.shape} does not fit {meta.shape}")
            if value.ndim >= 2 and value.shape[1] != new_tokens:
                raise BadInput(f"{meta.name}: {value.shape[1]} positions, expected {new_tokens}")
            for got, dim in zip(value.shape[2:], meta.shape[2:], strict=True):
                if isinstance(dim, int) and got != dim:
                    raise BadInput(f"{meta.name}: shape {value.shape} does not fit {meta.shape}")
            if (
                meta.name == "input_ids"
                and value.size
                and not (int(value.min()) >= 0 and int(value.max()) < self.arch.vocab_size)
            ):
                # Some embedding kernels (the int4 GatherBlockQuantized) read past their table
                # for an id out of range instead of failing.
                raise BadInput(
                    f"input_ids: a token id outside the vocabulary of {self.arch.vocab_size}"
                )

    # -- request lifecycle --------------------------------------------------------------------
    def open(self, request_id: str, capacity: int, kv: Mapping[int, KVLayer] | None = None) -> None:
        """Allocate this segment's KV cache for a request of up to *capacity* positions.

        *kv* starts it from another segment's cache (see :meth:`export_kv`): one (key, value)
        pair per layer of this segment, each ``(1, kv_heads, length, head_size)``.
        """
        shape = (1, self.arch.num_key_value_heads, capacity, self.arch.head_size)
        length = 0
        if kv is not None:
            if sorted(kv) != self.layers:
                raise BadInput(f"KV cache for layers {sorted(kv)}, this segment runs {self.layers}")
            length = {a.shape[2] for pair in kv.values() for a in pair}.pop() if kv else 0
            for pair in kv.values():
                for a in pair:
                    if a.shape != (*shape[:2], length, shape[3]) or a.dtype != self._kv_dtype:
                        raise BadInput(f"KV cache tensor {a.dtype}{a.shape} does not fit {shape}")
            if length > capacity:
                raise PromptTooLong(f"a KV cache of {length} positions; capacity is {capacity}")
        buffers, arrays = {}, {}
        for layer in self.layers:
            for i, (past, present) in enumerate(zip(*self._names(layer), strict=True)):
                data = np.zeros(shape, self._kv_dtype)
                if kv is not None:
                    data[:, :, :length] = kv[layer][i]
                # no copy: ORT uses data's memory
                buf = load_ort().OrtValue.ortvalue_from_numpy(data)
                buffers[past] = buffers[present] = buf
                arrays[past] = data
        self._batches.forget(request_id)
        self._caches[request_id] = _KVCache(buffers, capacity, length, arrays)

    def _names(self, layer: int) -> tuple[tuple[str, str], tuple[str, str]]:
        return self._kv.past(layer), self._kv.present(layer)

    def export_kv(self, request_id: str, layers: list[int], length: int) -> dict[int, KVLayer]:
        """Copies of the first *length* positions of the KV cache of *layers* for a request:
        what a segment taking these layers over needs to continue it exactly."""
        cache = self._caches.get(request_id)
        if cache is None:
            raise UnknownRequest(f"no KV cache for request {request_id!r} on {self.path.name}")
        if not 0 < length <= cache.length:
            raise BadInput(f"the cache holds {cache.length} positions, {length} were asked for")
        out: dict[int, KVLayer] = {}
        for layer in layers:
            if layer not in self.layers:
                raise BadInput(f"layer {layer} is not in this segment ({self.path.name})")
            k, v = (
                np.ascontiguousarray(cache.arrays[name][:, :, :length])
                for name in self._kv.past(layer)
            )
            out[layer] = (k, v)
        return out

    def close(self, request_id: str) -> None:
        self._caches.pop(request_id, None)
        self._batches.forget(request_id)

    @property
    def open_requests(self) -> list[str]:
        return list(self._caches)

    def cached_length(self, request_id: str) -> int:
        """Positions of *request_id* this segment has computed (0 if it holds none)."""
        cache = self._caches.get(request_id)
        return 0 if cache is None else cache.length

    def kv_bytes(self, request_id: str) -> int:
        cache = self._caches[request_id]
        per = cache.capacity * self.arch.num_key_value_heads * self.arch.head_size
        return 2 * len(self.layers) * per * self._kv_dtype.itemsize

    # -- compute ------------------------------------------------------------------------------
    def step(
        self, request_id: str, feeds: Mapping[str, Tensor], new_tokens: int
    ) -> dict[str, np.ndarray]:
        """Run *new_tokens* positions for a request; returns the segment's data outputs.

        *feeds* must hold every data input of the segment (others are ignored).
        """
        cache = self._caches.get(request_id)
        if cache is None:
            raise UnknownRequest(f"no KV cache for request {request_id!r} on {self.path.name}")
        if cache.length + new_tokens > cache.capacity:
            raise PromptTooLong(
                f"request {request_id} needs {cache.length + new_tokens} positions, "
                f"its cache holds {cache.capacity}"
            )
        binding = cache.binding
        if binding is None:
            # Bound once per request: binding every layer's cache at every step cost a few
            # hundred µs of Python per step, cold, and a mesh pays it at every stage.
            binding = cache.binding = self.session.io_binding()
            self._bind_kv(binding, cache)
        for name in self.data_inputs:
            value = feeds[name]
            if isinstance(value, load_ort().OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif new_tokens > 1:
                # As an OrtValue, which clear_binding_inputs lets go of (see below); what
                # bind_cpu_input keeps stays until the name is bound again.
                arr = np.ascontiguousarray(value)
                binding.bind_ortvalue_input(name, load_ort().OrtValue.ortvalue_from_numpy(arr))
            else:
                binding.bind_cpu_input(name, value)
        outs = self._decode_outputs(cache)
        if new_tokens == 1 and outs is not None:
            for name, (_, value) in outs.items():
                binding.bind_ortvalue_output(name, value)
            self.session.run_with_iobinding(binding)
            cache.length += new_tokens
            # Copies: the buffers are the next step's.
            return {name: array.copy() for name, (array, _) in outs.items()}
        # A prompt step (or one whose outputs ORT must allocate): tensors of its own size. The
        # binding lives as long as the request, so it must let go of them after the step: a
        # prompt's logits are several MB, and a stage with dozens of prompts waiting for their
        # first decode step grew by hundreds of MB.
        fresh = self._output_buffers(new_tokens) if outs is not None else None
        result = self._run_into(binding, fresh)
        cache.length += new_tokens
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        self._bind_kv(binding, cache)
        for name, (_, value) in (outs or {}).items():
            binding.bind_ortvalue_output(name, value)
        return result

    def step_batch(
        self, request_ids: list[str], feeds: list[Mapping[str, Tensor]]
    ) -> list[dict[str, np.ndarray]]:
        """One-token steps of several requests as one ONNX Runtime call; per request, what
        :meth:`step` would have returned.

        A decode step streams the segment's weights from memory once whatever the batch, so
        on a small machine a batch of 4 costs little more than one step. The rows' caches sit
        side by side in a batch buffer (see batch_slab). The results equal separate steps
        bit for bit (tested).
        """
        caches = []
        for rid in request_ids:
            cache = self._caches.get(rid)
            if cache is None:
                raise UnknownRequest(f"no KV cache for request {rid!r} on {self.path.name}")
            if cache.length + 1 > cache.capacity:
                raise PromptTooLong(
                    f"request {rid} needs {cache.length + 1} positions, "
                    f"its cache holds {cache.capacity}"
                )
            caches.append(cache)
        if len(set(request_ids)) != len(request_ids):
            raise BadInput("a batch holds one step per request")
        rows = len(caches)
        lengths = [c.length for c in caches]
        width = max(lengths) + 1
        slab = self._batches.slab(tuple(request_ids), width)
        slab.copy_in([c.arrays for c in caches], lengths)
        binding = slab.binding
        mask = np.zeros((rows, width), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, : length + 1] = 1
        for name in self.data_inputs:
            if name == "attention_mask":
                binding.bind_cpu_input(name, mask)
                continue
            parts = [f[name] for f in feeds]
            stacked = np.concatenate(
                [p.numpy() if isinstance(p, load_ort().OrtValue) else p for p in parts]
            )
            binding.bind_cpu_input(name, stacked)
        outputs = self._run_into(binding, self._output_buffers(1, rows))
        slab.copy_out([c.arrays for c in caches], lengths)
        for cache in caches:
            cache.length += 1
        return [{name: out[row : row + 1] for name, out in outputs.items()} for row in range(rows)]

    def _run_into(
        self, binding: ort.IOBinding, fresh: dict[str, tuple[np.ndarray, ort.OrtValue]] | None
    ) -> dict[str, np.ndarray]:
        """Run *binding* with its data outputs written into *fresh*, or where that is None
        into tensors ORT allocates; the data outputs."""
        if fresh is not None:
            for name, (_, value) in fresh.items():
                binding.bind_ortvalue_output(name, value)
            self.session.run_with_iobinding(binding)
            return {name: array for name, (array, _) in fresh.items()}
        for name in self.data_outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        # get_outputs follows binding order: the KV buffers first, then the data outputs.
        values = binding.get_outputs()[len(self._kv_pairs) :]
        return {n: v.numpy() for n, v in zip(self.data_outputs, values, strict=True)}

    def batch_bytes(self, rows: int, width: int) -> int:
        """Bytes of a batch buffer for *rows* requests of up to *width* positions."""
        return self._batches.bytes_for(rows, width)

    def _bind_kv(self, binding: ort.IOBinding, cache: _KVCache) -> None:
        for past, present in self._kv_pairs:
            buf = cache.buffers[past]
            binding.bind_ortvalue_input(past, buf)
            binding.bind_ortvalue_output(present, buf)

    def _output_buffers(
        self, positions: int, rows: int = 1
    ) -> dict[str, tuple[np.ndarray, ort.OrtValue]] | None:
        """Fresh buffers for the data outputs of a step of *positions* positions (for *rows*
        requests), or None where an output's shape is not known from the model."""
        outs = {}
        for meta in self.session.get_outputs():
            if meta.name not in self.data_outputs:
                continue
            dtype = ORT_TYPES.get(meta.type)
            shape = list(meta.shape)  # (batch, positions, features...)
            if dtype is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[2:]):
                return None
            array = np.empty([rows, positions, *shape[2:]], dtype)
            outs[meta.name] = (array, load_ort().OrtValue.ortvalue_from_numpy(array))
        return outs

    def _decode_outputs(self, cache: _KVCache) -> dict[str, tuple[np.ndarray, ort.OrtValue]] | None:
        """Buffers for a one-token step's data outputs, made once per request; None when an
        output's shape is not known from the model (then ORT allocates them)."""
        if cache.decode_outputs is None:
            cache.decode_outputs = self._output_buffers(1) or {}
        return cache.decode_outputs or None
