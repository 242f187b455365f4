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


class _Frames:
    """The parsing both readers share: a buffer, and what the next frame still needs."""

    def __init__(self, max_size: int):
        self._buf = bytearray()
        self.max_size = max_size

    def _needed(self) -> int:
        """Bytes the buffer must hold for the next whole frame (raises FrameError)."""
        if len(self._buf) < _HEADER.size:
            return _HEADER.size
        (size,) = _HEADER.unpack_from(self._buf)
        if size > self.max_size:
            raise FrameError(f"frame of {size} bytes is over the limit of {self.max_size}")
        return _HEADER.size + size

    def _add(self, chunk: bytes) -> None:
        if not chunk:
            raise EOFError("stream ended" + (" inside a frame" if self._buf else ""))
        self._buf += chunk

    def _pop(self) -> bytes:
        end = self._needed()
        data = bytes(self._buf[_HEADER.size : end])
        del self._buf[:end]
        return data

    def take_buffer(self) -> bytes:
        """Bytes read past the last frame (when a stream switches to raw data)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class FrameReader(_Frames):
    """Reads whole frames from ``read(n)`` (which may return fewer bytes; b"" at EOF)."""

    def __init__(self, read: Callable[[int], Awaitable[bytes]], max_size: int):
        super().__init__(max_size)
        self._read = read

    async def read_frame(self) -> bytes:
        while (n := self._needed()) > len(self._buf):
            self._add(await self._read(max(65536, n - len(self._buf))))
        return self._pop()


class BlockingFrameReader(_Frames):
    """The same, from a blocking ``read(n)`` on a thread of its own."""

    def __init__(self, read: Callable[[int], bytes], max_size: int):
        super().__init__(max_size)
        self._read = read

    def read_frame(self) -> bytes:
        while (n := self._needed()) > len(self._buf):
            self._add(self._read(max(65536, n - len(self._buf))))
        return self._pop()
