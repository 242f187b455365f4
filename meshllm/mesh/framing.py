"""Length-prefixed frames over a byte stream whose reads return arbitrary chunks."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from meshllm.errors import MeshError

_HEADER = struct.Struct(">I")


class FrameError(MeshError):
    """A frame over the size limit, or a stream that ended inside a frame."""


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class FrameReader:
    """Reads whole frames from ``read(n)`` (which may return fewer bytes; b"" at EOF)."""

    def __init__(self, read: Callable[[int], Awaitable[bytes]], max_size: int):
        self._read = read
        self._buf = bytearray()
        self.max_size = max_size

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self._read(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError("stream ended" + (" inside a frame" if self._buf else ""))
            self._buf += chunk

    def take_buffer(self) -> bytes:
        """Bytes read past the last frame (when a stream switches to raw data)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    async def read_frame(self) -> bytes:
        await self._fill(_HEADER.size)
        (size,) = _HEADER.unpack_from(self._buf)
        if size > self.max_size:
            raise FrameError(f"frame of {size} bytes is over the limit of {self.max_size}")
        await self._fill(_HEADER.size + size)
        data = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        return data
