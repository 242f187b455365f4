"""Which requests a stage takes on, and with what KV cache.

A request opens at a stage with its first frame (which carries its capacity), or with a KV
cache moved from the stage that ran these layers under the previous plan. Each open request
holds a KV cache here, so a stage refuses more than its limit rather than run out of memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from meshllm.errors import MeshError
from meshllm.model.runtime import KVLayer, SegmentRuntime
from meshllm.model.sampling import SamplingParams
from meshllm.pipeline.frames import Frame
from meshllm.pipeline.onward import Onward


class StaleEpoch(MeshError):
    """A frame for another plan than the one this stage serves."""


class KVMoveFailed(MeshError):
    """A request's KV cache could not be moved here; the coordinator replays it instead."""


FetchKV = Callable[[Frame, list[int]], Awaitable[dict[int, KVLayer]]]


class StageBusy(MeshError):
    """This stage holds as many requests as its limit allows; a new one must wait."""


def sampling_from(obj: dict) -> SamplingParams:
    """Sampling parameters from a frame or a request (raises MeshError with the reason)."""
    return SamplingParams.from_wire(obj)


class RequestOpener:
    def __init__(
        self,
        runtime: SegmentRuntime,
        onward: Onward,
        *,
        max_requests: int,
        context_length: int,
        fetch_kv: FetchKV | None,
    ):
        self.runtime = runtime
        self.onward = onward
        self.max_requests = max_requests
        self.context_length = context_length
        self.fetch_kv = fetch_kv

    async def open(self, f: Frame) -> None:
        """Open *f*'s request here (raises MeshError, StageBusy or KVMoveFailed)."""
        if not f.cap:
            raise MeshError(f"unknown request {f.rid}")
        if len(self.runtime.open_requests) >= self.max_requests:
            raise StageBusy(
                f"this stage already serves {self.max_requests} requests, its limit "
                "([limits] max_concurrent_requests)"
            )
        if f.cap > self.context_length or f.pos > f.cap:
            raise MeshError(f"request needs {f.cap} positions; context is {self.context_length}")
        kv = None
        if f.kv_from is not None:
            if self.fetch_kv is None:
                raise KVMoveFailed("this stage cannot fetch KV caches")
            kv = await self.fetch_kv(f, self.runtime.layers)
        try:
            self.runtime.open(f.rid, f.cap, kv)
        except MeshError as exc:
            if kv is None:
                raise
            raise KVMoveFailed(f"the moved KV cache does not fit: {exc}") from None
        if self.onward.is_last:
            drawn = f.kv_from.drawn if f.kv_from is not None else 0
            self.onward.open(f.rid, sampling_from(f.sampling), f.cap, drawn)
