"""The fast data plane's encrypted stream: sends from the event loop and from a thread."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from meshllm.mesh.dataplane import EncryptedStream
from meshllm.mesh.framing import BlockingFrameReader, FrameReader, frame
from meshllm.mesh.transport import PeerUnreachable


@pytest.fixture
async def pair() -> AsyncIterator[tuple[EncryptedStream, EncryptedStream]]:
    """A dialer and a listener stream over real loopback TCP, sharing one key."""
    key = os.urandom(32)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    dial = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listeners[0].accept()
    a = EncryptedStream("listener", dial, key, dialer=True)
    b = EncryptedStream("dialer", accepted, key, dialer=False)
    yield a, b
    await a.close()
    await b.close()
    await listeners[0].aclose()


async def read_frames(stream: EncryptedStream, n: int) -> list[bytes]:
    reader = FrameReader(stream.read, 64 << 20)
    return [await reader.read_frame() for _ in range(n)]


async def test_write_round_trip(pair: tuple[EncryptedStream, EncryptedStream]) -> None:
    a, b = pair
    msgs = [b"", b"x", os.urandom(5000), os.urandom(3 << 20)]  # the last spans records
    async with trio.open_nursery() as n:
        got: list[bytes] = []

        async def reader() -> None:
            got.extend(await read_frames(b, len(msgs)))

        n.start_soon(reader)
        for m in msgs:
            await a.write(frame(m))
    assert got == msgs


async def test_thread_and_loop_sends_interleave_whole(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    a, b = pair
    per_side = 200
    from_thread, sent_now = [b"t%04d" % i + os.urandom(i * 7) for i in range(per_side)], []
    from_loop = [b"l%04d" % i + os.urandom(i * 5) for i in range(per_side)]

    def thread_sender() -> None:
        for m in from_thread:
            # False means the loop holds the stream: that message goes through write instead.
            sent_now.append(a.send_now(frame(m)))

    got: list[bytes] = []
    async with trio.open_nursery() as n:

        async def reader() -> None:
            got.extend(await read_frames(b, 2 * per_side))

        n.start_soon(reader)
        worker = threading.Thread(target=thread_sender)
        worker.start()
        for m in from_loop:
            await a.write(frame(m))
            await trio.sleep(0)
        await trio.to_thread.run_sync(worker.join)
        for m, ok in zip(from_thread, sent_now, strict=True):
            if not ok:
                await a.write(frame(m))
    # Every record decrypted (nonces in order) and each side's messages kept their order.
    assert sorted(got) == sorted(from_thread + from_loop)
    assert [m for m in got if m.startswith(b"l")] == from_loop
    assert any(sent_now)


async def test_send_now_refuses_while_the_loop_holds_the_stream(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    a, b = pair
    assert a._tlock.acquire()
    try:
        assert a.send_now(frame(b"later")) is False
    finally:
        a._tlock.release()
    assert await trio.to_thread.run_sync(a.send_now, frame(b"now"))
    assert await read_frames(b, 1) == [b"now"]


async def test_large_send_now_waits_for_room(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    a, b = pair
    big = os.urandom(16 << 20)  # far over a socket buffer: the thread waits for the reader
    async with trio.open_nursery() as n:
        got: list[bytes] = []

        async def reader() -> None:
            got.extend(await read_frames(b, 1))

        n.start_soon(reader)
        assert await trio.to_thread.run_sync(a.send_now, frame(big))
    assert got == [big]


async def test_send_now_that_times_out_breaks_the_stream(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    a, _b = pair  # nobody reads: the send cannot finish
    ok = await trio.to_thread.run_sync(lambda: a.send_now(frame(os.urandom(32 << 20)), 0.2))
    assert ok is False
    # Half a record is on the wire: the stream is unusable, and says so.
    assert a.send_now(frame(b"x")) is False
    with pytest.raises(PeerUnreachable, match="timed out halfway"):
        await a.write(frame(b"x"))


async def test_closed_stream_sends_nothing(pair: tuple[EncryptedStream, EncryptedStream]) -> None:
    a, _b = pair
    await a.close()
    assert a.send_now(frame(b"x")) is False
    with pytest.raises(PeerUnreachable):
        await a.write(frame(b"x"))


def _read_on_thread(stream: EncryptedStream, n: int, stop: threading.Event) -> list[Any]:
    """Read *n* frames with read_blocking on a thread of its own; what ended it last."""
    out: list[Any] = []

    def run() -> None:
        reader = BlockingFrameReader(lambda k: stream.read_blocking(k, stop), 64 << 20)
        try:
            for _ in range(n):
                out.append(reader.read_frame())
        except (EOFError, PeerUnreachable) as exc:
            out.append(exc)
        finally:
            stream.close_reader()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out.append(t)
    return out


async def test_blocking_reads_on_a_thread(pair: tuple[EncryptedStream, EncryptedStream]) -> None:
    a, b = pair
    msgs = [b"", b"x", os.urandom(5000), os.urandom(3 << 20)]  # the last spans records
    got = _read_on_thread(b, len(msgs) + 1, threading.Event())
    thread = got.pop()
    for m in msgs:
        await a.write(frame(m))
    await a.close()  # then the end of the stream
    await trio.to_thread.run_sync(thread.join, 10)
    assert got[: len(msgs)] == msgs
    assert isinstance(got[-1], EOFError)


async def test_a_blocked_reader_stops_when_told(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    _, b = pair
    stop = threading.Event()
    got = _read_on_thread(b, 1, stop)
    thread = got.pop()
    await trio.sleep(0.05)
    assert thread.is_alive()  # nothing to read yet
    stop.set()
    await trio.to_thread.run_sync(thread.join, 2 * EncryptedStream.POLL_S + 1)
    assert not thread.is_alive() and isinstance(got[-1], EOFError)


async def test_a_forged_record_breaks_a_blocking_read(
    pair: tuple[EncryptedStream, EncryptedStream],
) -> None:
    a, b = pair
    got = _read_on_thread(b, 1, threading.Event())
    thread = got.pop()
    record = bytearray(a._seal(frame(b"hello")))
    record[-1] ^= 1  # the tag no longer matches
    await a._tcp.send_all(bytes(record))
    await trio.to_thread.run_sync(thread.join, 10)
    assert isinstance(got[-1], PeerUnreachable) and "forged" in str(got[-1])
