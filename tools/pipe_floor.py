"""A floor for any multi-process pipeline on this machine: segments chained by pipes.

The mesh's stages run in separate processes, and on a small machine that alone costs speed
against one process running the whole model (each process finds its caches cold, and hands
the step on through the kernel). This ring runs the mesh plan's own segments in separate
processes joined by plain pipes (no event loop, no encryption, no framing), so its ratio to
the monolithic model is what the process split costs by itself, and the mesh's distance
from it is what meshllm adds. Used by bench_mesh_generation.py --floor.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np


def _stage(
    k: int,
    store_dir: str,
    name: str,
    ranges: list[tuple[int, int]],
    rx: Connection,
    tx: Connection,
    ready: Any,
) -> None:
    from meshllm.model.ranges import LayerRange
    from meshllm.model.runtime import SegmentRuntime
    from meshllm.model.store import ModelStore

    model = ModelStore(Path(store_dir)).get(name)
    files = model.segments([LayerRange(a, b) for a, b in ranges])
    arch, kv = model.manifest.architecture, model.manifest.kv_names
    seg = SegmentRuntime(files[k][0], arch, kv, threads=1)
    ones = np.ones((1, arch.context_length), dtype=np.int64)
    last = k == len(ranges) - 1
    ready.put(k)
    while (msg := rx.recv()) is not None:
        rid, pos, cap, feeds = msg
        if cap:  # a new request: the ring serves one at a time
            for old in seg.open_requests:
                seg.close(old)
            seg.open(rid, cap)
        feeds["attention_mask"] = ones[:, :pos]
        new = next(iter(feeds.values())).shape[1]
        outs = seg.step(rid, feeds, new)
        if last:
            tx.send(int(np.argmax(outs["logits"][0, -1])))
            continue
        outs.update({n: v for n, v in feeds.items() if n not in seg.data_inputs})
        outs.pop("attention_mask", None)
        tx.send((rid, pos, cap, outs))
    tx.send(None)


class PipeRing:
    """The segments of *ranges*, one process each, stage i's output piped to stage i+1."""

    def __init__(self, store_dir: Path, name: str, ranges: list[tuple[int, int]]):
        ctx = mp.get_context("spawn")  # the parent holds ONNX Runtime and threads: no fork
        pipes = [ctx.Pipe(duplex=False) for _ in range(len(ranges) + 1)]
        ready = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_stage,
                args=(k, str(store_dir), name, ranges, pipes[k][0], pipes[k + 1][1], ready),
                daemon=True,
            )
            for k in range(len(ranges))
        ]
        for p in self._procs:
            p.start()
        self._into, self._back = pipes[0][1], pipes[-1][0]
        for _ in ranges:
            ready.get(timeout=300)

    def round(self, ids: list[int], tokens: int) -> float:
        """Decode tokens/s of one greedy generation through the ring (first token excluded)."""
        rid = uuid.uuid4().hex
        x, pos, cap = np.asarray([ids], dtype=np.int64), len(ids), len(ids) + tokens
        first = time.perf_counter()
        for i in range(tokens):
            self._into.send((rid, pos, cap, {"input_ids": x}))
            tok = self._back.recv()
            if i == 0:
                first = time.perf_counter()
            x, pos, cap = np.asarray([[tok]], dtype=np.int64), pos + 1, 0
        return (tokens - 1) / (time.perf_counter() - first)

    def close(self) -> None:
        self._into.send(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
