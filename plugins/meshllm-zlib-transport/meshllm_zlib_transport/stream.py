"""A meshllm Stream whose bytes travel zlib-compressed over another Stream.

One compressor for what we write and one decompressor for what we read, each living as long
as the stream, so what repeats across messages (frame headers, a file's structure) is
compressed against everything sent before. Every write ends with ``Z_SYNC_FLUSH``: the peer
can decompress all of it at once, nothing waits in a buffer for the next write (an activation
frame must not wait for the next token's).

Reads never produce more than the caller asked for: ``decompress(data, max_bytes)`` stops at
*max_bytes* and keeps the compressed rest (``unconsumed_tail``) for the next read. So a
peer sending a zlib bomb (a few KiB that inflate to GiB) costs at most *max_bytes* plus one
wire chunk of memory per read, and the framing above refuses an oversized frame from its
header before reading the rest.

The stream never sends a zlib end marker: the end of the stream is the wrapped stream's end.
A cut inside a message is caught by the framing above, exactly as without compression.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import structlog
import trio

from meshllm.mesh.transport import PeerUnreachable, Stream

LEVEL = 1  # fastest: activations are float32 noise that barely compresses, and cost per token
READ_SIZE = 1 << 16  # compressed bytes taken from the wrapped stream at a time
HINT = "every peer of a mesh must use the same [mesh] transport, here libp2p-zlib"
log = structlog.get_logger("meshllm_zlib_transport")


@dataclass
class Counters:
    """Bytes before (raw) and after (wire) compression, both ways; shared by an endpoint's
    streams so the endpoint can report totals."""

    streams: int = 0
    sent_raw: int = 0
    sent_wire: int = 0
    received_raw: int = 0
    received_wire: int = 0

    def add(self, other: Counters) -> None:
        self.sent_raw += other.sent_raw
        self.sent_wire += other.sent_wire
        self.received_raw += other.received_raw
        self.received_wire += other.received_wire


class CompressedStream:
    """Wraps *inner*; errors, end of stream and read sizes keep the Stream contract."""

    def __init__(
        self,
        inner: Stream,
        totals: Counters | None = None,
        *,
        level: int = LEVEL,
        read_size: int = READ_SIZE,
    ):
        self._inner = inner
        self._compress = zlib.compressobj(level)
        self._decompress = zlib.decompressobj()
        self._read_size = read_size
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._broken = False  # a write was cut short: the peer's decompressor is mid-block
        self._eof = False
        self._closed = False
        self.counters = Counters(streams=1)
        self._totals = totals
        if totals is not None:
            totals.streams += 1

    @property
    def peer_id(self) -> str:
        return self._inner.peer_id

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._broken:
                raise PeerUnreachable(f"compressed stream to {self.peer_id} broke mid-write")
            wire = self._compress.compress(data) + self._compress.flush(zlib.Z_SYNC_FLUSH)
            # Cancelled or failed half-way, the peer would decompress garbage from here on.
            self._broken = True
            await self._inner.write(wire)
            self._broken = False
            self._count(sent_raw=len(data), sent_wire=len(wire))

    async def read(self, max_bytes: int) -> bytes:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        async with self._read_lock:
            while True:
                pending = self._decompress.unconsumed_tail
                if not pending:
                    if self._eof:
                        return b""
                    pending = await self._inner.read(self._read_size)
                    if not pending:
                        self._eof = True
                        return b""
                    self._count(received_wire=len(pending))
                try:
                    out = self._decompress.decompress(pending, max_bytes)
                except zlib.error as exc:
                    raise PeerUnreachable(
                        f"bad compressed data from {self.peer_id}: {exc} ({HINT})"
                    ) from None
                if self._decompress.eof:
                    # We never end a zlib stream, so a peer that does is not one of ours.
                    raise PeerUnreachable(f"{self.peer_id} ended its compressed stream ({HINT})")
                if out:
                    self._count(received_raw=len(out))
                    return out
                # Only a header or a flush marker so far: read on.

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            c = self.counters
            log.debug(
                "compressed_stream_closed",
                other=self.peer_id,
                sent_raw=c.sent_raw,
                sent_wire=c.sent_wire,
                received_raw=c.received_raw,
                received_wire=c.received_wire,
            )
        await self._inner.close()

    def _count(self, **amounts: int) -> None:
        delta = Counters(**amounts)
        self.counters.add(delta)
        if self._totals is not None:
            self._totals.add(delta)
