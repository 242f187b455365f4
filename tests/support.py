"""Shared helpers for tests: the correctness oracle (greedy traces with their logits)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from meshllm.model.chain import LocalChain


@dataclass
class Trace:
    tokens: list[int]
    logits: list[np.ndarray]  # last-position logits before each generated token


def greedy_trace(chain: LocalChain, prompt_ids: list[int], steps: int) -> Trace:
    """Greedy-decode *steps* tokens (no early stop), keeping every step's logits."""
    rid = uuid.uuid4().hex
    chain.open(rid, len(prompt_ids) + steps)
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    try:
        ids = np.asarray([prompt_ids], dtype=np.int64)
        total = len(prompt_ids)
        for _ in range(steps):
            row = chain.forward(rid, ids, total).copy()
            logits.append(row)
            tokens.append(int(np.argmax(row)))
            ids = np.asarray([[tokens[-1]]], dtype=np.int64)
            total += 1
    finally:
        chain.close(rid)
    return Trace(tokens, logits)


def max_logit_diff(a: Trace, b: Trace) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a.logits, b.logits, strict=True))


async def memory_pair(nursery, protocol: str, handler, secret: bytes = b"m" * 32):  # type: ignore[no-untyped-def]
    """Two connected in-memory endpoints; the first serves *handler* on *protocol*."""
    import random

    from meshllm.mesh.identity import MeshSecret
    from meshllm.mesh.memory import MemoryNetwork, MemoryTransport
    from meshllm.mesh.transport import EndpointOptions

    transport = MemoryTransport(MemoryNetwork())
    rng = random.Random(1)
    a, b = (
        transport.create_endpoint(EndpointOptions(rng.randbytes(32), MeshSecret(secret), ()))
        for _ in range(2)
    )
    a.set_stream_handler(protocol, handler)
    await nursery.start(a.run)
    await nursery.start(b.run)
    await b.dial(a.listen_addrs()[0])
    return a, b
