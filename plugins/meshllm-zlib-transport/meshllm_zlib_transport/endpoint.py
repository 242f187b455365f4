"""The ``libp2p-zlib`` transport: the built-in libp2p endpoint with every stream compressed.

Only streams change (activations, file segments, probes; in both directions). Identity,
dialing, admission by the mesh secret, encryption and control messages are the wrapped
endpoint's, untouched: compression is added inside its encrypted channels, never instead of
them. Both ends of a stream must compress, so every peer of a mesh must use this transport.
"""

from __future__ import annotations

from typing import Any

import trio

from meshllm.mesh.transport import (
    Endpoint,
    EndpointOptions,
    Message,
    Stream,
    StreamHandler,
    Transport,
)
from meshllm_zlib_transport.stream import LEVEL, CompressedStream, Counters


class ZlibEndpoint:
    """An :class:`meshllm.mesh.transport.Endpoint` that compresses every stream of *inner*."""

    def __init__(self, inner: Endpoint, *, level: int = LEVEL):
        self.inner = inner
        self.level = level
        self.counters = Counters()  # totals over every stream, for stats()

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def listen_addrs(self) -> list[str]:
        return self.inner.listen_addrs()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.inner.run(task_status=task_status)

    async def dial(self, addr: str) -> str:
        return await self.inner.dial(addr)

    async def send(self, peer_id: str, payload: bytes) -> None:
        await self.inner.send(peer_id, payload)

    @property
    def messages(self) -> trio.MemoryReceiveChannel[Message]:
        return self.inner.messages

    def is_connected(self, peer_id: str) -> bool:
        return self.inner.is_connected(peer_id)

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def decompressing(stream: Stream) -> None:
            await handler(self._wrap(stream))

        self.inner.set_stream_handler(protocol, decompressing)

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        return self._wrap(await self.inner.open_stream(peer_id, protocol))

    def stats(self) -> dict[str, Any]:
        """What compression saved, over every stream so far (``meshllm status --json``)."""
        c = self.counters
        raw, wire = c.sent_raw + c.received_raw, c.sent_wire + c.received_wire
        return {
            "compression": "zlib",
            "level": self.level,
            "streams": c.streams,
            "sent_raw": c.sent_raw,
            "sent_wire": c.sent_wire,
            "received_raw": c.received_raw,
            "received_wire": c.received_wire,
            "ratio": round(raw / wire, 3) if wire else None,
        }

    def _wrap(self, stream: Stream) -> CompressedStream:
        return CompressedStream(stream, self.counters, level=self.level)


class ZlibTransport:
    """Registered as ``libp2p-zlib``; *inner* defaults to the built-in libp2p transport (tests
    wrap the in-memory one)."""

    name = "libp2p-zlib"

    def __init__(self, inner: Transport | None = None):
        if inner is None:
            from meshllm.mesh.libp2p_transport import Libp2pTransport

            inner = Libp2pTransport()
        self.inner = inner

    def create_endpoint(self, options: EndpointOptions) -> ZlibEndpoint:
        return ZlibEndpoint(self.inner.create_endpoint(options))
