"""The ``libp2p-zlib`` transport: the compressed stream, and the endpoint wrapping another one.

Streams run over trio's in-memory stream pairs, endpoints over meshllm's in-memory transport:
the real daemons over real libp2p are exercised by tests/integration/test_example_plugins.py.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator

import meshllm_zlib_transport.plugin as plugin_module
import pytest
import trio
import trio.testing
from meshllm_zlib_transport import CompressedStream, ZlibEndpoint, ZlibTransport

from meshllm.mesh.framing import FrameError, FrameReader, frame
from meshllm.mesh.identity import MeshSecret
from meshllm.mesh.memory import MemoryStream, MemoryTransport
from meshllm.mesh.transport import EndpointOptions, PeerUnreachable, ReportsStats, Stream
from meshllm.plugins import TransportRegistry, get_plugin_manager


def stream_pair(**kwargs: int) -> tuple[CompressedStream, CompressedStream, MemoryStream]:
    """(writer, reader, the reader's raw wire side) over one in-memory byte stream."""
    a, b = trio.testing.memory_stream_pair()
    raw_b = MemoryStream("writer", b)
    return CompressedStream(MemoryStream("reader", a)), CompressedStream(raw_b, **kwargs), raw_b


def payload(rng: random.Random, size: int) -> bytes:
    """Random bytes, runs of one byte, or repeated text: what compresses not at all, a lot,
    and somewhat."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(size)
    if kind == 1:
        return bytes([rng.randrange(256)]) * size
    return (b"activation frame %d " % rng.randrange(10**6) * (size // 20 + 1))[:size]


async def read_all(stream: Stream, rng: random.Random, limit: int = 1 << 30) -> bytes:
    got = bytearray()
    while len(got) < limit:
        size = rng.choice([1, 7, 100, 4096, 65536, 1 << 20])
        chunk = await stream.read(size)
        assert len(chunk) <= size  # reads are bounded by max_bytes
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("read_size", [1, 5, 1000, 1 << 16])
async def test_random_data_round_trips_whatever_the_chunking(read_size: int) -> None:
    rng = random.Random(read_size)
    # Tiny wire reads cost a Python loop turn per byte or so: smaller messages for those.
    sizes = [0, 1, 2, 17, 1000, 65535, 65536, 300_000] if read_size > 100 else [0, 1, 2, 17, 3000]
    messages = [payload(rng, rng.choice(sizes)) for _ in range(40)]
    writer, reader, _ = stream_pair(read_size=read_size)

    async def send() -> None:
        for m in messages:
            await writer.write(m)
        await writer.close()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = await read_all(reader, rng)
    assert got == b"".join(messages)
    assert writer.counters.sent_raw == reader.counters.received_raw == len(got)
    assert reader.counters.received_wire == writer.counters.sent_wire < len(got)


async def test_a_write_is_readable_at_once_without_waiting_for_more() -> None:
    writer, reader, _ = stream_pair()
    for message in (b"x", b"one activation frame" * 50, bytes(range(256))):
        await writer.write(message)
        got = b""
        with trio.fail_after(5):  # Z_SYNC_FLUSH: nothing is held back for the next write
            while len(got) < len(message):
                got += await reader.read(len(message) - len(got))
        assert got == message


async def test_end_of_stream_is_empty_bytes_every_time() -> None:
    writer, reader, _ = stream_pair()
    await writer.write(b"last words")
    await writer.close()
    with trio.fail_after(5):
        assert await reader.read(100) == b"last words"
        assert await reader.read(100) == b""
        assert await reader.read(100) == b""


async def test_leftovers_wait_for_the_next_read() -> None:
    writer, reader, _ = stream_pair()
    await writer.write(b"abcdefghij" * 1000)
    with trio.fail_after(5):
        parts = [await reader.read(3) for _ in range(4)]
    assert parts == [b"abc", b"def", b"ghi", b"jab"]


@pytest.mark.parametrize(
    "wire",
    [
        frame(b"a plain libp2p peer's frame"),  # no zlib header: a peer on another transport
        zlib.compress(b"x")[:2] + b"\xff" * 64,  # a valid header, then an invalid block type
        zlib.compress(b"a whole zlib stream, end marker included"),  # we never end a stream
    ],
    ids=["not-zlib", "bad-block", "ended-stream"],
)
async def test_corrupt_input_is_peer_unreachable(wire: bytes) -> None:
    a, b = trio.testing.memory_stream_pair()
    reader = CompressedStream(MemoryStream("liar", b))
    await a.send_all(wire)
    with trio.fail_after(5), pytest.raises(PeerUnreachable, match="libp2p-zlib"):
        while await reader.read(1 << 16):
            pass


def bomb(header: bytes, zeros: int) -> bytes:
    """*header*, then *zeros* zero bytes, deflated (about 1000:1)."""
    c = zlib.compressobj(9)
    block = bytes(1 << 20)
    wire = c.compress(header) + b"".join(c.compress(block) for _ in range(zeros >> 20))
    return wire + c.flush(zlib.Z_SYNC_FLUSH)


async def test_a_zlib_bomb_is_refused_without_inflating_it() -> None:
    # 256 MiB of zeros behind a frame header claiming 1 GiB: the activation reader's frame
    # limit refuses it from the header, and only what was asked for was ever inflated.
    wire = bomb((1 << 30).to_bytes(4, "big"), 256 << 20)
    assert len(wire) < 300_000
    a, b = trio.testing.memory_stream_pair()
    reader = CompressedStream(MemoryStream("attacker", b))
    await a.send_all(wire)
    tracemalloc.start()
    try:
        with trio.fail_after(10), pytest.raises(FrameError, match="over the limit"):
            await FrameReader(reader.read, 64 << 20).read_frame()
        # Reading straight from the stream: each read inflates only what it may return.
        for _ in range(32):
            assert len(await reader.read(1 << 16)) == 1 << 16
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"inflating the bomb allocated {peak} bytes"
    assert reader.counters.received_raw <= (33 << 16) + 4


async def test_a_write_cut_short_breaks_the_stream_for_good(autojump_clock: object) -> None:
    class Stalled:
        """The wrapped stream blocks: the write below is cancelled half-way."""

        peer_id = "peer"

        async def write(self, data: bytes) -> None:
            await trio.sleep_forever()

        async def read(self, max_bytes: int) -> bytes:
            return b""

        async def close(self) -> None:
            pass

    writer = CompressedStream(Stalled())
    with trio.move_on_after(0.01):
        await writer.write(b"half of this never leaves")
    with pytest.raises(PeerUnreachable, match="mid-write"):
        await writer.write(b"more")


async def test_errors_of_the_wrapped_stream_stay_peer_unreachable() -> None:
    writer, reader, raw = stream_pair()
    await raw.close()
    with pytest.raises(PeerUnreachable):
        await reader.read(10)
    await writer.close()
    with pytest.raises(PeerUnreachable):
        await writer.write(b"after close")


# -- the endpoint, wrapping the in-memory transport ---------------------------------------------


def options(seed: bytes, secret: MeshSecret) -> EndpointOptions:
    return EndpointOptions(key_seed=seed * 32, secret=secret, listen=())


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ZlibEndpoint, ZlibEndpoint]]:
    transport = ZlibTransport(MemoryTransport())
    secret = MeshSecret(b"s" * 32)
    a, b = (transport.create_endpoint(options(s, secret)) for s in (b"a", b"b"))
    async with trio.open_nursery() as nursery:
        for ep in (a, b):
            await nursery.start(ep.run)
        await a.dial(b.listen_addrs()[0])
        yield a, b
        nursery.cancel_scope.cancel()


async def echo(stream: Stream) -> None:
    while data := await stream.read(1 << 16):
        await stream.write(data)


async def test_endpoint_streams_are_compressed_both_ways_and_counted(
    pair: tuple[ZlibEndpoint, ZlibEndpoint],
) -> None:
    a, b = pair
    b.set_stream_handler("act", echo)
    message = b"\x00\x01 activations " * 4000
    with trio.fail_after(5):
        stream = await a.open_stream(b.peer_id, "act")
        await stream.write(message)
        got = b""
        while len(got) < len(message):
            got += await stream.read(1 << 16)
        await stream.close()
    assert got == message
    for ep in (a, b):
        s = ep.stats()
        assert isinstance(ep, ReportsStats) and s["streams"] == 1
        assert s["sent_raw"] == s["received_raw"] == len(message)
        assert s["sent_wire"] == s["received_wire"] < len(message) // 20
        assert s["ratio"] > 20
    json.dumps(a.stats())  # status --json shows it


async def test_control_messages_pass_through_unchanged(
    pair: tuple[ZlibEndpoint, ZlibEndpoint],
) -> None:
    a, b = pair
    await a.send(b.peer_id, b"heartbeat")
    with trio.fail_after(5):
        msg = await b.messages.receive()
    assert (msg.sender, msg.payload) == (a.peer_id, b"heartbeat")
    assert a.is_connected(b.peer_id) and a.stats()["streams"] == 0


async def test_a_peer_without_compression_gets_a_clear_error() -> None:
    network = MemoryTransport()
    secret = MeshSecret(b"s" * 32)
    plain = network.create_endpoint(options(b"p", secret))
    zipped = ZlibTransport(network).create_endpoint(options(b"z", secret))
    errors: list[str] = []

    async def handler(stream: Stream) -> None:
        try:
            await stream.read(100)
        except PeerUnreachable as exc:
            errors.append(str(exc))

    zipped.set_stream_handler("act", handler)
    async with trio.open_nursery() as nursery:
        for ep in (plain, zipped):
            await nursery.start(ep.run)
        await plain.dial(zipped.listen_addrs()[0])
        with trio.fail_after(5):
            stream = await plain.open_stream(zipped.peer_id, "act")
            await stream.write(frame(b"uncompressed"))
            while not errors:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert "same [mesh] transport" in errors[0]


def test_the_registry_builds_it_from_the_hook() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(plugin_module, name="zlib-under-test")
    try:
        reg = TransportRegistry(pm)
        assert reg.owner("libp2p-zlib") == "zlib-under-test"
        ep = reg.get("libp2p-zlib").create_endpoint(options(b"r", MeshSecret(b"s" * 32)))
        assert isinstance(ep, ZlibEndpoint) and ep.peer_id.startswith("12D3")  # a libp2p id
    finally:
        pm.unregister(plugin_module)


def test_installed_entry_point_is_listed_by_meshllm_plugins() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshllm", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    owner = info["transports"].get("libp2p-zlib")
    assert owner is not None, "meshllm-zlib-transport is not installed (tools/setup.sh)"
    assert {"name": owner, "kind": "entry point", "hooks": ["meshllm_register_transports"]} in info[
        "plugins"
    ]
